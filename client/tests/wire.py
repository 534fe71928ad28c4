"""Client-side interceptors for the tests: see what goes on the wire to the real daemon, or
lose an answer the daemon did send."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import grpc
import grpc.aio


class Recorder(grpc.aio.UnaryUnaryClientInterceptor):
    """Keeps every request sent, by method name (e.g. "Report")."""

    def __init__(self) -> None:
        self.sent: list[tuple[str, Any]] = []

    async def intercept_unary_unary(self, continuation: Callable[..., Any], details: Any,
                                    request: Any) -> Any:
        name = details.method.decode() if isinstance(details.method, bytes) else details.method
        self.sent.append((name.rsplit("/", 1)[-1], request))
        return await continuation(details, request)

    def of(self, method: str) -> list[Any]:
        return [r for m, r in self.sent if m == method]


class LoseAnswers(grpc.aio.UnaryUnaryClientInterceptor):
    """Lets the daemon process the first `n` calls of `method`, then drops their answers and
    fails them with UNAVAILABLE, as a broken connection would."""

    def __init__(self, method: str, n: int = 1) -> None:
        self.method, self.left = method, n

    async def intercept_unary_unary(self, continuation: Callable[..., Any], details: Any,
                                    request: Any) -> Any:
        call = await continuation(details, request)
        name = details.method.decode() if isinstance(details.method, bytes) else details.method
        if name.endswith("/" + self.method) and self.left > 0:
            self.left -= 1
            await call  # the daemon did the work...
            raise grpc.aio.AioRpcError(grpc.StatusCode.UNAVAILABLE, grpc.aio.Metadata(),
                                       grpc.aio.Metadata(), details="answer lost")  # ...we lost it
        return call


class BreakStreams(grpc.aio.UnaryStreamClientInterceptor):
    """Cuts the first `n` server streams after `after` events: the client cancels the call
    (so the daemon sees the caller go away) and fails with UNAVAILABLE, as a dropped
    connection would."""

    def __init__(self, after: int = 1, n: int = 1,
                 before_cut: asyncio.Event | None = None) -> None:
        self.after, self.left, self.before_cut = after, n, before_cut
        self.broken = 0

    async def intercept_unary_stream(self, continuation: Callable[..., Any], details: Any,
                                     request: Any) -> Any:
        call = await continuation(details, request)
        if self.left <= 0:
            return call
        self.left -= 1

        async def cut() -> Any:
            seen = 0
            async for ev in call:
                yield ev
                seen += 1
                if seen >= self.after:
                    if self.before_cut is not None:
                        await self.before_cut.wait()
                    call.cancel()
                    self.broken += 1
                    raise grpc.aio.AioRpcError(grpc.StatusCode.UNAVAILABLE, grpc.aio.Metadata(),
                                               grpc.aio.Metadata(), details="stream cut")
        return cut()
