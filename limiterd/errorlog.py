"""A bounded log of failed provider outcomes, for debugging and analytics.

Report may carry what the provider said (HTTP status, error type and code, its request id,
whether a fallback followed). Failed outcomes are kept in memory up to `max_rows` and
`max_age_s`, and written to the journal's database when it has one, so they survive a
restart. Queries read memory: every retained row is there.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

from limiterd.clock import Clock, sleep

log = logging.getLogger("limiterd.errorlog")

FLUSH_EVERY_S = 1.0


@dataclass(frozen=True, slots=True)
class ErrorEntry:
    at: float
    scope: str
    model: str
    outcome: str
    http_status: int
    error_type: str
    error_code: str
    provider_request_id: str
    fell_back: bool


@runtime_checkable
class ErrorStore(Protocol):
    """What a journal offers to keep the log (SqliteJournal does)."""

    async def load_errors(self, since: float) -> list[ErrorEntry]: ...
    async def write_errors(
        self, entries: Sequence[ErrorEntry], keep_after: float, max_rows: int
    ) -> None: ...


class ErrorLog:
    def __init__(self, clock: Clock, store: ErrorStore | None = None,
                 max_rows: int = 10_000, max_age_s: float = 7 * 86400.0) -> None:
        self.clock, self.store = clock, store
        self.max_rows, self.max_age_s = max_rows, max_age_s
        self._rows: deque[ErrorEntry] = deque(maxlen=max_rows)
        self._pending: list[ErrorEntry] = []
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        if self.store is not None:
            self._rows.extend(await self.store.load_errors(self.clock.now() - self.max_age_s))
            self._task = asyncio.create_task(self._flush_loop(), name="limiterd-errorlog")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
            await self.flush()

    def add(self, entry: ErrorEntry) -> None:
        self._rows.append(entry)
        if self.store is not None:
            self._pending.append(entry)

    def query(self, model: str = "", http_status: int = 0, since: float = 0.0,
              limit: int = 100) -> list[ErrorEntry]:
        """Newest first."""
        horizon = max(since, self.clock.now() - self.max_age_s)
        out: list[ErrorEntry] = []
        for e in reversed(self._rows):
            if e.at < horizon:
                break
            if (model and e.model != model) or (http_status and e.http_status != http_status):
                continue
            out.append(e)
            if len(out) >= limit:
                break
        return out

    async def flush(self) -> None:
        if self.store is None or not self._pending:
            return
        batch, self._pending = self._pending, []
        try:
            await self.store.write_errors(batch, self.clock.now() - self.max_age_s,
                                          self.max_rows)
        except Exception as exc:  # noqa: BLE001 - the log must never take the daemon down
            log.warning("could not write %d error-log rows, will retry: %s", len(batch), exc)
            self._pending = batch + self._pending

    async def _flush_loop(self) -> None:
        while True:
            await sleep(self.clock, FLUSH_EVERY_S)
            await self.flush()


def entries_from_rows(rows: Iterable[Sequence[Any]]) -> list[ErrorEntry]:
    return [ErrorEntry(float(r[0]), str(r[1]), str(r[2]), str(r[3]), int(r[4]),
                       str(r[5]), str(r[6]), str(r[7]), bool(r[8])) for r in rows]
