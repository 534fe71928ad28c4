"""Token buckets with continuous refill, the model Anthropic describes for its own limits.

A bucket holds up to its per-minute limit and refills at limit/60 per second. A level may go
negative (debt from an overrun reported after the fact); later grants wait until it refills.
Debt is bounded: a level never goes below minus one capacity, so whatever a Report claims,
the longest it can hold a bucket shut is two minutes (a mistaken or hostile report of 10^12
tokens must not lock a key out for centuries). The provider's own window is a minute; more
debt than a minute's limit would only make callers wait for tokens the provider has already
forgotten.
Concurrency is not a rate: it is a count of open reservations against `max_concurrent`.

Refill allowance: the provider starts refilling its bucket when a request arrives, some
milliseconds after limiterd grants it. While both buckets sit full the gap does not matter
(both clamp), but when a grant takes a full dimension below capacity, limiterd's refill of it
would start first and stay ahead of the provider's by rate x delay until it fills again: the
first caller waiting for an exact refill would be sent a little early (a 429). So a take from
a full dimension also charges that dimension the refill of an allowance
(Settings.refill_allowance_s, 100 ms by default): rate x allowance, once per take from full.
Only that dimension: the others were already refilling on both sides, and holding them back
too (as the whole bucket's refill clock once was) cost every grant that found its requests
dimension full 100 ms of token refill, about 6% of the output budget in the goodput bench.

Measured, not guessed: the delay from grant to provider is not always small (a cold client's
DNS and TLS handshake, an app starting on a busy core). For a caller that promises to mark the
moment it sends (AcquireRequest.marks_sent), a dimension its take brings down from full is
not charged at once: its refill is *held* (a Hold) until the first mark from a reservation
granted during the hold, and then charged the allowance, which now covers only the way from
the caller to the provider. If no mark comes, the holder's settlement (Report, Release, lapse)
ends the hold, uncharged. A held dimension is journaled with the allowance charged: a restart
ends the hold, and the dimension refills from the time it was journaled.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from limiterd.config.model import Limits
from limiterd.ledger.model import Amounts, BucketKey, BucketLevels

# Float slack: a level 1e-9 short of an amount counts as enough, so a waiter woken at the
# computed refill time is never turned away by rounding.
EPS = 1e-6

# The rate dimensions, in the order of Amounts' fields.
RATE_DIMS = ("requests", "input_tokens", "output_tokens")


def capacities(limits: Limits) -> tuple[int | None, int | None, int | None]:
    return (
        limits.requests_per_minute,
        limits.input_tokens_per_minute,
        limits.output_tokens_per_minute,
    )


def bounded(level: float, cap: int) -> float:
    """A level within the bucket's bounds: at most full, at most one capacity in debt."""
    return max(-float(cap), min(float(cap), level))


def amounts_tuple(a: Amounts) -> tuple[int, int, int]:
    return (a.requests, a.input_tokens, a.output_tokens)


@dataclass(frozen=True, slots=True)
class Hold:
    """Dimensions whose refill is held until a mark (see the module's docstring)."""

    holder: str  # the reservation whose take from full started it
    allowance: float  # charged at the mark: the way from the caller to the provider
    dims: tuple[bool, bool, bool]  # per RATE_DIMS: held or not


@dataclass(slots=True, eq=False)
class Bucket:
    key: BucketKey
    limits: Limits
    caps: tuple[int | None, int | None, int | None]
    levels: list[float]  # per RATE_DIMS; meaningless where the cap is None
    as_of: float
    in_flight: int = 0  # open reservations holding a concurrency slot here
    queues: set[tuple[BucketKey, ...]] = field(default_factory=set)  # queues with waiters
    # What every waiter on those queues asks for, summed (per RATE_DIMS): a newcomer's wait
    # estimate without walking the queues.
    queued: list[int] = field(default_factory=lambda: [0, 0, 0])
    hold: Hold | None = None

    @classmethod
    def full(cls, key: BucketKey, limits: Limits, now: float) -> Bucket:
        caps = capacities(limits)
        return cls(key, limits, caps, [float(c or 0) for c in caps], now)

    def refill(self, now: float) -> None:
        elapsed = now - self.as_of
        if elapsed <= 0:  # also guards against the wall clock stepping back
            return
        self.as_of = now
        levels, caps = self.levels, self.caps
        held = self.hold.dims if self.hold is not None else (False, False, False)
        for i in range(3):
            cap = caps[i]
            if cap is not None and levels[i] < cap and not held[i]:
                levels[i] = min(float(cap), levels[i] + cap * elapsed / 60.0)

    def set_limits(self, limits: Limits) -> None:
        """New limits (config reload): keep levels, within the new bounds."""
        self.limits = limits
        self.caps = capacities(limits)
        for i, cap in enumerate(self.caps):
            self.levels[i] = 0.0 if cap is None else bounded(self.levels[i], cap)

    def set_levels(self, levels: tuple[float | None, ...]) -> None:
        """Levels from outside (a journal's snapshot): held within the bounds, whatever an
        older version (or a corrupt row) wrote."""
        for i, level in enumerate(levels):
            cap = self.caps[i]
            if level is not None and cap is not None:
                self.levels[i] = bounded(level, cap)

    def reset(self, now: float) -> None:
        """Full on every dimension, debt forgiven (an operator's reset)."""
        self.as_of = now
        self.hold = None
        self.levels = [float(c or 0) for c in self.caps]

    def fits(self, amounts: tuple[int, int, int]) -> bool:
        """Whether `amounts` can be taken now (after refill)."""
        caps, levels = self.caps, self.levels
        for i in range(3):
            if caps[i] is not None and levels[i] + EPS < amounts[i]:
                return False
        mc = self.limits.max_concurrent
        return mc is None or self.in_flight < mc

    def take(self, amounts: tuple[int, int, int], now: float, allowance: float = 0.0,
             holder: str = "") -> None:
        """Take `amounts` (after refill). A dimension taken from full is also charged the
        refill of `allowance` seconds, or, for a `holder` that will mark when it sends, held
        until the mark (see the module's docstring)."""
        caps, levels = self.caps, self.levels
        held = [False, False, False]
        for i in range(3):
            cap = caps[i]
            if cap is not None:
                if amounts[i] > 0 and levels[i] >= cap:
                    if holder and allowance > 0:
                        held[i] = True
                    else:
                        levels[i] -= cap * allowance / 60.0
                levels[i] -= amounts[i]
        if any(held):
            h = self.hold
            if h is None:
                self.hold = Hold(holder, allowance, (held[0], held[1], held[2]))
            else:  # one hold per bucket: its first mark ends it for every dimension
                self.hold = replace(h, dims=(h.dims[0] or held[0], h.dims[1] or held[1],
                                             h.dims[2] or held[2]))
        self.in_flight += 1

    def end_hold(self, charge: bool) -> None:
        """The held dimensions refill again from now (call refill(now) first); `charge`: the
        caller just marked its send, so they are charged the allowance as well."""
        h = self.hold
        if h is None:
            return
        self.hold = None
        if charge:
            for i in range(3):
                cap = self.caps[i]
                if h.dims[i] and cap is not None:
                    self.levels[i] -= cap * h.allowance / 60.0

    def refill_delay(self, now: float) -> float:
        """Seconds from `now` until every dimension refills again: a held one is counted as
        resuming one allowance from now (a mark may come any moment)."""
        delay = max(0.0, self.as_of - now)
        return max(delay, self.hold.allowance) if self.hold is not None else delay

    def give(self, amounts: tuple[float, float, float]) -> None:
        """Refund (positive) or charge debt (negative), within [-capacity, capacity]."""
        for i in range(3):
            cap = self.caps[i]
            if cap is not None and amounts[i]:
                self.levels[i] = bounded(self.levels[i] + amounts[i], cap)

    def seconds_until(self, demand: tuple[float, float, float], now: float) -> float:
        """Time from `now` until `demand` fits on the rate dimensions (0 if it fits now),
        counting a refill time in the future (restored from a version that held refill) and
        a held dimension as resuming one allowance from now."""
        worst = 0.0
        later = max(0.0, self.as_of - now)
        h = self.hold
        for i in range(3):
            cap = self.caps[i]
            if cap is not None:
                deficit = demand[i] - self.levels[i]
                if deficit > EPS:
                    held = max(later, h.allowance) if h is not None and h.dims[i] else later
                    worst = max(worst, held + deficit * 60.0 / cap)
        return worst

    def is_idle_full(self) -> bool:
        """Carries no information: nothing in flight, nobody waiting, every level full."""
        if self.in_flight or self.queues:
            return False
        return all(c is None or lvl >= c for c, lvl in zip(self.caps, self.levels, strict=True))

    def exceeds_capacity(self, amounts: tuple[int, int, int]) -> tuple[str, int] | None:
        """The first dimension whose capacity is below `amounts`: it could never be granted."""
        for name, cap, amount in zip(RATE_DIMS, self.caps, amounts, strict=True):
            if cap is not None and amount > cap:
                return name, cap
        return None

    def snapshot(self) -> BucketLevels:
        """A held dimension is written with the allowance charged: after a restart the hold
        is over (nobody's mark could end it any more)."""
        lv, caps = list(self.levels), self.caps
        if (h := self.hold) is not None:
            for i in range(3):
                cap = caps[i]
                if h.dims[i] and cap is not None:
                    lv[i] -= cap * h.allowance / 60.0
        return BucketLevels(
            key=self.key,
            requests=lv[0] if caps[0] is not None else None,
            input_tokens=lv[1] if caps[1] is not None else None,
            output_tokens=lv[2] if caps[2] is not None else None,
            as_of=self.as_of,
        )
