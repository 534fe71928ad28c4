"""The error log's rows (limiterd.errorlog), kept in the journal's database."""

from __future__ import annotations

import sqlite3
from collections.abc import Sequence
from pathlib import Path

from limiterd.errorlog import ErrorEntry, entries_from_rows
from limiterd.storage.base import HasDriverErrors
from limiterd.storage.sqlite.connection import Connection

DRIVER_ERRORS = (sqlite3.Error, OSError, ValueError, OverflowError)


class SqliteErrorStore(HasDriverErrors):
    """Shares the journal's connection, taking turns on it with the journal's batches."""

    driver_errors = DRIVER_ERRORS
    guarded = {"load_errors": "error log read", "write_errors": "error log write"}

    def __init__(self, conn: Connection, path: Path) -> None:
        self._conn, self._path = conn, path

    def name(self) -> str:
        return str(self._path)

    async def load_errors(self, since: float) -> list[ErrorEntry]:
        async with self._conn.turn() as db:
            rows = await db.execute_fetchall(
                "SELECT * FROM errors WHERE at >= ? ORDER BY at", (since,)
            )
        return entries_from_rows(rows)

    async def write_errors(
        self, entries: Sequence[ErrorEntry], keep_after: float, max_rows: int
    ) -> None:
        rows = [(e.at, e.scope, e.model, e.outcome, e.http_status, e.error_type, e.error_code,
                 e.provider_request_id, int(e.fell_back)) for e in entries]
        async with self._conn.transaction() as db:
            await db.executemany("INSERT INTO errors VALUES (?,?,?,?,?,?,?,?,?)", rows)
            await db.execute("DELETE FROM errors WHERE at < ?", (keep_after,))
            await db.execute(
                "DELETE FROM errors WHERE rowid NOT IN"
                " (SELECT rowid FROM errors ORDER BY at DESC LIMIT ?)", (max_rows,))
