"""The `anthropic` SDK behind the limiter. Optional: `anthropic` is imported only when used.

The SDK's own retries are turned off (max_retries=0): the RetryPolicy retries, and every
attempt is reserved and reported, so retries are never multiplied.
"""

from __future__ import annotations

import contextlib
import json
import math
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Mapping
from typing import TYPE_CHECKING, Any, cast

from ._runtime import each, maybe_await, run_sync
from .errors import (
    ProviderError,
    ProviderMeta,
    Usage,
    classify_http,
    connection_error,
    reported_headers,
)
from .fallback import CallResult, FallbackPolicy, Params
from .hooks import CallEvent, OnEvent
from .limiter import Limiter
from .retry import RetryPolicy
from .runner import (
    Attempt,
    CallLoop,
    Done,
    StreamCall,
    StreamHandle,
    SyncStreamCall,
    drain,
)
from .scope import DEFAULT_SALT, scope_for_api_key
from .sync import SyncLimiter

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


@contextlib.contextmanager
def _provider_errors(usage: _Usage | None = None) -> Iterator[None]:
    """SDK and transport exceptions become ProviderError (with the usage so far, mid-stream):
    the one place the adapter converts them."""
    try:
        yield
    except ProviderError:
        raise
    except Exception as e:
        pe = to_provider_error(e)
        if pe is None:
            raise
        if usage is not None:
            pe.usage = usage.get()
        raise pe from e


class _Handle:
    """One open `messages.stream` (async or sync SDK) as the call loop's stream handle."""

    def __init__(self, manager: Any, stream: Any, estimated_input: int) -> None:
        self._manager, self._stream = manager, stream
        self._usage = _Usage(stream, estimated_input)

    def usage(self) -> Usage:
        return self._usage.get()

    def meta(self) -> ProviderMeta:
        return _meta(self._stream.response)

    async def texts(self) -> AsyncIterator[str]:
        with _provider_errors(self._usage):
            async for text in each(self._stream.text_stream):
                self._usage.text += text
                yield text

    async def final(self) -> Message:
        msg = await maybe_await(self._stream.get_final_message())
        self._usage.complete = True
        return cast("Message", msg)

    async def close(self) -> None:
        if hasattr(self._manager, "__aexit__"):
            await self._manager.__aexit__(None, None, None)
        else:
            self._manager.__exit__(None, None, None)


def _scope(client: Any, scope: str | None, salt: str | bytes) -> str:
    if scope:
        return scope
    if not client.api_key:
        raise ValueError(
            "scope: this client has no api_key (auth_token only), so no scope can be derived "
            "from it: pass scope=... naming what the provider counts limits against (your "
            "organization or workspace; several keys may share one), e.g. "
            "scope_for_api_key('<org or workspace id>')")
    return scope_for_api_key(client.api_key, salt=salt)


class _Adapter:
    """What both adapters share: one attempt and one stream opener for either SDK client,
    driven by the one call loop."""

    _sync: bool

    def __init__(self, client: Any, limiter: Any, *, scope: str | None,
                 salt: str | bytes, retry: RetryPolicy | None,
                 fallback: FallbackPolicy | None, estimator: Any, user: str,
                 max_wait: float | None, on_event: Any) -> None:
        self.client = client.with_options(max_retries=0)
        self.limiter = limiter
        self.scope = _scope(client, scope, salt)
        self.retry = retry or RetryPolicy.interactive()
        self.fallback, self.estimator = fallback, estimator
        self.user, self.max_wait, self.on_event = user, max_wait, on_event

    async def _attempt(self, p: Params, r: Any) -> StreamHandle[Message]:
        with _provider_errors():
            raw = await maybe_await(self.client.messages.with_raw_response.create(**p))
            msg = await maybe_await(raw.parse())
        return Done(Attempt(msg, usage_of(msg.usage), _meta(raw)))

    async def _open_stream(self, p: Params, r: Any) -> StreamHandle[Message]:
        manager = self.client.messages.stream(**p)
        with _provider_errors():
            stream = await maybe_await(manager.__aenter__() if hasattr(manager, "__aenter__")
                                  else manager.__enter__())
        return _Handle(manager, stream, r.input_tokens)

    def _loop(self, params: Params, streamed: bool) -> CallLoop[Message]:
        return CallLoop(self.limiter, scope=self.scope, params=_check(params),
                        open_attempt=self._open_stream if streamed else self._attempt,
                        estimate=self.estimator, retry=self.retry, fallback=self.fallback,
                        user=self.user, max_wait=self.max_wait, on_event=self.on_event,
                        streamed=streamed)


def _check_pair(adapter: str, client: Any, limiter: Any, sync: bool) -> None:
    """Mixing the sync and the async worlds fails deep inside grpc or the SDK: say so here."""
    limiter_ok = isinstance(limiter, SyncLimiter if sync else Limiter)
    # AsyncAnthropic, AsyncAnthropicBedrock, AsyncAnthropicVertex...
    client_async = type(client).__name__.startswith("Async")
    if not limiter_ok or client_async == sync:
        if sync:
            raise TypeError(f"{adapter} is the synchronous adapter: give it anthropic."
                            "Anthropic and SyncLimiter (for AsyncAnthropic and Limiter use "
                            "AsyncAnthropicAdapter)")
        raise TypeError(f"{adapter} is the asyncio adapter: give it anthropic.AsyncAnthropic "
                        "and Limiter (for Anthropic and SyncLimiter use AnthropicAdapter)")


class AsyncAnthropicAdapter(_Adapter):
    """`AsyncAnthropic` behind a `Limiter`.

    result = await adapter.create(model=..., max_tokens=..., messages=[...])
    result.value is the SDK's Message; result.model / result.path say who served it.
    `on_event` (sync or async) hears every retry, fallback, give-up and limiter wait.
    """

    def __init__(self, client: AsyncAnthropic, limiter: Limiter, *, scope: str | None = None,
                 salt: str | bytes = DEFAULT_SALT, retry: RetryPolicy | None = None,
                 fallback: FallbackPolicy | None = None,
                 estimator: Callable[[Params], int | Awaitable[int]] = estimate_chars,
                 user: str = "", max_wait: float | None = None,
                 on_event: OnEvent | None = None) -> None:
        _check_pair("AsyncAnthropicAdapter", client, limiter, sync=False)
        super().__init__(client, limiter, scope=scope, salt=salt, retry=retry,
                         fallback=fallback, estimator=estimator, user=user, max_wait=max_wait,
                         on_event=on_event)

    async def create(self, **params: Any) -> CallResult[Message]:
        return await drain(self._loop(params, streamed=False))

    def stream(self, **params: Any) -> StreamCall[Message]:
        """`async for text in adapter.stream(...)`; `.result` once it is exhausted."""
        return StreamCall.of(self._loop(params, streamed=True))


class AnthropicAdapter(_Adapter):
    """`Anthropic` (sync) behind a `SyncLimiter`; same semantics as AsyncAnthropicAdapter."""

    def __init__(self, client: Anthropic, limiter: SyncLimiter, *, scope: str | None = None,
                 salt: str | bytes = DEFAULT_SALT, retry: RetryPolicy | None = None,
                 fallback: FallbackPolicy | None = None,
                 estimator: Callable[[Params], int] = estimate_chars, user: str = "",
                 max_wait: float | None = None,
                 on_event: Callable[[CallEvent], None] | None = None) -> None:
        _check_pair("AnthropicAdapter", client, limiter, sync=True)
        super().__init__(client, limiter, scope=scope, salt=salt, retry=retry,
                         fallback=fallback, estimator=estimator, user=user, max_wait=max_wait,
                         on_event=on_event)

    def create(self, **params: Any) -> CallResult[Message]:
        return run_sync(drain(self._loop(params, streamed=False)))

    def stream(self, **params: Any) -> SyncStreamCall[Message]:
        return SyncStreamCall.of(self._loop(params, streamed=True))
