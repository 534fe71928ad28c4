"""One logical provider call: reserve, call, report, retry or fall back, until done."""

from __future__ import annotations

import inspect
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Generic, TypeVar

from .errors import LimiterBusy, ProviderError, ProviderMeta, Usage
from .fallback import CallResult, FallbackPolicy, Params, Planner, choose, choose_sync
from .limiter import Limiter, Reservation
from .retry import RetryPolicy
from .sync import SyncLimiter, SyncReservation
from .wait import SyncWaitCallback, WaitCallback

T = TypeVar("T")


@dataclass(frozen=True)
class Attempt(Generic[T]):
    """A successful provider answer with its usage and what the provider said."""

    value: T
    usage: Usage
    meta: ProviderMeta


Estimate = Callable[[Params], "int | Awaitable[int]"]


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
) -> CallResult[T]:
    """Each attempt reserves against its own model and reports its outcome to the daemon.
    While a fallback remains, a live estimate beyond `limiter_wait` (or the overload hint,
    if asked for) hops at once; `on_wait` hears every WaitUpdate of every attempt."""
    planner = Planner(str(params.get("model", "")), retry, fallback)
    while True:
        p = planner.params_for(params)
        tokens_in = await estimate_async(estimate, p)
        gate = planner.wait_gate()
        planner.attempts += 1
        err: ProviderError | LimiterBusy
        try:
            async with limiter.reserve(
                    scope, planner.model, input_tokens=tokens_in, max_output_tokens=_max_tokens(p),
                    max_wait=planner.acquire_wait(retry.max_elapsed if max_wait is None
                                                  else max_wait), user=user,
                    on_wait=on_wait, wait_budget=gate.budget,
                    overloaded_hint=gate.overloaded_hint) as r:
                r.mark_called()
                try:
                    done = await attempt(p, r)
                except ProviderError as e:
                    err, decision = e, planner.on_error(e)
                    nxt = await choose(planner, decision.hop_reason, e) if (
                        decision.hop_reason) else None
                    await r.report_error(e, fell_back=nxt is not None)
                else:
                    await r.report(done.usage.input_tokens, done.usage.output_tokens,
                                   provider=done.meta)
                    return CallResult(done.value, planner.model, tuple(planner.path),
                                      planner.attempts, done.usage)
        except LimiterBusy as e:
            err, decision = e, planner.on_busy(e)
            nxt = await choose(planner, decision.hop_reason, e) if decision.hop_reason else None
        if nxt is not None:
            assert decision.hop_reason is not None
            planner.hop(nxt, decision.hop_reason)
            limiter.counters.fallbacks += 1
        elif decision.delay is not None:
            await retry.sleep(decision.delay)
        else:
            raise err


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
) -> CallResult[T]:
    """Blocking twin of run_call."""
    planner = Planner(str(params.get("model", "")), retry, fallback)
    while True:
        p = planner.params_for(params)
        tokens_in = int(estimate(p))
        gate = planner.wait_gate()
        planner.attempts += 1
        err: ProviderError | LimiterBusy
        try:
            with limiter.reserve(
                    scope, planner.model, input_tokens=tokens_in, max_output_tokens=_max_tokens(p),
                    max_wait=planner.acquire_wait(retry.max_elapsed if max_wait is None
                                                  else max_wait), user=user,
                    on_wait=on_wait, wait_budget=gate.budget,
                    overloaded_hint=gate.overloaded_hint) as r:
                r.mark_called()
                try:
                    done = attempt(p, r)
                except ProviderError as e:
                    err, decision = e, planner.on_error(e)
                    nxt = choose_sync(planner, decision.hop_reason, e) if (
                        decision.hop_reason) else None
                    r.report_error(e, fell_back=nxt is not None)
                else:
                    r.report(done.usage.input_tokens, done.usage.output_tokens,
                             provider=done.meta)
                    return CallResult(done.value, planner.model, tuple(planner.path),
                                      planner.attempts, done.usage)
        except LimiterBusy as e:
            err, decision = e, planner.on_busy(e)
            nxt = choose_sync(planner, decision.hop_reason, e) if decision.hop_reason else None
        if nxt is not None:
            assert decision.hop_reason is not None
            planner.hop(nxt, decision.hop_reason)
            limiter.counters.fallbacks += 1
        elif decision.delay is not None:
            retry.sleep_sync(decision.delay)
        else:
            raise err
