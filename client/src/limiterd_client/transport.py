"""A drop-in for the anthropic SDK: an httpx transport that reserves every `POST /v1/messages`
with limiterd and reports what it used. Existing code changes one line:

    client = anthropic.AsyncAnthropic(http_client=limited_http_client(limiter))

The SDK keeps its own types, errors, streaming events (tool_use, thinking) and features. Its
own retries stay on: each retry is a request of its own, reserved and reported. Usage comes
from the JSON answer or the stream's usage events; the rate-limit headers go to Report. A
limiter that cannot grant in time answers as the provider would, 429 with `retry-after`, so
`except anthropic.RateLimitError` still holds. Fallback across models and the richer retry
policy are the adapters' (AsyncAnthropicAdapter); see the README for when to pick which.
"""

from __future__ import annotations

import importlib
import json
import math
import time
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

from ._runtime import each, iterate_sync, maybe_await, run_sync
from .errors import (
    LimiterBusy,
    LimiterRejected,
    ProviderError,
    ProviderMeta,
    Usage,
    classify_http,
    connection_error,
    reported_headers,
)
from .limiter import Limiter, LimiterCore, ReservationCore
from .proto.limiter.v1 import limiter_pb2 as pb
from .scope import DEFAULT_SALT, scope_for_api_key
from .sse import SseTap, json_usage
from .sync import SyncLimiter

PROVIDER = "anthropic"
Estimator = Callable[[dict[str, Any]], int]


def _httpx() -> Any:
    """httpx2 (what current anthropic SDKs use) or httpx."""
    for name in ("httpx2", "httpx"):
        try:
            return importlib.import_module(name)
        except ImportError:
            continue
    raise ImportError("the drop-in transport needs httpx: pip install "
                      "'limiterd-client[anthropic]'")


def _marking(inner: Any, r: ReservationCore, sync: bool) -> Any:
    """An httpcore trace hook (chained to one already set) that marks the reservation sent
    when the request's headers start going out on the connection."""
    def seen(name: str) -> None:
        if name.endswith("send_request_headers.started"):
            r.mark_sent()

    if sync:
        def trace(name: str, info: dict[str, Any]) -> None:
            seen(name)
            if inner is not None:
                inner(name, info)
        return trace

    async def atrace(name: str, info: dict[str, Any]) -> None:
        seen(name)
        if inner is not None:
            await inner(name, info)
    return atrace


def _metered(request: Any) -> bool:
    return bool(request.method == "POST" and request.url.path.rstrip("/").endswith(
        "/v1/messages"))


def _error_response(status: int, kind: str, message: str, headers: dict[str, str],
                    request: Any) -> Any:
    body = json.dumps({"type": "error", "error": {"type": kind, "message": message}})
    return _httpx().Response(status, headers={"content-type": "application/json",
                                              "x-limiterd": "refused", **headers},
                             content=body.encode(), request=request)


class _Meter:
    """The shared core of both transports; `send` is the wrapped transport's handler (async
    or sync: the sync transport runs this without an event loop)."""

    def __init__(self, limiter: LimiterCore[Any], inner: Any, scope: str | None,
                 salt: str | bytes, estimator: Estimator | None, max_wait: float,
                 user: str) -> None:
        from .anthropic_adapter import estimate_chars
        self.limiter, self.inner, self.scope, self.salt = limiter, inner, scope, salt
        self.estimator = estimator or estimate_chars
        self.max_wait, self.user = max_wait, user

    def _scope(self, request: Any) -> str:
        if self.scope:
            return self.scope
        key = request.headers.get("x-api-key", "").strip()
        scheme, _, token = request.headers.get("authorization", "").strip().partition(" ")
        key = key or (token.strip() if scheme.lower() == "bearer" else "")
        if not key:
            raise ValueError("scope: the request carries no API key: pass scope=... naming "
                             "what the provider counts limits against")
        return scope_for_api_key(key, salt=self.salt)

    async def handle(self, request: Any, send: Callable[[Any], Any]) -> Any:
        if not _metered(request):
            return await maybe_await(send(request))
        body = json.loads(request.content or b"{}")
        limiter: Any = self.limiter
        r: ReservationCore = limiter.reserve(
            self._scope(request), str(body.get("model", "")),
            input_tokens=int(self.estimator(body)),
            max_output_tokens=int(body.get("max_tokens") or 0), max_wait=self.max_wait,
            user=self.user, marks_sent=True)  # mark_called() just before send() below
        try:
            await r._enter()
        except LimiterBusy as e:  # as the provider would say it: the SDK's RateLimitError
            wait_s = math.ceil((e.retry_after_ms or 1000) / 1000)
            return _error_response(429, "rate_limit_error", f"limiterd: {e}",
                                   {"retry-after": str(wait_s)}, request)
        except LimiterRejected as e:  # can never fit: retrying cannot help
            return _error_response(413, "request_too_large", f"limiterd: {e}",
                                   {"x-should-retry": "false"}, request)
        r.mark_called(sent=False)
        if r.grant is not None and r.grant.mark_sent_wanted:
            # Marked when the request's headers go out: after DNS, TCP and TLS (a cold
            # connection's handshake is then not counted as the way to the provider).
            request.extensions["trace"] = _marking(request.extensions.get("trace"), r,
                                                   limiter._rt.sync)
        try:
            response = await maybe_await(send(request))
        except Exception as e:
            httpx = _httpx()
            never_sent = isinstance(e, httpx.ConnectError | httpx.ConnectTimeout)
            await r._report_error(connection_error(PROVIDER, f"{type(e).__name__}: {e}",
                                                   sent=not never_sent))
            raise
        meta = ProviderMeta(http_status=response.status_code,
                            request_id=response.headers.get("request-id", ""),
                            headers=reported_headers(dict(response.headers)))
        if response.headers.get("content-type", "").startswith("text/event-stream") and (
                response.status_code < 400):
            tap = _TapStream(response.stream, r, meta)
            return _httpx().Response(response.status_code, headers=response.headers,
                                     stream=tap, request=request,
                                     extensions=response.extensions)
        raw = b"".join([chunk async for chunk in each(response.stream)])
        await maybe_await(response.stream.aclose() if hasattr(response.stream, "aclose")
                     else response.stream.close())
        again = _httpx().Response(response.status_code, headers=response.headers,
                                  content=raw, request=request,
                                  extensions=response.extensions)
        content = again.read()  # decoded (gzip...) for reading; `again` keeps the raw bytes
        if response.status_code >= 400:
            await r._report_error(_classify(response.status_code, response.headers, content))
        else:
            used = json_usage(content) or Usage(r.input_tokens, r.max_output_tokens)
            await r._report(used.input_tokens, used.output_tokens, provider=meta)
        return again


def _classify(status: int, headers: Any, content: bytes) -> ProviderError:
    try:
        err = json.loads(content).get("error") or {}
    except (ValueError, AttributeError):
        err = {}
    return classify_http(provider=PROVIDER, status=status, headers=dict(headers),
                         code=err.get("type"), message=str(err.get("message", "")),
                         request_id=headers.get("request-id"), now=time.time())


def _base(cls_name: str) -> Any:
    return getattr(_httpx(), cls_name)


class _TapStream(_base("AsyncByteStream"), _base("SyncByteStream")):  # type: ignore[misc]
    """The provider's event stream, passed on unchanged while the tap reads its usage; the
    reservation is settled when the stream ends, fails or is closed early."""

    def __init__(self, inner: Any, r: ReservationCore, meta: ProviderMeta) -> None:
        self._inner, self._r, self._meta = inner, r, meta
        self._tap = SseTap()
        self._failure: BaseException | None = None

    async def _each(self) -> AsyncIterator[bytes]:
        try:
            async for chunk in each(self._inner):
                self._tap.feed(chunk)
                yield chunk
        except Exception as e:
            self._failure = e
            raise
        finally:
            await self._settle()

    async def _settle(self) -> None:
        r, tap = self._r, self._tap
        if r.settled:
            return
        used = tap.usage(r.input_tokens)
        if tap.error is not None:
            err = classify_http(provider=PROVIDER, status=200, code=tap.error.kind,
                                message=tap.error.message, now=time.time())
        elif self._failure is not None:
            err = connection_error(PROVIDER, f"stream broke: {self._failure}")
        elif tap.finished:
            await r._report(used.input_tokens, used.output_tokens, provider=self._meta)
            return
        else:  # the app stopped reading: what it received was used
            await r._report(used.input_tokens, used.output_tokens, outcome=pb.CANCELLED,
                            provider=self._meta)
            return
        err.usage = used
        await r._report_error(err)

    def __aiter__(self) -> AsyncIterator[bytes]:
        return self._each()

    def __iter__(self) -> Iterator[bytes]:
        return iterate_sync(self._each())

    async def aclose(self) -> None:
        await self._settle()
        await self._inner.aclose()

    def close(self) -> None:
        run_sync(self._settle())
        self._inner.close()


class AsyncLimitedTransport(_base("AsyncBaseTransport")):  # type: ignore[misc]
    """An httpx async transport that meters `POST /v1/messages` with a `Limiter`."""

    def __init__(self, limiter: Limiter, *, scope: str | None = None,
                 salt: str | bytes = DEFAULT_SALT, estimator: Estimator | None = None,
                 max_wait: float = 60.0, user: str = "", inner: Any = None) -> None:
        if not isinstance(limiter, Limiter):
            raise TypeError("limiter: AsyncLimitedTransport needs a Limiter (asyncio); for "
                            "a SyncLimiter use LimitedTransport")
        self.inner = inner or _httpx().AsyncHTTPTransport()
        self._meter = _Meter(limiter, self.inner, scope, salt, estimator, max_wait, user)

    async def handle_async_request(self, request: Any) -> Any:
        return await self._meter.handle(request, self.inner.handle_async_request)

    async def aclose(self) -> None:
        await self.inner.aclose()


class LimitedTransport(_base("BaseTransport")):  # type: ignore[misc]
    """An httpx (sync) transport that meters `POST /v1/messages` with a `SyncLimiter`."""

    def __init__(self, limiter: SyncLimiter, *, scope: str | None = None,
                 salt: str | bytes = DEFAULT_SALT, estimator: Estimator | None = None,
                 max_wait: float = 60.0, user: str = "", inner: Any = None) -> None:
        if not isinstance(limiter, SyncLimiter):
            raise TypeError("limiter: LimitedTransport needs a SyncLimiter; for a Limiter "
                            "(asyncio) use AsyncLimitedTransport")
        self.inner = inner or _httpx().HTTPTransport()
        self._meter = _Meter(limiter, self.inner, scope, salt, estimator, max_wait, user)

    def handle_request(self, request: Any) -> Any:
        return run_sync(self._meter.handle(request, self.inner.handle_request))

    def close(self) -> None:
        self.inner.close()


def limited_http_client(limiter: Limiter | SyncLimiter, **kw: Any) -> Any:
    """The SDK's own default http client (its timeouts and connection limits), metered:
    `anthropic.AsyncAnthropic(http_client=limited_http_client(limiter))` for a Limiter,
    `anthropic.Anthropic(http_client=limited_http_client(sync_limiter))` for a SyncLimiter.
    Keyword arguments go to the transport (scope=, salt=, estimator=, max_wait=, user=)."""
    import anthropic
    if isinstance(limiter, SyncLimiter):
        return anthropic.DefaultHttpxClient(transport=LimitedTransport(limiter, **kw))
    return anthropic.DefaultAsyncHttpxClient(transport=AsyncLimitedTransport(limiter, **kw))


def wrap(client: Any, limiter: Limiter | SyncLimiter, **kw: Any) -> Any:
    """An existing SDK client, metered: `client = wrap(client, limiter)`. A copy of it (the
    SDK's `with_options`) whose http client goes through limiterd; the original is unchanged.
    Keyword arguments go to the transport, as for `limited_http_client`."""
    return client.with_options(http_client=limited_http_client(limiter, **kw))
