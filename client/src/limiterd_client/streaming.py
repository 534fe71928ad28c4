"""Streamed provider calls: retried only while nothing has reached the caller."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import Generic, Protocol, TypeVar

from .errors import LimiterBusy, PartialResponseError, ProviderError, ProviderMeta, Usage
from .fallback import CallResult, FallbackPolicy, Params, Planner, choose, choose_sync
from .limiter import Limiter, Reservation
from .retry import RetryPolicy
from .runner import Estimate, _max_tokens, estimate_async
from .sync import SyncLimiter, SyncReservation

T = TypeVar("T")
T_co = TypeVar("T_co", covariant=True)


class StreamHandle(Protocol[T_co]):
    """One open provider stream. texts() raises ProviderError on failure."""

    def texts(self) -> AsyncIterator[str]: ...
    def usage(self) -> Usage: ...  # best known so far (estimated for a cut-off stream)
    def meta(self) -> ProviderMeta: ...
    async def final(self) -> T_co: ...
    async def close(self) -> None: ...


class SyncStreamHandle(Protocol[T_co]):
    def texts(self) -> Iterator[str]: ...
    def usage(self) -> Usage: ...
    def meta(self) -> ProviderMeta: ...
    def final(self) -> T_co: ...
    def close(self) -> None: ...


class StreamCall(Generic[T]):
    """`async for text in call:` yields text deltas; `call.result` holds the CallResult after.

    Before the first delta any failure is retried (or falls back) like a plain call; after it
    a failure reports the tokens actually used and raises PartialResponseError.
    """

    def __init__(self, limiter: Limiter, *, scope: str, params: Params,
                 open_stream: Callable[[Params, Reservation], Awaitable[StreamHandle[T]]],
                 estimate: Estimate, retry: RetryPolicy, fallback: FallbackPolicy | None = None,
                 user: str = "", max_wait: float | None = None) -> None:
        self._limiter, self._scope, self._params = limiter, scope, params
        self._open, self._estimate, self._retry = open_stream, estimate, retry
        self._fallback, self._user, self._max_wait = fallback, user, max_wait
        self.result: CallResult[T] | None = None
        self.text = ""

    def __aiter__(self) -> AsyncIterator[str]:
        return self._run()

    async def _run(self) -> AsyncIterator[str]:
        retry = self._retry
        planner = Planner(str(self._params.get("model", "")), retry, self._fallback)
        while True:
            p = planner.params_for(self._params)
            tokens_in = await estimate_async(self._estimate, p)
            planner.attempts += 1
            err: ProviderError | LimiterBusy
            try:
                async with self._limiter.reserve(
                        self._scope, planner.model, input_tokens=tokens_in,
                        max_output_tokens=_max_tokens(p), user=self._user,
                        max_wait=planner.acquire_wait(retry.max_elapsed if self._max_wait is None
                                                      else self._max_wait)) as r:
                    r.mark_called()
                    handle: StreamHandle[T] | None = None
                    delivered: list[str] = []
                    try:
                        handle = await self._open(p, r)
                        async for text in handle.texts():
                            delivered.append(text)
                            self.text += text
                            r.record_usage(handle.usage().input_tokens,
                                           handle.usage().output_tokens)
                            yield text
                        value = await handle.final()
                        usage = handle.usage()
                        await r.report(usage.input_tokens, usage.output_tokens,
                                       provider=handle.meta())
                        self.result = CallResult(value, planner.model, tuple(planner.path),
                                                 planner.attempts, usage)
                        return
                    except ProviderError as e:
                        if delivered:
                            used = e.usage or (handle.usage() if handle else Usage())
                            e.usage = used
                            await r.report_error(e)
                            raise PartialResponseError("".join(delivered), used, e) from e
                        err, decision = e, planner.on_error(e)
                        nxt = await choose(planner, decision.hop_reason, e) if (
                            decision.hop_reason) else None
                        await r.report_error(e, fell_back=nxt is not None)
                    finally:
                        if handle is not None:
                            await handle.close()
            except LimiterBusy as e:
                err, decision = e, planner.on_busy(e)
                nxt = (await choose(planner, decision.hop_reason, e) if decision.hop_reason
                       else None)
            if nxt is not None:
                assert decision.hop_reason is not None
                planner.hop(nxt, decision.hop_reason)
                self._limiter.counters.fallbacks += 1
            elif decision.delay is not None:
                await retry.sleep(decision.delay)
            else:
                raise err


class SyncStreamCall(Generic[T]):
    """Blocking twin of StreamCall: `for text in call:`."""

    def __init__(self, limiter: SyncLimiter, *, scope: str, params: Params,
                 open_stream: Callable[[Params, SyncReservation], SyncStreamHandle[T]],
                 estimate: Callable[[Params], int], retry: RetryPolicy,
                 fallback: FallbackPolicy | None = None, user: str = "",
                 max_wait: float | None = None) -> None:
        self._limiter, self._scope, self._params = limiter, scope, params
        self._open, self._estimate, self._retry = open_stream, estimate, retry
        self._fallback, self._user, self._max_wait = fallback, user, max_wait
        self.result: CallResult[T] | None = None
        self.text = ""

    def __iter__(self) -> Iterator[str]:
        return self._run()

    def _run(self) -> Iterator[str]:
        retry = self._retry
        planner = Planner(str(self._params.get("model", "")), retry, self._fallback)
        while True:
            p = planner.params_for(self._params)
            tokens_in = int(self._estimate(p))
            planner.attempts += 1
            err: ProviderError | LimiterBusy
            try:
                with self._limiter.reserve(
                        self._scope, planner.model, input_tokens=tokens_in,
                        max_output_tokens=_max_tokens(p), user=self._user,
                        max_wait=planner.acquire_wait(retry.max_elapsed if self._max_wait is None
                                                      else self._max_wait)) as r:
                    r.mark_called()
                    handle: SyncStreamHandle[T] | None = None
                    delivered: list[str] = []
                    try:
                        handle = self._open(p, r)
                        for text in handle.texts():
                            delivered.append(text)
                            self.text += text
                            r.record_usage(handle.usage().input_tokens,
                                           handle.usage().output_tokens)
                            yield text
                        value = handle.final()
                        usage = handle.usage()
                        r.report(usage.input_tokens, usage.output_tokens, provider=handle.meta())
                        self.result = CallResult(value, planner.model, tuple(planner.path),
                                                 planner.attempts, usage)
                        return
                    except ProviderError as e:
                        if delivered:
                            used = e.usage or (handle.usage() if handle else Usage())
                            e.usage = used
                            r.report_error(e)
                            raise PartialResponseError("".join(delivered), used, e) from e
                        err, decision = e, planner.on_error(e)
                        nxt = choose_sync(planner, decision.hop_reason, e) if (
                            decision.hop_reason) else None
                        r.report_error(e, fell_back=nxt is not None)
                    finally:
                        if handle is not None:
                            handle.close()
            except LimiterBusy as e:
                err, decision = e, planner.on_busy(e)
                nxt = choose_sync(planner, decision.hop_reason, e) if decision.hop_reason else None
            if nxt is not None:
                assert decision.hop_reason is not None
                planner.hop(nxt, decision.hop_reason)
                self._limiter.counters.fallbacks += 1
            elif decision.delay is not None:
                retry.sleep_sync(decision.delay)
            else:
                raise err
