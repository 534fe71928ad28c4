"""One logical provider call: reserve, call, report, retry or fall back, until done.

There is one attempt loop (`CallLoop.run`) for plain and streamed calls, async and sync, so
the retry, fallback, wait-gate and reporting rules cannot drift between them. A plain call is
a stream that yields no text. The sync faces drive the same loop without an event loop.
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from typing import Any, Generic, Protocol, Self, TypeVar

from ._runtime import iterate_sync, run_sync
from .errors import (
    LimiterBusy,
    LimiterError,
    LimiterRejected,
    PartialResponseError,
    ProviderError,
    ProviderMeta,
    Usage,
)
from .fallback import CallResult, FallbackPolicy, Params, Planner
from .hooks import CallEvent, OnEvent, call_span, emit
from .limiter import Limiter, LimiterCore, Reservation, ReservationCore
from .retry import RetryPolicy
from .sync import SyncLimiter, SyncReservation
from .wait import SyncWaitCallback, WaitCallback, WaitUpdate

T = TypeVar("T")
T_co = TypeVar("T_co", covariant=True)


@dataclass(frozen=True)
class Attempt(Generic[T]):
    """A successful provider answer with its usage and what the provider said."""

    value: T
    usage: Usage
    meta: ProviderMeta


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


class Done(Generic[T]):
    """A plain call's answer seen as a stream with no text."""

    def __init__(self, done: Attempt[T]) -> None:
        self._done = done

    async def texts(self) -> AsyncIterator[str]:
        return
        yield  # an async generator that yields nothing

    def usage(self) -> Usage:
        return self._done.usage

    def meta(self) -> ProviderMeta:
        return self._done.meta

    async def final(self) -> T:
        return self._done.value

    async def close(self) -> None:
        return None


class _SyncHandle(Generic[T]):
    """A SyncStreamHandle seen through the async protocol (each step blocks)."""

    def __init__(self, handle: SyncStreamHandle[T]) -> None:
        self._h = handle

    async def texts(self) -> AsyncIterator[str]:
        for text in self._h.texts():
            yield text

    def usage(self) -> Usage:
        return self._h.usage()

    def meta(self) -> ProviderMeta:
        return self._h.meta()

    async def final(self) -> T:
        return self._h.final()

    async def close(self) -> None:
        self._h.close()


Estimate = Callable[[Params], "int | Awaitable[int]"]
Open = Callable[[Params, Any], Awaitable[StreamHandle[T]]]


async def estimate_async(estimate: Estimate, params: Params) -> int:
    n = estimate(params)
    if inspect.isawaitable(n):
        n = await n
    return int(n)


def _max_tokens(params: Params) -> int:
    value = params.get("max_tokens", 0)
    if not isinstance(value, int) or value < 0:
        raise ValueError("max_tokens: must be a non-negative integer")
    return value


class CallLoop(Generic[T]):
    """The attempt loop. `run()` yields text deltas (none for a plain call); `result` holds
    the CallResult once it ends. Before the first delta any failure is retried (or falls
    back); after it a failure reports the tokens used and raises PartialResponseError."""

    def __init__(self, limiter: LimiterCore[Any], *, scope: str, params: Params,
                 open_attempt: Open[T], estimate: Estimate, retry: RetryPolicy,
                 fallback: FallbackPolicy | None = None, user: str = "",
                 max_wait: float | None = None, on_wait: Any = None,
                 on_event: OnEvent | None = None, streamed: bool = False) -> None:
        self._limiter, self._scope, self._params = limiter, scope, params
        self._open, self._estimate, self._retry = open_attempt, estimate, retry
        self._fallback, self._user, self._max_wait = fallback, user, max_wait
        self._on_wait, self._on_event, self._streamed = on_wait, on_event, streamed
        self._sync = limiter._rt.sync
        self.result: CallResult[T] | None = None
        self.text = ""

    async def run(self) -> AsyncIterator[str]:
        planner = Planner(str(self._params.get("model", "")), self._retry, self._fallback)
        with call_span(planner.model, self._streamed) as span:
            self._span = span
            # closed explicitly: a consumer that stops early must settle the attempt now
            async with contextlib.aclosing(self._attempts(planner)) as attempts:
                async for text in attempts:
                    yield text
            if span is not None and self.result is not None:
                span.set_attributes({"limiterd.model": self.result.model,
                                     "limiterd.attempts": self.result.attempts,
                                     "limiterd.fell_back": self.result.fell_back})

    async def _event(self, planner: Planner, kind: Any, **kw: Any) -> None:
        await emit(self._on_event, self._span,
                   CallEvent(kind, planner.model, planner.attempts, **kw))

    def _waiter(self, planner: Planner) -> Any:
        """on_wait for one attempt: the app's callback, plus a limiter_wait event (hearing
        waits makes Acquire a stream, so only when someone listens)."""
        if self._on_wait is None and self._on_event is None:
            return None

        async def heard(update: WaitUpdate) -> None:
            if self._on_wait is not None:
                done = self._on_wait(update)
                if inspect.isawaitable(done):
                    await done
            await self._event(planner, "limiter_wait", wait=update)
        return heard

    async def _attempts(self, planner: Planner) -> AsyncGenerator[str, None]:
        retry = self._retry
        while True:
            p = planner.params_for(self._params)
            tokens_in = await estimate_async(self._estimate, p)
            gate = planner.wait_gate()
            planner.attempts += 1
            err: ProviderError | LimiterError
            limiter: Any = self._limiter  # a Limiter or a SyncLimiter: same reserve()
            r: ReservationCore = limiter.reserve(
                self._scope, planner.model, input_tokens=tokens_in,
                max_output_tokens=_max_tokens(p),
                max_wait=planner.acquire_wait(retry.max_elapsed if self._max_wait is None
                                              else self._max_wait),
                user=self._user, on_wait=self._waiter(planner), wait_budget=gate.budget,
                overloaded_hint=gate.overloaded_hint, marks_sent=True)
            try:
                await r._enter()
            except (LimiterBusy, LimiterRejected) as e:
                err, decision = e, planner.on_limiter(e)
                nxt = await self._choose(planner, decision.hop_reason, e)
            else:
                exc: BaseException | None = None
                try:
                    r.mark_called()
                    handle = await self._open(p, r)
                    try:
                        delivered = False
                        async for text in handle.texts():
                            delivered = True
                            self.text += text
                            used = handle.usage()
                            r.record_usage(used.input_tokens, used.output_tokens)
                            yield text
                        value = await handle.final()
                        usage = handle.usage()
                    except ProviderError as e:
                        if not delivered:
                            raise
                        e.usage = e.usage or handle.usage()
                        await r._report_error(e)
                        raise PartialResponseError(self.text, e.usage, e) from e
                    finally:
                        await handle.close()
                    await r._report(usage.input_tokens, usage.output_tokens,
                                    provider=handle.meta())
                    self.result = CallResult(value, planner.model, tuple(planner.path),
                                             planner.attempts, usage)
                    return
                except ProviderError as e:
                    err, decision, nxt = e, planner.on_error(e), None
                    try:
                        nxt = await self._choose(planner, decision.hop_reason, e)
                    finally:  # reported even when the ask callback fails
                        await r._report_error(e, fell_back=nxt is not None)
                except BaseException as e:
                    exc = e
                    raise
                finally:
                    await r._exit(exc)
            if nxt is not None:
                assert decision.hop_reason is not None
                await self._event(planner, "fallback", reason=decision.hop_reason,
                                  to_model=nxt, error=err)
                planner.hop(nxt, decision.hop_reason)
                self._limiter.counters.fallbacks += 1
            elif decision.delay is not None:
                await self._event(planner, "retry", reason=planner.reason_of(err),
                                  delay_s=decision.delay, error=err)
                if self._sync:
                    retry.sleep_sync(decision.delay)
                else:
                    await retry.sleep(decision.delay)
            else:
                why = planner.give_up(err)
                await self._event(planner, "give_up", reason=why, error=err)
                raise err.with_traceback(err.__traceback__)

    async def _choose(self, planner: Planner, reason: str | None,
                      err: ProviderError | LimiterError) -> str | None:
        """Auto mode picks the next model; ask mode asks the app (sync or async callback)."""
        if reason is None:
            return None
        proposal = planner.proposal(reason, err)
        assert planner.fallback is not None
        if planner.fallback.mode == "auto":
            return planner.auto_choice(proposal)
        assert planner.fallback.ask is not None
        answer = planner.fallback.ask(proposal)
        if inspect.isawaitable(answer):
            if self._sync:
                raise TypeError("ask: the sync client needs a sync callback")
            answer = await answer
        return planner.check_choice(proposal, answer)


class _Streamed(Generic[T]):
    """What both stream faces share: the loop, its text so far and its result."""

    _loop: CallLoop[T]

    @property
    def result(self) -> CallResult[T] | None:
        return self._loop.result

    @property
    def text(self) -> str:
        return self._loop.text

    @classmethod
    def of(cls, loop: CallLoop[T]) -> Self:
        """A stream face over a prepared loop (the adapters build theirs)."""
        call = cls.__new__(cls)
        call._loop = loop
        return call


class StreamCall(_Streamed[T]):
    """`async for text in call:` yields text deltas; `call.result` holds the CallResult after.

    Before the first delta any failure is retried (or falls back) like a plain call; after it
    a failure reports the tokens actually used and raises PartialResponseError.
    """

    def __init__(self, limiter: Limiter, *, scope: str, params: Params,
                 open_stream: Callable[[Params, Reservation], Awaitable[StreamHandle[T]]],
                 estimate: Estimate, retry: RetryPolicy, fallback: FallbackPolicy | None = None,
                 user: str = "", max_wait: float | None = None,
                 on_wait: WaitCallback | None = None, on_event: OnEvent | None = None) -> None:
        self._loop = CallLoop(limiter, scope=scope, params=params, open_attempt=open_stream,
                              estimate=estimate, retry=retry, fallback=fallback, user=user,
                              max_wait=max_wait, on_wait=on_wait, on_event=on_event,
                              streamed=True)

    def __aiter__(self) -> AsyncIterator[str]:
        return self._loop.run()


class SyncStreamCall(_Streamed[T]):
    """Blocking twin of StreamCall: `for text in call:`."""

    def __init__(self, limiter: SyncLimiter, *, scope: str, params: Params,
                 open_stream: Callable[[Params, SyncReservation], SyncStreamHandle[T]],
                 estimate: Callable[[Params], int], retry: RetryPolicy,
                 fallback: FallbackPolicy | None = None, user: str = "",
                 max_wait: float | None = None, on_wait: SyncWaitCallback | None = None,
                 on_event: Callable[[CallEvent], None] | None = None) -> None:
        async def open_attempt(p: Params, r: SyncReservation) -> StreamHandle[T]:
            return _SyncHandle(open_stream(p, r))

        self._loop = CallLoop(limiter, scope=scope, params=params, open_attempt=open_attempt,
                              estimate=estimate, retry=retry, fallback=fallback, user=user,
                              max_wait=max_wait, on_wait=on_wait, on_event=on_event,
                              streamed=True)

    def __iter__(self) -> Iterator[str]:
        return iterate_sync(self._loop.run())


async def drain(loop: CallLoop[T]) -> CallResult[T]:
    async for _ in loop.run():
        pass
    assert loop.result is not None
    return loop.result


async def run_call(
    limiter: Limiter,
    *,
    scope: str,
    params: Params,
    attempt: Callable[[Params, Reservation], Awaitable[Attempt[T]]],
    estimate: Estimate,
    retry: RetryPolicy,
    fallback: FallbackPolicy | None = None,
    user: str = "",
    max_wait: float | None = None,
    on_wait: WaitCallback | None = None,
    on_event: OnEvent | None = None,
) -> CallResult[T]:
    """Each attempt reserves against its own model and reports its outcome to the daemon.
    While a fallback remains, a live estimate beyond `limiter_wait` (or the overload hint,
    if asked for) hops at once; `on_wait` hears every WaitUpdate of every attempt, and
    `on_event` every retry, fallback, give-up and limiter wait."""
    async def open_attempt(p: Params, r: Reservation) -> StreamHandle[T]:
        return Done(await attempt(p, r))

    return await drain(CallLoop(limiter, scope=scope, params=params,
                                 open_attempt=open_attempt, estimate=estimate, retry=retry,
                                 fallback=fallback, user=user, max_wait=max_wait,
                                 on_wait=on_wait, on_event=on_event))


def run_call_sync(
    limiter: SyncLimiter,
    *,
    scope: str,
    params: Params,
    attempt: Callable[[Params, SyncReservation], Attempt[T]],
    estimate: Callable[[Params], int],
    retry: RetryPolicy,
    fallback: FallbackPolicy | None = None,
    user: str = "",
    max_wait: float | None = None,
    on_wait: SyncWaitCallback | None = None,
    on_event: Callable[[CallEvent], None] | None = None,
) -> CallResult[T]:
    """Blocking twin of run_call (the same loop, driven without an event loop)."""
    async def open_attempt(p: Params, r: SyncReservation) -> StreamHandle[T]:
        return Done(attempt(p, r))

    return run_sync(drain(CallLoop(limiter, scope=scope, params=params,
                                    open_attempt=open_attempt, estimate=estimate,
                                    retry=retry, fallback=fallback, user=user,
                                    max_wait=max_wait, on_wait=on_wait, on_event=on_event)))
