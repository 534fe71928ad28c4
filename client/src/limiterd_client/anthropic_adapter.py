"""The `anthropic` SDK behind the limiter. Optional: `anthropic` is imported only when used.

The SDK's own retries are turned off (max_retries=0): the RetryPolicy retries, and every
attempt is reserved and reported, so retries are never multiplied.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Mapping
from typing import TYPE_CHECKING, Any, cast

from .errors import (
    ProviderError,
    ProviderMeta,
    Usage,
    classify_http,
    connection_error,
    reported_headers,
)
from .fallback import CallResult, FallbackPolicy, Params
from .limiter import Limiter, Reservation
from .retry import RetryPolicy
from .runner import Attempt, run_call, run_call_sync
from .scope import DEFAULT_SALT, scope_for_api_key
from .streaming import StreamCall, SyncStreamCall
from .sync import SyncLimiter, SyncReservation

if TYPE_CHECKING:
    from anthropic import Anthropic, AsyncAnthropic
    from anthropic.types import Message

PROVIDER = "anthropic"
CHARS_PER_TOKEN = 3.5


def estimate_chars(params: Mapping[str, Any]) -> int:
    """Cheap input estimate: len(JSON of system + messages + tools) / 3.5, rounded up."""
    parts = [params.get(k) for k in ("system", "messages", "tools")]
    text = "".join(json.dumps(p, default=str, ensure_ascii=False) for p in parts if p)
    return math.ceil(len(text) / CHARS_PER_TOKEN)


_COUNT_KEYS = ("model", "messages", "system", "tools", "tool_choice", "thinking")


def count_tokens_estimator(client: AsyncAnthropic) -> Callable[[Params], Awaitable[int]]:
    """Exact input count from the API's count_tokens endpoint (one extra request per call)."""
    async def estimate(params: Params) -> int:
        kw = {k: params[k] for k in _COUNT_KEYS if k in params}
        return (await client.messages.count_tokens(**kw)).input_tokens
    return estimate


def count_tokens_estimator_sync(client: Anthropic) -> Callable[[Params], int]:
    def estimate(params: Params) -> int:
        kw = {k: params[k] for k in _COUNT_KEYS if k in params}
        return client.messages.count_tokens(**kw).input_tokens
    return estimate


def usage_of(usage: Any) -> Usage:
    """Anthropic's rules: cache writes count toward input, cache reads do not."""
    if usage is None:
        return Usage()
    created = getattr(usage, "cache_creation_input_tokens", None) or 0
    return Usage((getattr(usage, "input_tokens", None) or 0) + created,
                 getattr(usage, "output_tokens", None) or 0)


def _httpx_errors(name: str) -> tuple[type[BaseException], ...]:
    """`name` (e.g. "TransportError") from whichever of httpx2/httpx is installed."""
    found: list[type[BaseException]] = []
    for module in ("httpx2", "httpx"):
        try:
            mod = __import__(module)
        except ImportError:
            continue
        found.append(getattr(mod, name))
    return tuple(found)


def _never_sent(exc: BaseException) -> bool:
    """The connection was never made (refused, DNS, TLS, connect timeout): no request left."""
    cause = exc if exc.__cause__ is None else exc.__cause__
    return isinstance(cause, _httpx_errors("ConnectError") + _httpx_errors("ConnectTimeout"))


def to_provider_error(exc: BaseException, now: float | None = None) -> ProviderError | None:
    """Map an SDK (or transport) exception to a ProviderError; None if it is not one."""
    import anthropic

    now = time.time() if now is None else now
    if isinstance(exc, ProviderError):
        return exc
    if isinstance(exc, anthropic.APIStatusError):
        code = exc.type if isinstance(exc.type, str) else None
        return classify_http(
            provider=PROVIDER, status=exc.status_code, headers=dict(exc.response.headers),
            code=code, error_code=exc.error_code, message=exc.api_message or exc.message,
            request_id=exc.request_id, now=now)
    if isinstance(exc, anthropic.APITimeoutError):
        return connection_error(PROVIDER, str(exc), timeout=True, sent=not _never_sent(exc))
    if isinstance(exc, anthropic.APIConnectionError):
        return connection_error(PROVIDER, str(exc.__cause__ or exc), sent=not _never_sent(exc))
    transport = _httpx_errors("TransportError")
    if transport and isinstance(exc, transport):
        timeout = "timeout" in type(exc).__name__.lower()
        return connection_error(PROVIDER, f"{type(exc).__name__}: {exc}", timeout=timeout,
                                sent=not _never_sent(exc))
    return None


def _meta(response: Any) -> ProviderMeta:
    headers = dict(response.headers)
    return ProviderMeta(http_status=response.status_code,
                        request_id=headers.get("request-id", ""),
                        headers=reported_headers(headers))


def _check(params: Params) -> Params:
    if params.get("stream"):
        raise ValueError("stream: use adapter.stream(...) for streamed calls")
    if "model" not in params or "max_tokens" not in params:
        raise ValueError("model/max_tokens: both are required")
    return params


class _Usage:
    """Best-known usage of a stream: the snapshot's, or an estimate of what was delivered."""

    def __init__(self, stream: Any, estimated_input: int) -> None:
        self.stream = stream
        self.text = ""
        self.estimated_input = estimated_input
        self.complete = False  # the stream ended normally: trust the provider's count

    def get(self) -> Usage:
        snap = self.stream._current_snapshot_or_none()
        if self.complete and snap is not None:
            return usage_of(snap.usage)
        seen = usage_of(snap.usage) if snap is not None else Usage(self.estimated_input, 0)
        return Usage(seen.input_tokens or self.estimated_input,
                     max(seen.output_tokens, math.ceil(len(self.text) / CHARS_PER_TOKEN)))


class _Handle:
    """What the async and sync stream handles share: usage so far, response meta, and the
    mapping of a mid-stream failure to a ProviderError that carries the usage."""

    def __init__(self, manager: Any, stream: Any, estimated_input: int) -> None:
        self._manager, self._stream = manager, stream
        self._usage = _Usage(stream, estimated_input)

    def usage(self) -> Usage:
        return self._usage.get()

    def meta(self) -> ProviderMeta:
        return _meta(self._stream.response)

    def _failed(self, e: Exception) -> Exception:
        """The ProviderError to raise instead of `e` (with the usage so far), or `e`."""
        pe = to_provider_error(e)
        if pe is None:
            return e
        pe.usage = self._usage.get()
        return pe

    def _finished(self, msg: Any) -> Message:
        self._usage.complete = True
        return cast("Message", msg)


class _AsyncHandle(_Handle):
    async def texts(self) -> AsyncIterator[str]:
        try:
            async for text in self._stream.text_stream:
                self._usage.text += text
                yield text
        except Exception as e:
            if (failure := self._failed(e)) is e:
                raise
            raise failure from e

    async def final(self) -> Message:
        return self._finished(await self._stream.get_final_message())

    async def close(self) -> None:
        await self._manager.__aexit__(None, None, None)


class _SyncHandle(_Handle):
    def texts(self) -> Iterator[str]:
        try:
            for text in self._stream.text_stream:
                self._usage.text += text
                yield text
        except Exception as e:
            if (failure := self._failed(e)) is e:
                raise
            raise failure from e

    def final(self) -> Message:
        return self._finished(self._stream.get_final_message())

    def close(self) -> None:
        self._manager.__exit__(None, None, None)


class AsyncAnthropicAdapter:
    """`AsyncAnthropic` behind a `Limiter`.

    result = await adapter.create(model=..., max_tokens=..., messages=[...])
    result.value is the SDK's Message; result.model / result.path say who served it.
    """

    def __init__(self, client: AsyncAnthropic, limiter: Limiter, *, scope: str | None = None,
                 salt: str | bytes = DEFAULT_SALT, retry: RetryPolicy | None = None,
                 fallback: FallbackPolicy | None = None,
                 estimator: Callable[[Params], int | Awaitable[int]] = estimate_chars,
                 user: str = "", max_wait: float | None = None) -> None:
        self.client = client.with_options(max_retries=0)
        self.limiter = limiter
        self.scope = scope or scope_for_api_key(client.api_key or "", salt=salt)
        self.retry = retry or RetryPolicy.interactive()
        self.fallback, self.estimator = fallback, estimator
        self.user, self.max_wait = user, max_wait

    async def create(self, **params: Any) -> CallResult[Message]:
        async def attempt(p: Params, r: Reservation) -> Attempt[Message]:
            try:
                raw = await self.client.messages.with_raw_response.create(**p)
                msg = await raw.parse()
            except Exception as e:
                pe = to_provider_error(e)
                if pe is None:
                    raise
                raise pe from e
            return Attempt(msg, usage_of(msg.usage), _meta(raw))

        return await run_call(self.limiter, scope=self.scope, params=_check(params),
                              attempt=attempt, estimate=self.estimator, retry=self.retry,
                              fallback=self.fallback, user=self.user, max_wait=self.max_wait)

    def stream(self, **params: Any) -> StreamCall[Message]:
        """`async for text in adapter.stream(...)`; `.result` once it is exhausted."""
        async def open_stream(p: Params, r: Reservation) -> _AsyncHandle:
            manager = self.client.messages.stream(**p)
            try:
                stream = await manager.__aenter__()
            except Exception as e:
                pe = to_provider_error(e)
                if pe is None:
                    raise
                raise pe from e
            return _AsyncHandle(manager, stream, r.input_tokens)

        return StreamCall(self.limiter, scope=self.scope, params=_check(params),
                          open_stream=open_stream, estimate=self.estimator, retry=self.retry,
                          fallback=self.fallback, user=self.user, max_wait=self.max_wait)


class AnthropicAdapter:
    """`Anthropic` (sync) behind a `SyncLimiter`; same semantics as AsyncAnthropicAdapter."""

    def __init__(self, client: Anthropic, limiter: SyncLimiter, *, scope: str | None = None,
                 salt: str | bytes = DEFAULT_SALT, retry: RetryPolicy | None = None,
                 fallback: FallbackPolicy | None = None,
                 estimator: Callable[[Params], int] = estimate_chars, user: str = "",
                 max_wait: float | None = None) -> None:
        self.client = client.with_options(max_retries=0)
        self.limiter = limiter
        self.scope = scope or scope_for_api_key(client.api_key or "", salt=salt)
        self.retry = retry or RetryPolicy.interactive()
        self.fallback, self.estimator = fallback, estimator
        self.user, self.max_wait = user, max_wait

    def create(self, **params: Any) -> CallResult[Message]:
        def attempt(p: Params, r: SyncReservation) -> Attempt[Message]:
            try:
                raw = self.client.messages.with_raw_response.create(**p)
                msg = raw.parse()
            except Exception as e:
                pe = to_provider_error(e)
                if pe is None:
                    raise
                raise pe from e
            return Attempt(msg, usage_of(msg.usage), _meta(raw))

        return run_call_sync(self.limiter, scope=self.scope, params=_check(params),
                             attempt=attempt, estimate=self.estimator, retry=self.retry,
                             fallback=self.fallback, user=self.user, max_wait=self.max_wait)

    def stream(self, **params: Any) -> SyncStreamCall[Message]:
        def open_stream(p: Params, r: SyncReservation) -> _SyncHandle:
            manager = self.client.messages.stream(**p)
            try:
                stream = manager.__enter__()
            except Exception as e:
                pe = to_provider_error(e)
                if pe is None:
                    raise
                raise pe from e
            return _SyncHandle(manager, stream, r.input_tokens)

        return SyncStreamCall(self.limiter, scope=self.scope, params=_check(params),
                              open_stream=open_stream, estimate=self.estimator,
                              retry=self.retry, fallback=self.fallback, user=self.user,
                              max_wait=self.max_wait)
