"""The SQLite journal: one file per daemon, WAL mode, one long-lived connection."""

from __future__ import annotations

import logging
import os
import sqlite3
from collections.abc import Sequence
from pathlib import Path

from limiterd.clock import Clock, SystemClock
from limiterd.errorlog import ErrorStore
from limiterd.ledger.model import Change, Snapshot
from limiterd.storage.base import Journal, StartupError, StorageError
from limiterd.storage.sqlite import plan, rows, schema
from limiterd.storage.sqlite.connection import Connection
from limiterd.storage.sqlite.errors import corrupt, startup_error
from limiterd.storage.sqlite.errorstore import DRIVER_ERRORS, SqliteErrorStore
from limiterd.storage.sqlite.lock import DatabaseLock
from limiterd.storage.sqlite.schema import NotOurs, Synchronous

log = logging.getLogger("limiterd.storage")


class SqliteJournal(Journal):
    durable = True
    # OverflowError: an int beyond SQLite's 64 bits, i.e. bad input, not a crash.
    driver_errors = DRIVER_ERRORS

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        synchronous: Synchronous = "NORMAL",
        max_size_bytes: int | None = None,
        clock: Clock | None = None,
    ) -> None:
        """`synchronous`: NORMAL survives a process crash, FULL also a power loss.

        `max_size_bytes` caps the file (SQLite's max_page_count); past it writes fail with
        StorageError ("database or disk is full") exactly as on a full disk.
        """
        if synchronous not in ("NORMAL", "FULL"):
            raise ValueError(f"synchronous must be NORMAL or FULL, not {synchronous!r}")
        self.path = Path(path).expanduser().absolute()
        self.synchronous: Synchronous = synchronous
        self.max_size_bytes = max_size_bytes
        self._clock: Clock = clock or SystemClock()
        self._conn: Connection | None = None
        self._lock = DatabaseLock(self.path)

    def name(self) -> str:
        return str(self.path)

    def describe(self) -> str:
        cap = f", max {self.max_size_bytes} bytes" if self.max_size_bytes else ""
        return f"sqlite {self.path} (WAL, synchronous={self.synchronous}{cap})"

    def startup_error(self, exc: Exception) -> StartupError:
        return startup_error(self.path, exc)

    def failed(self, what: str, exc: Exception) -> StorageError:
        if what == "write":
            return StorageError(f"{self.path}: write failed, nothing was written: {exc}")
        return super().failed(what, exc)

    def error_store(self) -> ErrorStore | None:
        return SqliteErrorStore(self._conn, self.path) if self._conn is not None else None

    # ---- open

    async def open(self) -> Snapshot:
        if self._conn is not None:
            raise StorageError(f"{self.path} is already open")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if self.path.is_dir():
            raise StartupError(f"{self.path} is a folder: point --db at a file inside it")
        self._lock.acquire()
        if (links := self.path.stat().st_nlink) > 1:
            # The lock holds across names, but SQLite names the WAL after the name it was
            # given: a crash under one name and a restart under another would not see it.
            log.warning("%s has %d hard links: always start limiterd with the same name for "
                        "it, or changes in its write-ahead log may be lost", self.path, links)
        try:
            self._conn = conn = await Connection.connect(self.path)
            return await self._open_connected(conn)
        except NotOurs as exc:
            await self._abandon()
            raise corrupt(self.path, str(exc)) from None
        except BaseException:
            await self._abandon()
            raise

    async def _open_connected(self, conn: Connection) -> Snapshot:
        """Settings, integrity, schema, rows: no one else uses the connection yet."""
        db = conn.db
        await schema.set_pragmas(db, self.synchronous, self.max_size_bytes)
        await schema.quick_check(db)
        await schema.migrate(conn, str(self.path), self._clock.now())
        await schema.check_rows(db)
        return await rows.load(db)

    async def _abandon(self) -> None:
        conn, self._conn = self._conn, None
        try:
            if conn is not None:
                await conn.close()
        except (sqlite3.Error, ValueError):
            pass  # we are already reporting why the open failed
        finally:
            self._lock.release()  # after the connection: see lock.py

    # ---- write

    async def write(self, changes: Sequence[Change]) -> None:
        if self._conn is None:
            raise StorageError(f"{self.path} is not open")
        if changes:
            await plan.apply(self._conn, plan.plan(changes))

    # ---- close

    async def close(self) -> None:
        conn, self._conn = self._conn, None
        try:
            if conn is not None:
                try:
                    # Leave no WAL behind: a copied or backed-up file is then complete.
                    async with conn.turn() as db:
                        await db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
                finally:
                    await conn.close()
        finally:
            self._lock.release()
