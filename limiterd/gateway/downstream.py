"""The answer to the caller: started once, either whole (a JSON answer) or as a stream."""

from __future__ import annotations

from collections.abc import Iterable

from aiohttp import web

from limiterd.gateway.wire import error_bytes, error_event

SSE_HEADERS = (("content-type", "text/event-stream; charset=utf-8"),
               ("cache-control", "no-cache"))


class ClientGone(Exception):
    """The caller hung up while we were writing to it."""


class Downstream:
    def __init__(self, request: web.Request) -> None:
        self.request = request
        self.response: web.StreamResponse | None = None
        self.extra: list[tuple[str, str]] = []  # our own headers (fallback, retries)
        self.bytes_sent = 0
        self.finished = False  # the whole answer was handed to the connection

    @property
    def started(self) -> bool:
        return self.response is not None

    async def start(self, status: int, headers: Iterable[tuple[str, str]]) -> None:
        response = web.StreamResponse(status=status)
        for k, v in [*headers, *self.extra]:
            response.headers.add(k, v)
        self.response = response
        try:
            await response.prepare(self.request)
        except ConnectionError as e:
            raise ClientGone(str(e)) from e

    async def write(self, data: bytes) -> None:
        assert self.response is not None, "start() first"
        try:
            await self.response.write(data)
        except ConnectionError as e:  # aiohttp's ClientConnectionResetError is one
            raise ClientGone(str(e)) from e
        self.bytes_sent += len(data)

    async def finish(self) -> None:
        assert self.response is not None
        try:
            await self.response.write_eof()
        except ConnectionError as e:
            raise ClientGone(str(e)) from e
        self.finished = True

    async def whole(self, status: int, headers: Iterable[tuple[str, str]], body: bytes
                    ) -> web.StreamResponse:
        """A complete answer (not streamed)."""
        await self.start(status, headers)
        await self.write(body)
        await self.finish()
        assert self.response is not None
        return self.response

    async def error(self, status: int, kind: str, message: str,
                    headers: Iterable[tuple[str, str]] = ()) -> web.StreamResponse:
        """Our own error in the provider's format: an HTTP error before anything was sent,
        else an `error` event on the open stream."""
        if self.started:
            await self.write(error_event(error_bytes(kind, message)))
            await self.finish()
            assert self.response is not None
            return self.response
        return await self.whole(status, [("content-type", "application/json"), *headers],
                                error_bytes(kind, message))
