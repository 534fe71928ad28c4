"""Live wait status: what a caller queued at the daemon hears while it waits (AcquireStream)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from .errors import LimiterBusy
from .proto.limiter.v1 import limiter_pb2 as pb


@dataclass(frozen=True)
class WaitUpdate:
    """Where a waiting caller stands (a Queued event of AcquireStream)."""

    position: int  # 1 = next in line for the buckets it needs
    estimated_wait_s: float  # from refill rates and the demand queued ahead
    queue_depth: int  # callers waiting on those buckets
    waited_s: float
    model_overloaded: bool  # the daemon saw many OVERLOADED outcomes on this model lately

    @classmethod
    def of(cls, q: pb.Queued) -> WaitUpdate:
        return cls(q.position, q.estimated_wait_ms / 1000, q.queue_depth, q.waited_ms / 1000,
                   q.model_overloaded)


WaitCallback = Callable[[WaitUpdate], "None | Awaitable[None]"]
SyncWaitCallback = Callable[[WaitUpdate], None]


class WaitTooLong(LimiterBusy):
    """The daemon's estimate exceeds the caller's wait budget: it gave up its place at once."""


class ModelOverloadedHint(LimiterBusy):
    """The daemon marks the model overloaded and the caller asked to fall back on that hint."""


@dataclass(frozen=True)
class WaitGate:
    """When to give up a wait early: `budget` (s) against the estimate, and/or the overload
    hint. Shared by the async and the sync limiter."""

    budget: float | None = None
    overloaded_hint: bool = False

    def __post_init__(self) -> None:
        if self.budget is not None and self.budget < 0:
            raise ValueError("wait_budget: must be >= 0")

    def check(self, u: WaitUpdate, elapsed: float) -> LimiterBusy | None:
        if self.overloaded_hint and u.model_overloaded:
            return ModelOverloadedHint("the daemon marks this model overloaded", None)
        if self.budget is not None and u.estimated_wait_s > self.budget - elapsed:
            return WaitTooLong(
                f"estimated wait {u.estimated_wait_s:.1f}s exceeds the wait budget "
                f"{self.budget:.1f}s", round(u.estimated_wait_s * 1000))
        return None

    def check_grant(self, resp: pb.AcquireResponse) -> LimiterBusy | None:
        if self.overloaded_hint and resp.model_overloaded:
            return ModelOverloadedHint("the daemon marks this model overloaded",
                                       None)
        return None
