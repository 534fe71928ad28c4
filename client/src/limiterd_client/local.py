"""What to do when the daemon is unreachable, and the local safe-capacity bucket."""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True)
class FailClosed:
    """Raise LimiterUnavailable (the default): no call goes out unmetered."""


@dataclass(frozen=True)
class FailOpen:
    """Let every call through unmetered; each one is counted and logged."""


@dataclass(frozen=True)
class SafeCapacity:
    """Enforce a small local budget per process and per model until the daemon is back (cf.
    doorman's safe_capacity): `requests_per_minute` calls and `tokens_per_minute` input+output
    tokens for each model, as the provider counts each model's limits apart. A caller waiting
    in it asks the daemon again every second and goes back to it as soon as it answers."""

    requests_per_minute: int
    tokens_per_minute: int

    def __post_init__(self) -> None:
        if self.requests_per_minute < 1:
            raise ValueError("requests_per_minute: must be >= 1")
        if self.tokens_per_minute < 1:
            raise ValueError("tokens_per_minute: must be >= 1")


UnavailablePolicy = FailClosed | FailOpen | SafeCapacity
EPS = 1e-9
FAIL_CLOSED = FailClosed()


class LocalBucket:
    """Two token buckets (requests, tokens) refilled continuously, full at start. Thread-safe."""

    def __init__(self, policy: SafeCapacity, clock: Callable[[], float] = time.monotonic) -> None:
        self._cap_r = float(policy.requests_per_minute)
        self._cap_t = float(policy.tokens_per_minute)
        self._clock = clock
        self._lock = threading.Lock()
        self._r = self._cap_r
        self._t = self._cap_t
        self._at = clock()

    def _refill(self) -> None:
        now = self._clock()
        dt = max(0.0, now - self._at)
        self._at = now
        self._r = min(self._cap_r, self._r + dt * self._cap_r / 60)
        self._t = min(self._cap_t, self._t + dt * self._cap_t / 60)

    def try_take(self, tokens: int) -> float:
        """Take 1 request and `tokens`; 0.0 when granted, else seconds until it could be
        (math.inf when it never fits)."""
        if tokens > self._cap_t:
            return math.inf
        with self._lock:
            self._refill()
            # EPS: a refill summed over many short steps may fall a rounding error short
            if self._r >= 1 - EPS and self._t >= tokens - EPS:
                self._r = max(0.0, self._r - 1)
                self._t = max(0.0, self._t - tokens)
                return 0.0
            need_r = max(0.0, 1 - self._r) * 60 / self._cap_r
            need_t = max(0.0, tokens - self._t) * 60 / self._cap_t
            return max(need_r, need_t)

    def give_back(self, tokens: int) -> None:
        if tokens <= 0:
            return
        with self._lock:
            self._refill()
            self._t = min(self._cap_t, self._t + tokens)

    def levels(self) -> tuple[float, float]:
        with self._lock:
            self._refill()
            return self._r, self._t


class LocalBuckets:
    """One LocalBucket per model, made on first use. Thread-safe."""

    def __init__(self, policy: SafeCapacity, clock: Callable[[], float] = time.monotonic) -> None:
        self._policy, self._clock = policy, clock
        self._lock = threading.Lock()
        self._by_model: dict[str, LocalBucket] = {}

    def for_model(self, model: str) -> LocalBucket:
        with self._lock:
            bucket = self._by_model.get(model)
            if bucket is None:
                bucket = self._by_model[model] = LocalBucket(self._policy, self._clock)
            return bucket
