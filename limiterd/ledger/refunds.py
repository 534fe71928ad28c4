"""Expected refunds: a wait estimate that counts what calls in flight will likely give back.

A reservation holds `max_output_tokens` (and its input estimate) until its Report, which
refunds the unused part. Estimating a wait from the refill alone overstates it whenever calls
are in flight: callers then fall back or give up while the budget is about to come back
(issue 13, item 3). Here each bucket learns from recent Reports the share of the reserved
tokens calls use and how long they take (moving averages), and an estimate adds, to the
refill, the expected refund of every open reservation at its expected end. Only estimates
use this; grants still wait for tokens that are really there. Pure: no clock, no I/O.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from limiterd.ledger.model import BucketKey

ALPHA = 0.1  # weight of the newest Report in the moving averages
MIN_SAMPLES = 5  # Reports seen before a bucket's refunds are expected at all

Amounts3 = tuple[float, float, float]
Schedule = list[tuple[float, Amounts3]]  # (when, tokens back per RATE_DIMS), by time


@dataclass(slots=True)
class Usage:
    """What recent Reports on one bucket said: used / reserved per dimension, and how long a
    call took from grant to Report."""

    used: list[float] = field(default_factory=lambda: [1.0, 1.0, 1.0])
    duration_s: float = 0.0
    samples: int = 0

    def learn(self, reserved: tuple[int, int, int], actual: tuple[int, int, int],
              duration_s: float) -> None:
        a = 1.0 if self.samples == 0 else ALPHA
        for i in (1, 2):  # a request is never given back
            if reserved[i] > 0:
                share = min(1.0, actual[i] / reserved[i])
                self.used[i] += a * (share - self.used[i])
        self.duration_s += a * (max(0.0, duration_s) - self.duration_s)
        self.samples += 1


class Refunds:
    """Per bucket: the learned Usage, and its open reservations in grant order."""

    def __init__(self) -> None:
        self._usage: dict[BucketKey, Usage] = {}
        self._open: dict[BucketKey, deque[tuple[str, float, tuple[int, int, int]]]] = {}

    def granted(self, key: BucketKey, rid: str, at: float,
                amounts: tuple[int, int, int]) -> None:
        self._open.setdefault(key, deque()).append((rid, at, amounts))

    def reported(self, key: BucketKey, reserved: tuple[int, int, int],
                 actual: tuple[int, int, int], duration_s: float) -> None:
        self._usage.setdefault(key, Usage()).learn(reserved, actual, duration_s)

    def used_share(self, key: BucketKey) -> list[float]:
        """The share of a reservation a call on this bucket is expected to use."""
        usage = self._usage.get(key)
        return usage.used if usage is not None else [1.0, 1.0, 1.0]

    def forget(self, key: BucketKey) -> None:
        """The bucket was dropped (idle and full): nothing of it is in flight."""
        self._open.pop(key, None)

    def schedule(self, key: BucketKey, now: float, is_open: Callable[[str], bool],
                 in_flight: int) -> Schedule:
        """When the bucket's open reservations are expected back, and how much of them."""
        usage = self._usage.get(key)
        entries = self._open.get(key)
        if entries is None:
            return []
        while entries and not is_open(entries[0][0]):
            entries.popleft()  # settled, oldest first
        if len(entries) > 2 * in_flight + 64:  # settled ones pile up behind a long call
            self._open[key] = entries = deque(e for e in entries if is_open(e[0]))
        if usage is None or usage.samples < MIN_SAMPLES:
            return []
        back = [1.0 - u for u in usage.used]
        out: Schedule = []
        for rid, at, amounts in entries:
            if is_open(rid):
                out.append((max(now, at + usage.duration_s),
                            (0.0, amounts[1] * back[1], amounts[2] * back[2])))
        return out


def seconds_until(levels: list[float], caps: tuple[int | None, int | None, int | None],
                  demand: list[float], schedule: Schedule, now: float) -> float:
    """When `demand` fits, counting the refill and the refunds expected on `schedule`."""
    worst = 0.0
    for i in range(3):
        cap = caps[i]
        if cap is None:
            continue
        rate, have, t = cap / 60.0, levels[i], now
        need = demand[i] - have
        for when, back in schedule:
            if need <= 1e-6 or t + need / rate <= when:
                break
            need -= rate * (when - t) + back[i]
            t = when
        worst = max(worst, t - now + max(0.0, need) / rate)
    return worst
