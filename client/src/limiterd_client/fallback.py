"""Fallback across a chain of models, and the per-call planner shared by every call loop."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Generic, Literal, TypeVar

from .errors import LimiterBusy, LimiterError, LimiterRejected, ProviderError, Usage
from .retry import RetryPolicy
from .wait import ModelOverloadedHint, WaitGate, WaitTooLong

T = TypeVar("T")
Params = dict[str, Any]


@dataclass(frozen=True)
class FallbackTriggers:
    """When to leave a model for the next one in the chain (None/False = never)."""

    overloaded_after: int | None = 2  # this many overloaded (529) attempts on one model
    rate_limited_beyond: float | None = 20.0  # a 429 whose Retry-After exceeds this (s)
    limiter_wait: float | None = 5.0  # the limiter could not grant within this budget (s)
    # ...or, at once, the daemon's live estimate already exceeds that budget (AcquireStream)
    limiter_wait_estimate: bool = True
    overloaded_hint: bool = False  # the daemon marks the model overloaded: hop before calling
    timeouts: bool = True  # the provider call timed out (408/504/client timeout)
    exhausted: bool = True  # retries on a model ran out on a retryable error
    too_large: bool = True  # the request can never fit this model's limits (e.g. 46k input
    # tokens against a 30k-per-minute model): try the next, which may allow more


@dataclass(frozen=True)
class HopProposal:
    """Passed to the ask callback: it returns one of `candidates`, or None to veto."""

    from_model: str
    reason: str
    candidates: tuple[str, ...]
    error: ProviderError | LimiterError


AskCallback = Callable[[HopProposal], "str | None | Awaitable[str | None]"]


@dataclass(frozen=True)
class FallbackPolicy:
    """An ordered chain of models, e.g. ("claude-opus-4-1", "claude-sonnet-4-5",
    "claude-haiku-4-5"). mode="auto" hops to the next model; mode="ask" asks `ask`.
    `adjust[model]` may rewrite the request for that model (e.g. a smaller max_tokens)."""

    chain: tuple[str, ...]
    triggers: FallbackTriggers = FallbackTriggers()
    mode: Literal["auto", "ask"] = "auto"
    ask: AskCallback | None = None
    adjust: Mapping[str, Callable[[Params], Params]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.chain or any(not m for m in self.chain):
            raise ValueError("chain: needs at least one non-empty model name")
        if len(set(self.chain)) != len(self.chain):
            raise ValueError("chain: model names must be unique")
        if self.mode not in ("auto", "ask"):
            raise ValueError("mode: must be 'auto' or 'ask'")
        if self.mode == "ask" and self.ask is None:
            raise ValueError("ask: required when mode='ask'")
        unknown = set(self.adjust) - set(self.chain)
        if unknown:
            raise ValueError(f"adjust: models not in the chain: {sorted(unknown)}")


@dataclass(frozen=True)
class Hop:
    from_model: str
    to_model: str
    reason: str  # overloaded, overloaded_hint, rate_limited, limiter_wait, too_large, timeout,
    # exhausted


@dataclass(frozen=True)
class CallResult(Generic[T]):
    """What served the call: the value, the model, the hops taken to get there."""

    value: T
    model: str
    path: tuple[Hop, ...]
    attempts: int
    usage: Usage

    @property
    def fell_back(self) -> bool:
        return bool(self.path)

    @property
    def models_tried(self) -> tuple[str, ...]:
        return (self.path[0].from_model, *(h.to_model for h in self.path)) if self.path else (
            self.model,)


@dataclass(frozen=True)
class Decision:
    hop_reason: str | None  # propose a hop
    delay: float | None  # else (or if vetoed) retry the same model after this many seconds


class Planner:
    """State of one logical call across attempts and hops; pure decisions, no I/O."""

    def __init__(self, model: str, retry: RetryPolicy, fallback: FallbackPolicy | None) -> None:
        if fallback is not None and model not in fallback.chain:
            raise ValueError(f"model: {model!r} is not in the fallback chain {fallback.chain}")
        self.retry = retry
        self.fallback = fallback
        self.model = model
        self.start = retry.clock()
        self.attempts = 0
        self.failures = 0
        self.overloaded = 0
        self.path: list[Hop] = []
        self.too_large: list[str] = []  # why each model that can never hold it refused

    def models_tried(self) -> tuple[str, ...]:
        return (self.path[0].from_model, *(h.to_model for h in self.path)) if self.path else (
            self.model,)

    def elapsed(self) -> float:
        return self.retry.clock() - self.start

    def remaining(self) -> float:
        return max(0.0, self.retry.max_elapsed - self.elapsed())

    def candidates(self) -> tuple[str, ...]:
        if self.fallback is None:
            return ()
        chain = self.fallback.chain
        return chain[chain.index(self.model) + 1:]

    def params_for(self, base: Params) -> Params:
        params = {**base, "model": self.model}
        if self.fallback is not None and self.model in self.fallback.adjust:
            params = self.fallback.adjust[self.model](dict(params))
            params["model"] = self.model
        return params

    def acquire_wait(self, max_wait: float) -> float:
        """How long Acquire may wait: the fallback budget while a fallback remains."""
        wait = max_wait
        if self.candidates() and self.fallback and self.fallback.triggers.limiter_wait is not None:
            wait = min(wait, self.fallback.triggers.limiter_wait)
        return min(wait, self.remaining())

    def wait_gate(self) -> WaitGate:
        """When Acquire should give up early: only while a fallback remains."""
        if not self.candidates() or self.fallback is None:
            return WaitGate()
        t = self.fallback.triggers
        budget = t.limiter_wait if t.limiter_wait_estimate else None
        return WaitGate(None if budget is None else min(budget, self.remaining()),
                        t.overloaded_hint)

    def on_error(self, err: ProviderError) -> Decision:
        self.failures += 1
        if err.overloaded:
            self.overloaded += 1
        delay = self.retry.delay(err, self.failures, self.elapsed())
        reason = self._hop_reason(err, delay)
        return Decision(reason, delay)

    def _hop_reason(self, err: ProviderError, delay: float | None) -> str | None:
        if not self.candidates() or self.fallback is None or self.remaining() <= 0:
            return None
        t = self.fallback.triggers
        if err.overloaded and t.overloaded_after is not None and self.overloaded >= (
                t.overloaded_after):
            return "overloaded"
        if (err.rate_limited and err.retryable and t.rate_limited_beyond is not None
                and err.retry_after_ms is not None
                and err.retry_after_ms / 1000 > t.rate_limited_beyond):
            return "rate_limited"
        if err.timeout and t.timeouts:
            return "timeout"
        if delay is None and err.retryable and t.exhausted:
            return "exhausted"
        return None

    def on_limiter(self, err: LimiterBusy | LimiterRejected) -> Decision:
        """The limiter did not grant: busy (wait, hop on the wait trigger) or never (hop)."""
        self.failures += 1
        can_hop = bool(self.candidates()) and self.fallback is not None and (
            self.remaining() > 0)
        t = self.fallback.triggers if self.fallback is not None else None
        if isinstance(err, LimiterRejected):
            self.too_large.append(f"{self.model}: {err}")
            return Decision("too_large" if can_hop and t and t.too_large else None, None)
        reason = None
        if can_hop and isinstance(err, ModelOverloadedHint):
            reason = "overloaded_hint"
        elif can_hop and (isinstance(err, WaitTooLong) or (
                t is not None and t.limiter_wait is not None)):
            reason = "limiter_wait"
        delay = None
        if self.failures < self.retry.max_attempts:
            delay = self.retry.wait_within(err.retry_after_ms, self.failures, self.elapsed())
        return Decision(reason, delay)

    def reason_of(self, err: ProviderError | LimiterError) -> str:
        """A short name for why an attempt failed (for events and messages)."""
        if isinstance(err, ProviderError):
            if err.rate_limited:
                return "rate_limited"
            if err.overloaded:
                return "overloaded"
            if err.timeout:
                return "timeout"
            return f"http_{err.status}" if err.status else (err.code or "error")
        if isinstance(err, LimiterRejected):
            return "too_large"
        return "limiter_wait"

    def give_up(self, err: ProviderError | LimiterError) -> str:
        """Why the call ends with `err`: said in its message (and `err.gave_up`), with the
        models tried, so a person can act on it."""
        r = self.retry
        left = r.max_elapsed - self.elapsed()
        retry_ms: int | None = getattr(err, "retry_after_ms", None)
        after = retry_ms / 1000 if retry_ms is not None else None
        if isinstance(err, LimiterRejected):
            why = ("no model tried can ever hold this request (" + "; ".join(self.too_large)
                   + "). Raise the limit in the daemon's config (limiterd serve --config "
                   "FILE; the built-in limits are Anthropic's Tier 1), or add a model with a "
                   "larger limit to the fallback chain")
        elif isinstance(err, ProviderError) and not err.retryable:
            why = f"the provider's answer is not retryable ({self.reason_of(err)})"
        elif after is not None and after > left:
            why = (f"Retry-After {after:.1f} s is longer than the {max(0.0, left):.1f} s left "
                   f"of max_elapsed={r.max_elapsed:g} s")
        elif left <= 0:
            why = f"max_elapsed={r.max_elapsed:g} s is used up"
        else:
            why = f"{self.failures} of max_attempts={r.max_attempts} attempts used"
        tried = " -> ".join(self.models_tried())
        text = f"gave up after {self.attempts} attempts (models tried: {tried}): {why}"
        err.gave_up = text
        err.models_tried = self.models_tried()
        if err.args and isinstance(err.args[0], str) and "gave up after" not in err.args[0]:
            err.args = (f"{err.args[0]} [{text}]", *err.args[1:])
        return why

    def proposal(self, reason: str, err: ProviderError | LimiterError) -> HopProposal:
        return HopProposal(self.model, reason, self.candidates(), err)

    def auto_choice(self, proposal: HopProposal) -> str | None:
        assert self.fallback is not None
        return proposal.candidates[0] if self.fallback.mode == "auto" else None

    def check_choice(self, proposal: HopProposal, choice: str | None) -> str | None:
        if choice is not None and choice not in proposal.candidates:
            raise ValueError(f"ask: returned {choice!r}, not one of {proposal.candidates}")
        return choice

    def hop(self, to_model: str, reason: str) -> None:
        self.path.append(Hop(self.model, to_model, reason))
        self.model = to_model
        self.failures = 0
        self.overloaded = 0
