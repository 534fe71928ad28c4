"""The error log's periodic flush keeps the injected time, as everything else in limiterd."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from pathlib import Path

from limiterd.clock import FakeClock
from limiterd.errorlog import FLUSH_EVERY_S, ErrorEntry, ErrorLog, ErrorStore
from limiterd.storage.sqlite import SqliteJournal


class Watched:
    """The journal's real error store, noting when a write to it starts."""

    def __init__(self, store: ErrorStore) -> None:
        self.store, self.writes = store, 0

    async def load_errors(self, since: float) -> list[ErrorEntry]:
        return await self.store.load_errors(since)

    async def write_errors(self, entries: Sequence[ErrorEntry], keep_after: float,
                           max_rows: int) -> None:
        self.writes += 1
        await self.store.write_errors(entries, keep_after, max_rows)


async def settle() -> None:
    """Let the flush task run what is due: a timer that fired wakes it within a few turns."""
    for _ in range(20):
        await asyncio.sleep(0)


async def test_the_flush_runs_when_the_clock_says_so(tmp_path: Path) -> None:
    clock = FakeClock()
    journal = SqliteJournal(tmp_path / "limiterd.sqlite3", clock=clock)
    await journal.open()
    real = journal.error_store()
    assert real is not None
    store = Watched(real)
    log = ErrorLog(clock, store)
    await log.start()
    await settle()  # the flush task is waiting for its first turn
    try:
        log.add(ErrorEntry(clock.now(), "s", "m", "RATE_LIMITED", 429, "rate_limit_error", "",
                           "req_1", False))
        clock.advance(FLUSH_EVERY_S * 0.9)
        await settle()
        assert store.writes == 0  # not due yet on the daemon's clock
        clock.advance(FLUSH_EVERY_S * 0.2)
        await settle()
        assert store.writes == 1  # due: flushed at once, whatever the wall clock did
        assert [e.provider_request_id for e in await real.load_errors(0.0)] == ["req_1"]
    finally:
        await log.stop()
        await journal.close()
