"""One sqlite3 connection, used only from its own thread, and the one transaction helper.

The event loop hands whole units of work (a function taking the connection) to that thread,
so a batch of many statements costs one hop, not one per statement. Work runs in the order
it was handed over; a caller that stops waiting does not stop work already started, which is
why every unit that writes is one transaction that commits or rolls back on its own.
"""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TypeVar

T = TypeVar("T")


@contextlib.contextmanager
def transaction(db: sqlite3.Connection) -> Iterator[sqlite3.Connection]:
    """BEGIN IMMEDIATE ... COMMIT, or ROLLBACK on any exception: all of it or none of it."""
    if db.in_transaction:  # defensive: nothing should be left open, but never nest into it
        db.execute("ROLLBACK")
    db.execute("BEGIN IMMEDIATE")
    try:
        yield db
        db.execute("COMMIT")
    except BaseException:
        if db.in_transaction:  # SQLite may already have rolled back (e.g. on SQLITE_FULL)
            db.execute("ROLLBACK")
        raise


class Connection:
    """A sqlite3 connection (autocommit: transactions are explicit) owned by one thread."""

    def __init__(self) -> None:
        self._thread = ThreadPoolExecutor(1, thread_name_prefix="limiterd-sqlite")
        self._db: sqlite3.Connection | None = None

    async def connect(self, path: Path) -> None:
        def connect() -> sqlite3.Connection:
            return sqlite3.connect(path, isolation_level=None, check_same_thread=True)

        self._db = await asyncio.get_running_loop().run_in_executor(self._thread, connect)

    async def run(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        """Run `fn(connection)` on the connection's thread."""
        db = self._db
        if db is None:
            raise sqlite3.ProgrammingError("the connection is closed")
        return await asyncio.get_running_loop().run_in_executor(self._thread, fn, db)

    async def close(self) -> None:
        """Close the connection (once everything handed over has run) and stop the thread."""
        db, self._db = self._db, None
        try:
            if db is not None:
                await asyncio.get_running_loop().run_in_executor(self._thread, db.close)
        finally:
            self._thread.shutdown(wait=False)
