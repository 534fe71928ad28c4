"""The database's shape: pragmas, migrations, and the check that the rows are readable.

MIGRATIONS[i] takes the database from version i to i + 1; a new version is one function
appended here. All of them run in one transaction at open: every step or none.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Awaitable, Callable
from typing import Literal

import aiosqlite

from limiterd.ledger.model import Outcome, State
from limiterd.storage.base import StartupError
from limiterd.storage.sqlite.connection import Connection

Synchronous = Literal["NORMAL", "FULL"]

BUSY_TIMEOUT_MS = 5000
# The WAL is bounded: SQLite checkpoints it into the database after WAL_AUTOCHECKPOINT
# pages (this journal is the file's only connection, so nothing holds a checkpoint back),
# starts writing it again from the top, and cuts the file back to JOURNAL_SIZE_LIMIT. The WAL
# therefore stays under about 1 MiB plus the largest single batch (README: disk space).
WAL_AUTOCHECKPOINT = 256  # pages; 1 MiB at the default 4 KiB page size
JOURNAL_SIZE_LIMIT = 1024 * 1024


class NotOurs(Exception):
    """The file is SQLite, but not a limiterd database limiterd can read. The message, if
    any, says what is wrong with it."""


Migration = Callable[[aiosqlite.Connection], Awaitable[None]]


async def _v1(db: aiosqlite.Connection) -> None:
    # No index on (scope, request_id): the ledger answers idempotency lookups from memory,
    # so such an index would only slow every insert.
    for sql in (
        """CREATE TABLE reservations (
            id TEXT PRIMARY KEY NOT NULL,
            scope TEXT NOT NULL, model TEXT NOT NULL, user TEXT NOT NULL,
            request_id TEXT NOT NULL,
            reserved_requests INTEGER NOT NULL, reserved_input INTEGER NOT NULL,
            reserved_output INTEGER NOT NULL,
            buckets TEXT NOT NULL,            -- JSON [[scope, model, user], ...]
            granted_at REAL NOT NULL, expires_at REAL NOT NULL, waited_s REAL NOT NULL,
            state TEXT NOT NULL,              -- limiterd.ledger.model.State values
            settled_at REAL,                  -- NULL while open
            refunded_requests INTEGER, refunded_input INTEGER, refunded_output INTEGER,
            overrun_requests INTEGER, overrun_input INTEGER, overrun_output INTEGER,
            outcome TEXT
        ) WITHOUT ROWID""",
        "CREATE INDEX reservations_settled_at ON reservations (settled_at)"
        " WHERE settled_at IS NOT NULL",
        """CREATE TABLE buckets (
            scope TEXT NOT NULL, model TEXT NOT NULL, user TEXT NOT NULL,
            requests REAL, input_tokens REAL, output_tokens REAL,  -- NULL = unlimited
            as_of REAL NOT NULL,
            PRIMARY KEY (scope, model, user)
        ) WITHOUT ROWID""",
        """CREATE TABLE pauses (
            scope TEXT NOT NULL, model TEXT NOT NULL, until REAL NOT NULL,
            PRIMARY KEY (scope, model)
        ) WITHOUT ROWID""",
    ):
        await db.execute(sql)


async def _v2(db: aiosqlite.Connection) -> None:
    # The error log (limiterd.errorlog): failed provider outcomes, bounded by age and rows.
    await db.execute(
        """CREATE TABLE errors (
            at REAL NOT NULL, scope TEXT NOT NULL, model TEXT NOT NULL, outcome TEXT NOT NULL,
            http_status INTEGER NOT NULL, error_type TEXT NOT NULL, error_code TEXT NOT NULL,
            provider_request_id TEXT NOT NULL, fell_back INTEGER NOT NULL
        )"""
    )
    await db.execute("CREATE INDEX errors_at ON errors (at)")


MIGRATIONS: list[Migration] = [_v1, _v2]


async def set_pragmas(
    db: aiosqlite.Connection, synchronous: Synchronous, max_bytes: int | None
) -> None:
    await db.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
    # A garbage file fails here with SQLITE_NOTADB: this is the first read of the header.
    mode = list(await db.execute_fetchall("PRAGMA journal_mode = WAL"))
    if not mode or str(mode[0][0]).lower() != "wal":
        raise sqlite3.OperationalError(f"cannot switch to WAL mode (got {mode})")
    await db.execute(f"PRAGMA synchronous = {synchronous}")
    await db.execute(f"PRAGMA wal_autocheckpoint = {WAL_AUTOCHECKPOINT}")
    await db.execute(f"PRAGMA journal_size_limit = {JOURNAL_SIZE_LIMIT}")
    await db.execute("PRAGMA foreign_keys = OFF")
    if max_bytes is not None:
        page = int(next(iter(await db.execute_fetchall("PRAGMA page_size")))[0])
        await db.execute(f"PRAGMA max_page_count = {max(1, max_bytes // page)}")


async def quick_check(db: aiosqlite.Connection) -> None:
    rows = list(await db.execute_fetchall("PRAGMA quick_check"))
    if [tuple(r) for r in rows] != [("ok",)]:
        raise NotOurs("; ".join(str(r[0]) for r in rows[:3]))


async def migrate(conn: Connection, where: str, now: float) -> None:
    """Bring the file to the newest schema; drop pauses that ran out while we were down."""
    latest = len(MIGRATIONS)
    async with conn.transaction() as db:
        version = await _version(db)
        if version > latest:
            raise StartupError(
                f"{where} was written by a newer limiterd (schema {version}, "
                f"this build knows up to {latest}): upgrade limiterd or point --db elsewhere"
            )
        if version == 0:
            await db.execute("CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT)")
        for migration in MIGRATIONS[version:]:
            await migration(db)
        if version < latest:
            await db.execute(
                "INSERT OR REPLACE INTO meta VALUES ('schema_version', ?)", (str(latest),)
            )
        await db.execute("DELETE FROM pauses WHERE until < ?", (now,))


async def _tables(db: aiosqlite.Connection) -> set[str]:
    rows = await db.execute_fetchall("SELECT name FROM sqlite_master WHERE type = 'table'")
    return {str(r[0]) for r in rows}


async def _version(db: aiosqlite.Connection) -> int:
    tables = await _tables(db)
    if not tables:
        return 0
    if "meta" not in tables:
        raise NotOurs
    rows = list(await db.execute_fetchall("SELECT value FROM meta WHERE key = 'schema_version'"))
    try:
        return int(rows[0][0])
    except (IndexError, TypeError, ValueError):
        raise NotOurs from None


# ---- rows a hand edit or a foreign writer may have broken: checked in SQL, at C speed,
# before Python builds a single object from them. (JSON is checked where rows.py parses it:
# json_valid here cost a quarter of the open time of 100k reservations.)

_NUM = "IN ('integer', 'real')"
_STATES = ", ".join(f"'{s.value}'" for s in State if s is not State.OPEN)
_OUTCOMES = ", ".join(f"'{o.value}'" for o in Outcome)

_ROW_CHECKS: dict[str, str] = {
    "reservations": f"""
        typeof(scope) = 'text' AND typeof(model) = 'text' AND typeof(user) = 'text'
        AND typeof(request_id) = 'text' AND typeof(reserved_requests) = 'integer'
        AND typeof(reserved_input) = 'integer' AND typeof(reserved_output) = 'integer'
        AND typeof(granted_at) {_NUM} AND typeof(expires_at) {_NUM} AND typeof(waited_s) {_NUM}
        AND typeof(buckets) = 'text'
        AND CASE WHEN settled_at IS NULL THEN state = 'open' ELSE
            typeof(settled_at) {_NUM} AND state IN ({_STATES})
            AND typeof(refunded_requests) = 'integer' AND typeof(refunded_input) = 'integer'
            AND typeof(refunded_output) = 'integer' AND typeof(overrun_requests) = 'integer'
            AND typeof(overrun_input) = 'integer' AND typeof(overrun_output) = 'integer'
            AND (outcome IS NULL OR outcome IN ({_OUTCOMES})) END""",
    "buckets": f"""
        typeof(scope) = 'text' AND typeof(model) = 'text' AND typeof(user) = 'text'
        AND typeof(as_of) {_NUM} AND (requests IS NULL OR typeof(requests) {_NUM})
        AND (input_tokens IS NULL OR typeof(input_tokens) {_NUM})
        AND (output_tokens IS NULL OR typeof(output_tokens) {_NUM})""",
    "pauses": f"typeof(scope) = 'text' AND typeof(model) = 'text' AND typeof(until) {_NUM}",
    "errors": f"""
        typeof(at) {_NUM} AND typeof(scope) = 'text' AND typeof(model) = 'text'
        AND typeof(outcome) = 'text' AND typeof(http_status) = 'integer'
        AND typeof(error_type) = 'text' AND typeof(error_code) = 'text'
        AND typeof(provider_request_id) = 'text' AND typeof(fell_back) = 'integer'""",
}


async def check_rows(db: aiosqlite.Connection) -> None:
    """Raise NotOurs naming the first table with a row limiterd cannot read."""
    tables = await _tables(db)
    for table, ok in _ROW_CHECKS.items():
        bad = f"SELECT 1 FROM {table} WHERE NOT ({ok}) LIMIT 1"
        if table in tables and list(await db.execute_fetchall(bad)):
            raise NotOurs(f"a row in {table} is not one limiterd wrote")
