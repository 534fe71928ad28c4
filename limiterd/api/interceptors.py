"""What wraps every call from outside the servicers: the admin token, metrics, and requests
that are not valid protobuf.

grpc calls interceptors with each call's method name and hands back a method handler; these
return the same handler with its behavior wrapped, so the servicers stay plain mappings.
"""

from __future__ import annotations

import hmac
import inspect
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TYPE_CHECKING, Any, Protocol

import grpc
from google.protobuf.message import DecodeError

from limiterd.defaults import ADMIN_TOKEN_KEY

log = logging.getLogger("limiterd.api")

if TYPE_CHECKING:  # the stubs make these generic; at run time they are not subscriptable
    Handler = grpc.RpcMethodHandler[Any, Any]
    Context = grpc.aio.ServicerContext[Any, Any]
Continuation = Callable[[grpc.HandlerCallDetails], Awaitable["Handler | None"]]

ACQUIRE_METHODS = ("Acquire", "AcquireStream")
# One warning about undecodable requests per this many seconds, however many arrive.
BAD_REQUEST_LOG_EVERY_S = 10.0


class Observer(Protocol):
    """What the interceptor tells metrics about each call (limiterd.metrics.Metrics)."""

    def observe_rpc(self, method: str, seconds: float) -> None: ...
    def observe_acquire(self, code: grpc.StatusCode) -> None: ...


def short_name(method: str) -> str:
    """`/limiter.v1.Limiter/Acquire` -> `Acquire`."""
    return method.rsplit("/", 1)[-1]


class AdminToken(grpc.aio.ServerInterceptor):
    """Admin calls need the token in metadata, and so does reflection: the API's file
    describes the Admin service too. Limiter and health calls pass untouched."""

    def __init__(self, token: str, admin_service: str) -> None:
        self._token = token.encode()
        self._guarded = (f"/{admin_service}/", "/grpc.reflection.")

        async def deny(request: Any, context: Context) -> None:
            await context.abort(grpc.StatusCode.UNAUTHENTICATED,
                                f"admin calls and reflection need the {ADMIN_TOKEN_KEY} metadata")

        self._deny: Handler = grpc.unary_unary_rpc_method_handler(deny)
        self._deny_stream: Handler = grpc.stream_stream_rpc_method_handler(deny)

    async def intercept_service(
        self, continuation: Continuation, details: grpc.HandlerCallDetails
    ) -> Handler | None:
        if details.method.startswith(self._guarded):
            sent = dict(details.invocation_metadata or ()).get(ADMIN_TOKEN_KEY, "")
            if not hmac.compare_digest(str(sent).encode(), self._token):
                handler = await continuation(details)
                if handler is not None and handler.request_streaming:
                    return self._deny_stream
                return self._deny
        return await continuation(details)


class Calls(grpc.aio.ServerInterceptor):
    """Every call: how long it took and, for Acquire and AcquireStream, how it ended (by its
    final status, so a stream counts as a unary call does). A request that is not valid
    protobuf is INVALID_ARGUMENT with one throttled log line, not UNKNOWN and a traceback."""

    def __init__(self, observer: Observer | None,
                 monotonic: Callable[[], float] = time.monotonic) -> None:
        self._observer = observer
        self._monotonic = monotonic
        self._bad_logged_at = -BAD_REQUEST_LOG_EVERY_S
        self._bad_unlogged = 0

    async def intercept_service(
        self, continuation: Continuation, details: grpc.HandlerCallDetails
    ) -> Handler | None:
        handler = await continuation(details)
        if handler is None or handler.request_streaming:
            return handler  # unknown method (grpc answers UNIMPLEMENTED), or reflection
        method = short_name(details.method)
        parse, send = handler.request_deserializer, handler.response_serializer
        # The wrapped behavior gets the raw bytes and parses them itself.
        if handler.unary_stream is not None:
            return grpc.unary_stream_rpc_method_handler(
                self._wrap_stream(handler.unary_stream, method, parse),
                response_serializer=send)
        if handler.unary_unary is not None:
            return grpc.unary_unary_rpc_method_handler(
                self._wrap_unary(handler.unary_unary, method, parse),
                response_serializer=send)
        return handler

    def _wrap_unary(self, behavior: Callable[..., Any], method: str,
                    parse: Callable[[bytes], Any] | None) -> Callable[..., Any]:
        async def call(raw: Any, context: Context) -> Any:
            self._observe(method, context)
            return await behavior(await self._parse(raw, parse, method, context), context)

        return call

    def _wrap_stream(self, behavior: Callable[..., Any], method: str,
                     parse: Callable[[bytes], Any] | None) -> Callable[..., Any]:
        if inspect.isasyncgenfunction(behavior):
            async def events(raw: Any, context: Context) -> AsyncIterator[Any]:
                self._observe(method, context)
                async for event in behavior(await self._parse(raw, parse, method, context),
                                            context):
                    yield event

            return events

        async def call(raw: Any, context: Context) -> Any:  # writes with context.write()
            self._observe(method, context)
            return await behavior(await self._parse(raw, parse, method, context), context)

        return call

    def _observe(self, method: str, context: Context) -> None:
        observer = self._observer
        if observer is None:
            return
        started = time.perf_counter()

        def done(_: Context) -> None:
            observer.observe_rpc(method, time.perf_counter() - started)
            if method in ACQUIRE_METHODS:
                code = context.code()
                observer.observe_acquire(
                    code if isinstance(code, grpc.StatusCode) else grpc.StatusCode.OK)

        context.add_done_callback(done)  # type: ignore[arg-type]  # stubs want a class

    async def _parse(self, raw: Any, parse: Callable[[bytes], Any] | None, method: str,
                     context: Context) -> Any:
        if parse is None:
            return raw
        try:
            return parse(raw)
        except DecodeError as exc:
            self._log_bad_request(method, exc)
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                                f"the request is not a valid {method} request message")
            raise  # abort() raises

    def _log_bad_request(self, method: str, exc: Exception) -> None:
        now = self._monotonic()
        if now - self._bad_logged_at < BAD_REQUEST_LOG_EVERY_S:
            self._bad_unlogged += 1
            return
        more = f" (and {self._bad_unlogged} more since the last line)" if self._bad_unlogged \
            else ""
        log.warning("a %s request could not be decoded: %s%s", method, exc, more)
        self._bad_logged_at, self._bad_unlogged = now, 0
