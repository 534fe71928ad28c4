"""The overload mark: `overload_threshold` OVERLOADED reports for a model budget within
`overload_window_s` mark it overloaded for `overload_cooldown_s`, so callers may fall back
before trying. A provider's overload is not a key's: marks are per budget, not per scope.
Pure (time from the caller); the local and the shared ledger both keep one."""

from __future__ import annotations

from collections import deque

from limiterd.config.model import Settings


class OverloadMarks:
    def __init__(self) -> None:
        self._events: dict[str, deque[float]] = {}
        self._until: dict[str, float] = {}

    def note(self, budget: str, now: float, s: Settings) -> None:
        """An OVERLOADED outcome on `budget` at `now`."""
        events = self._events.setdefault(budget, deque())
        events.append(now)
        while events and (events[0] <= now - s.overload_window_s
                          or len(events) > s.overload_threshold):
            events.popleft()
        if len(events) >= s.overload_threshold:
            self._until[budget] = max(self._until.get(budget, 0.0), now + s.overload_cooldown_s)

    def until(self, budget: str, now: float) -> float:
        """When the mark on `budget` lifts (0.0: not marked). It lifts on its own."""
        until = self._until.get(budget)
        if until is None:
            return 0.0
        if until <= now:
            del self._until[budget]
            return 0.0
        return until

    def active(self, now: float) -> dict[str, float]:
        """Every marked budget, with when its mark lifts."""
        return {b: u for b in list(self._until) if (u := self.until(b, now))}
