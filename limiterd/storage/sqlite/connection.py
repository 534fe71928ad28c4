"""One aiosqlite connection, the turns taken on it, and the one transaction helper.

aiosqlite runs every call on the connection's own thread, in the order the calls were made;
each call is one hop there and back. A transaction is therefore a short series of awaited
calls (BEGIN IMMEDIATE, one executemany per kind of row, COMMIT), and nothing else may put a
statement between them: the journal and the error log share the connection, so each unit of
work takes its turn (an asyncio lock) for all of its calls.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from pathlib import Path

import aiosqlite


class Connection:
    """An aiosqlite connection in autocommit mode (transactions are explicit), taken in turns."""

    def __init__(self, db: aiosqlite.Connection) -> None:
        self._db = db
        self._turn = asyncio.Lock()

    @classmethod
    async def connect(cls, path: Path) -> Connection:
        return cls(await aiosqlite.connect(path, isolation_level=None))

    @property
    def db(self) -> aiosqlite.Connection:
        """The driver's connection, for work that needs no turn (open, before anyone shares)."""
        return self._db

    @contextlib.asynccontextmanager
    async def turn(self) -> AsyncIterator[aiosqlite.Connection]:
        """Use the connection alone (reads that must not see half of someone's transaction)."""
        async with self._turn:
            yield self._db

    @contextlib.asynccontextmanager
    async def transaction(self) -> AsyncIterator[aiosqlite.Connection]:
        """BEGIN IMMEDIATE ... COMMIT, or ROLLBACK on any exception: all of it or none of it.

        rollback() is sqlite3's: it rolls back only if SQLite is still in the transaction
        (`in_transaction`), which it is not after it rolled back by itself (SQLITE_FULL), and
        it checks on the driver's thread, after every call queued before it. So it is also
        right when a cancellation reached us while a call was still queued: that call runs,
        then the rollback undoes it.
        """
        async with self._turn:
            db = self._db
            if db.in_transaction:  # defensive: nothing should be left open; never nest into it
                await db.rollback()
            try:
                await db.execute("BEGIN IMMEDIATE")
                yield db
                await db.commit()
            except BaseException:
                await db.rollback()
                raise

    async def close(self) -> None:
        """Close the connection once every queued call has run, and end its thread."""
        async with self._turn:
            await self._db.close()
