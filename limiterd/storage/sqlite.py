"""The SQLite journal: one file per daemon, WAL mode, one long-lived aiosqlite connection.

The ledger lives in memory; this file only records it. Each write() is one group commit
(BEGIN IMMEDIATE ... COMMIT) built from a batch that was first collapsed in Python, so a
batch costs a handful of executemany round trips to the aiosqlite thread however large it
is. Writes are idempotent (upserts, deletes of missing rows are no-ops) because the engine
retries a failed batch merged with newer changes.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import sqlite3
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Literal

import aiosqlite

from limiterd.clock import Clock, SystemClock
from limiterd.defaults import DEFAULT_DB
from limiterd.errorlog import ErrorEntry, entries_from_rows
from limiterd.ledger.model import (
    Amounts,
    BucketDropped,
    BucketKey,
    BucketLevels,
    Change,
    LeaseExtended,
    Outcome,
    PauseSet,
    Reservation,
    ReservationOpened,
    ReservationSettled,
    Settlement,
    SettlementsForgotten,
    Snapshot,
    State,
)
from limiterd.storage.base import Journal, StartupError, StorageError
from limiterd.storage.memory import MemoryJournal

Synchronous = Literal["NORMAL", "FULL"]

BUSY_TIMEOUT_MS = 5000
# The WAL is bounded: SQLite checkpoints it into the database after WAL_AUTOCHECKPOINT
# pages (this journal is the file's only connection, so nothing holds a checkpoint back),
# starts writing it again from the top, and cuts the file back to JOURNAL_SIZE_LIMIT. The WAL
# therefore stays under about 1 MiB plus the largest single batch (README: volume size).
WAL_AUTOCHECKPOINT = 256  # pages; 1 MiB at the default 4 KiB page size
JOURNAL_SIZE_LIMIT = 1024 * 1024


def default_db_path() -> Path:
    """$LIMITERD_DB, else $XDG_STATE_HOME/limiterd/limiterd.sqlite3, else ./var/..."""
    if env := os.environ.get("LIMITERD_DB"):
        return Path(env)
    if state := os.environ.get("XDG_STATE_HOME"):
        return Path(state) / "limiterd" / "limiterd.sqlite3"
    return Path(DEFAULT_DB)


def open_journal(db: str, synchronous: Synchronous = "NORMAL") -> Journal:
    """The journal for a --db value: ":memory:" keeps nothing, anything else is a file."""
    if db == ":memory:":
        return MemoryJournal()
    return SqliteJournal(db, synchronous=synchronous)


# ---- schema: MIGRATIONS[i] takes the database from version i to i + 1.

Migration = Callable[[aiosqlite.Connection], Awaitable[None]]


async def _v1(conn: aiosqlite.Connection) -> None:
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
        await conn.execute(sql)


async def _v2(conn: aiosqlite.Connection) -> None:
    # The error log (limiterd.errorlog): failed provider outcomes, bounded by age and rows.
    await conn.execute(
        """CREATE TABLE errors (
            at REAL NOT NULL, scope TEXT NOT NULL, model TEXT NOT NULL, outcome TEXT NOT NULL,
            http_status INTEGER NOT NULL, error_type TEXT NOT NULL, error_code TEXT NOT NULL,
            provider_request_id TEXT NOT NULL, fell_back INTEGER NOT NULL
        )"""
    )
    await conn.execute("CREATE INDEX errors_at ON errors (at)")


MIGRATIONS: list[Migration] = [_v1, _v2]
SCHEMA_VERSION = len(MIGRATIONS)


# ---- SQL for write(), one statement per kind of row.

_UPSERT_RESERVATION = (
    "INSERT OR REPLACE INTO reservations VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)"
)
_EXTEND = "UPDATE reservations SET expires_at = ? WHERE id = ?"
_SETTLE = (
    "UPDATE reservations SET state = ?, settled_at = ?, refunded_requests = ?,"
    " refunded_input = ?, refunded_output = ?, overrun_requests = ?, overrun_input = ?,"
    " overrun_output = ?, outcome = ? WHERE id = ?"
)
_FORGET = "DELETE FROM reservations WHERE settled_at <= ?"
_DELETE_RESERVATION = "DELETE FROM reservations WHERE id = ?"
_UPSERT_BUCKET = "INSERT OR REPLACE INTO buckets VALUES (?,?,?,?,?,?,?)"
_DELETE_BUCKET = "DELETE FROM buckets WHERE scope = ? AND model = ? AND user = ?"
_UPSERT_PAUSE = "INSERT OR REPLACE INTO pauses VALUES (?,?,?)"


@dataclass(slots=True)
class _Patch:
    """What a batch changes on a reservation row it did not open."""

    expires_at: float | None = None
    settlement: Settlement | None = None


def _settlement_values(s: Settlement) -> tuple[Any, ...]:
    return (
        s.state.value,
        s.settled_at,
        s.refunded.requests,
        s.refunded.input_tokens,
        s.refunded.output_tokens,
        s.overrun.requests,
        s.overrun.input_tokens,
        s.overrun.output_tokens,
        s.outcome.value if s.outcome else None,
    )


_OPEN_SETTLEMENT_VALUES = (State.OPEN.value, None, None, None, None, None, None, None, None)


def _reservation_row(r: Reservation) -> tuple[Any, ...]:
    return (
        r.id,
        r.scope,
        r.model,
        r.user,
        r.request_id,
        r.reserved.requests,
        r.reserved.input_tokens,
        r.reserved.output_tokens,
        json.dumps([list(k) for k in r.buckets], separators=(",", ":")),
        r.granted_at,
        r.expires_at,
        r.waited_s,
        *(_settlement_values(r.settlement) if r.settlement else _OPEN_SETTLEMENT_VALUES),
    )


@dataclass(slots=True)
class _Plan:
    """A batch collapsed to its net effect, in the order the statements must run."""

    forget_before: float | None  # 1. DELETE settled rows up to this time (the latest cut)
    deletes: list[tuple[str]]  # 2. rows opened in this batch and forgotten in it again
    upserts: list[tuple[Any, ...]]  # 3. rows opened in this batch, as they ended
    extends: list[tuple[float, str]]  # 4. patches to rows of earlier batches
    settles: list[tuple[Any, ...]]
    bucket_upserts: list[tuple[Any, ...]]
    bucket_deletes: list[tuple[str, str, str]]
    pauses: list[tuple[str, str, float]]


def _plan(changes: Iterable[Change]) -> _Plan:
    opened: dict[str, Reservation] = {}
    patches: dict[str, _Patch] = {}
    deleted: set[str] = set()
    forget_before: float | None = None
    buckets: dict[BucketKey, BucketLevels | None] = {}
    pauses: dict[tuple[str, str], float] = {}

    for c in changes:
        if isinstance(c, ReservationOpened):
            r = c.reservation
            opened[r.id] = r
            deleted.discard(r.id)
            patches.pop(r.id, None)
        elif isinstance(c, LeaseExtended):
            if (r0 := opened.get(c.reservation_id)) is not None:
                opened[c.reservation_id] = replace(r0, expires_at=c.expires_at)
            elif c.reservation_id not in deleted:
                patches.setdefault(c.reservation_id, _Patch()).expires_at = c.expires_at
        elif isinstance(c, ReservationSettled):
            if (r0 := opened.get(c.reservation_id)) is not None:
                opened[c.reservation_id] = replace(r0, settlement=c.settlement)
            elif c.reservation_id not in deleted:
                patches.setdefault(c.reservation_id, _Patch()).settlement = c.settlement
        elif isinstance(c, SettlementsForgotten):
            cut = c.settled_before
            forget_before = cut if forget_before is None else max(forget_before, cut)
            # Rows this batch settled before the cut go now; the SQL DELETE (run first)
            # only has to cover rows settled by earlier batches.
            for rid, r in list(opened.items()):
                if r.settlement is not None and r.settlement.settled_at <= cut:
                    del opened[rid]
                    deleted.add(rid)
            for rid, p in list(patches.items()):
                if p.settlement is not None and p.settlement.settled_at <= cut:
                    del patches[rid]
                    deleted.add(rid)
        elif isinstance(c, BucketLevels):
            buckets[c.key] = c
        elif isinstance(c, BucketDropped):
            buckets[c.key] = None
        elif isinstance(c, PauseSet):
            pauses[(c.scope, c.budget)] = c.until
        else:  # pragma: no cover - the Change union is closed
            raise StorageError(f"unknown change type {type(c).__name__}")

    return _Plan(
        forget_before=forget_before,
        deletes=[(rid,) for rid in deleted],
        upserts=[_reservation_row(r) for r in opened.values()],
        extends=[(p.expires_at, rid) for rid, p in patches.items() if p.expires_at is not None],
        settles=[
            (*_settlement_values(p.settlement), rid)
            for rid, p in patches.items()
            if p.settlement is not None
        ],
        bucket_upserts=[
            (*k, b.requests, b.input_tokens, b.output_tokens, b.as_of)
            for k, b in buckets.items()
            if b is not None
        ],
        bucket_deletes=[(k.scope, k.budget, k.user) for k, b in buckets.items() if b is None],
        pauses=[(s, m, until) for (s, m), until in pauses.items()],
    )


# ---- loading


_OPEN_COLUMNS = (
    "id, scope, model, user, request_id, reserved_requests, reserved_input, reserved_output,"
    " buckets, granted_at, expires_at, waited_s"
)
# Open rows are most of a big file: reading them without the NULL settlement columns is
# markedly cheaper (Python builds one object per value fetched).
_SELECT_OPEN = f"SELECT {_OPEN_COLUMNS} FROM reservations WHERE settled_at IS NULL"
_SELECT_SETTLED = (
    f"SELECT {_OPEN_COLUMNS}, state, settled_at, refunded_requests, refunded_input,"
    " refunded_output, overrun_requests, overrun_input, overrun_output, outcome"
    " FROM reservations WHERE settled_at IS NOT NULL"
)


class _RowReader:
    """Rows -> Reservations, sharing equal frozen parts (bucket tuples, Amounts)."""

    def __init__(self) -> None:
        self.keys: dict[str, tuple[BucketKey, ...]] = {}  # most rows share a few bucket sets
        self.amounts: dict[tuple[int, int, int], Amounts] = {}
        self.states = {s.value: s for s in State}
        self.outcomes = {o.value: o for o in Outcome}

    def open_rows(self, rows: Iterable[Sequence[Any]]) -> list[Reservation]:
        keys_cache, amounts_cache = self.keys, self.amounts
        out: list[Reservation] = []
        append = out.append
        for (
            rid,
            scope,
            model,
            user,
            request_id,
            rq,
            ri,
            ro,
            bjson,
            granted,
            expires,
            waited,
        ) in rows:
            keys = keys_cache.get(bjson)
            if keys is None:
                keys = keys_cache[bjson] = tuple(BucketKey(*k) for k in json.loads(bjson))
            reserved = amounts_cache.get((rq, ri, ro))
            if reserved is None:
                reserved = amounts_cache[(rq, ri, ro)] = Amounts(rq, ri, ro)
            append(
                Reservation(
                    rid, scope, model, user, request_id, reserved, keys, granted, expires, waited
                )
            )
        return out

    def settled_rows(self, rows: Iterable[Sequence[Any]]) -> list[Reservation]:
        rows = list(rows)
        out = self.open_rows(r[:12] for r in rows)
        for i, (state, settled_at, fq, fi, fo, oq, oi, oo, outcome) in enumerate(
            r[12:] for r in rows
        ):
            settlement = Settlement(
                state=self.states[state],
                settled_at=settled_at,
                refunded=Amounts(fq, fi, fo),
                overrun=Amounts(oq, oi, oo),
                outcome=self.outcomes[outcome] if outcome is not None else None,
            )
            out[i] = replace(out[i], settlement=settlement)
        return out


# ---- error messages


def _code(e: BaseException) -> int | None:
    code = getattr(e, "sqlite_errorcode", None)
    return code & 0xFF if isinstance(code, int) else None


def _startup_error(path: Path, e: BaseException) -> StartupError:
    """One operator line for anything that stops the journal from opening."""
    code = _code(e)
    err = e.errno if isinstance(e, OSError) else None
    if code in (sqlite3.SQLITE_NOTADB, sqlite3.SQLITE_CORRUPT):
        return StartupError(
            f"{path} is not a limiterd database or is corrupt: move it aside "
            f"(mv {path} {path}.bad) and start again; state in it is lost"
        )
    if err in (errno.ENOTDIR, errno.EEXIST):  # mkdir met a file where a folder should be
        return StartupError(
            f"{path} is not writable: a parent of it is a file, not a folder ({e}): "
            "move that file or point --db elsewhere"
        )
    if code == sqlite3.SQLITE_FULL or err in (errno.ENOSPC, errno.EDQUOT):
        return StartupError(f"{path}: the disk is full ({e}): free space and start again")
    if code in (sqlite3.SQLITE_READONLY, sqlite3.SQLITE_CANTOPEN, sqlite3.SQLITE_PERM) or err in (
        errno.EACCES,
        errno.EPERM,
        errno.EROFS,
    ):
        return StartupError(
            f"{path} is not writable ({e}): fix the permissions of {path.parent} "
            "or point --db elsewhere"
        )
    return StartupError(f"cannot open {path}: {e}")


class _NotOurs(Exception):
    """The file is a SQLite database, but not one limiterd wrote, or quick_check failed."""


def _apply(conn: aiosqlite.Connection, plan: _Plan) -> None:
    """Write one planned batch as one transaction. Runs on aiosqlite's thread."""
    db = conn._conn
    if db.in_transaction:  # a cancelled write() may have left one behind
        db.execute("ROLLBACK")
    db.execute("BEGIN IMMEDIATE")
    try:
        if plan.forget_before is not None:
            db.execute(_FORGET, (plan.forget_before,))
        for sql, rows in (
            (_DELETE_RESERVATION, plan.deletes),
            (_UPSERT_RESERVATION, plan.upserts),
            (_EXTEND, plan.extends),
            (_SETTLE, plan.settles),
            (_UPSERT_BUCKET, plan.bucket_upserts),
            (_DELETE_BUCKET, plan.bucket_deletes),
            (_UPSERT_PAUSE, plan.pauses),
        ):
            if rows:
                db.executemany(sql, rows)
        db.execute("COMMIT")
    except BaseException:
        if db.in_transaction:
            db.execute("ROLLBACK")
        raise


class SqliteJournal(Journal):
    durable = True

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
        self._conn: aiosqlite.Connection | None = None
        self._lock_fd: int | None = None

    @property
    def lock_path(self) -> Path:
        return self.path.with_name(self.path.name + ".lock")

    def describe(self) -> str:
        cap = f", max {self.max_size_bytes} bytes" if self.max_size_bytes else ""
        return f"sqlite {self.path} (WAL, synchronous={self.synchronous}{cap})"

    # ---- open

    async def open(self) -> Snapshot:
        if self._conn is not None:
            raise StorageError(f"{self.path} is already open")
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise _startup_error(self.path, e) from e
        if self.path.is_dir():
            raise StartupError(f"{self.path} is a folder: point --db at a file inside it")
        self._lock()
        try:
            return await self._open_locked()
        except BaseException:
            await self._abandon()
            raise

    def _lock(self) -> None:
        """One daemon per file. flock is dropped by the kernel when the process dies."""
        try:
            fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        except OSError as e:
            raise _startup_error(self.path, e) from e
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise StartupError(
                f"{self.path} is in use by another limiterd (pid {holder}); "
                "stop it or use another --db"
            ) from None
        except OSError as e:
            os.close(fd)
            raise _startup_error(self.path, e) from e
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        except OSError as e:
            os.close(fd)
            raise _startup_error(self.path, e) from e
        self._lock_fd = fd

    def _unlock(self) -> None:
        if self._lock_fd is not None:
            fd, self._lock_fd = self._lock_fd, None
            # Leave the pid in place: truncating could race a successor's write.
            os.close(fd)  # closing the only description drops the flock

    async def _abandon(self) -> None:
        conn, self._conn = self._conn, None
        try:
            if conn is not None:
                await conn.close()
        except (sqlite3.Error, ValueError):
            pass  # we are already reporting why the open failed
        finally:
            self._unlock()

    async def _open_locked(self) -> Snapshot:
        try:
            self._conn = conn = await aiosqlite.connect(self.path, isolation_level=None)
            await self._pragmas(conn)
            rows = list(await conn.execute_fetchall("PRAGMA quick_check"))
            if [tuple(r) for r in rows] != [("ok",)]:
                raise _NotOurs("; ".join(str(r[0]) for r in rows[:3]))
            await self._migrate(conn)
            return await self._load(conn)
        except _NotOurs:
            raise StartupError(
                f"{self.path} is not a limiterd database or is corrupt: move it aside "
                f"(mv {self.path} {self.path}.bad) and start again; state in it is lost"
            ) from None
        except (sqlite3.Error, OSError) as e:
            raise _startup_error(self.path, e) from e

    async def _pragmas(self, conn: aiosqlite.Connection) -> None:
        await conn.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
        # A garbage file fails here with SQLITE_NOTADB: this is the first read of the header.
        mode = list(await conn.execute_fetchall("PRAGMA journal_mode = WAL"))
        if not mode or str(mode[0][0]).lower() != "wal":
            raise sqlite3.OperationalError(f"cannot switch to WAL mode (got {mode})")
        await conn.execute(f"PRAGMA synchronous = {self.synchronous}")
        await conn.execute(f"PRAGMA wal_autocheckpoint = {WAL_AUTOCHECKPOINT}")
        await conn.execute(f"PRAGMA journal_size_limit = {JOURNAL_SIZE_LIMIT}")
        await conn.execute("PRAGMA foreign_keys = OFF")
        if self.max_size_bytes is not None:
            page = list(await conn.execute_fetchall("PRAGMA page_size"))[0][0]
            pages = max(1, self.max_size_bytes // int(page))
            await conn.execute(f"PRAGMA max_page_count = {pages}")

    async def _migrate(self, conn: aiosqlite.Connection) -> None:
        """Bring the file to the newest schema in one transaction: all steps or none."""
        latest = len(MIGRATIONS)
        await conn.execute("BEGIN IMMEDIATE")
        try:
            version = await self._version(conn)
            if version > latest:
                raise StartupError(
                    f"{self.path} was written by a newer limiterd (schema {version}, "
                    f"this build knows up to {latest}): upgrade limiterd "
                    "or point --db elsewhere"
                )
            if version == 0:
                await conn.execute("CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT)")
            for migration in MIGRATIONS[version:]:
                await migration(conn)
            if version < latest:
                await conn.execute(
                    "INSERT OR REPLACE INTO meta VALUES ('schema_version', ?)", (str(latest),)
                )
            # Pauses that ran out while we were down mean nothing any more.
            await conn.execute("DELETE FROM pauses WHERE until < ?", (self._clock.now(),))
            await conn.execute("COMMIT")
        except BaseException:
            await self._rollback_quietly(conn)
            raise

    @staticmethod
    async def _version(conn: aiosqlite.Connection) -> int:
        tables = {str(r[0]) for r in await conn.execute_fetchall(
            "SELECT name FROM sqlite_master WHERE type = 'table'"
        )}  # fmt: skip
        if not tables:
            return 0
        if "meta" not in tables:
            raise _NotOurs
        rows = list(
            await conn.execute_fetchall("SELECT value FROM meta WHERE key = 'schema_version'")
        )
        try:
            return int(rows[0][0])
        except (IndexError, TypeError, ValueError):
            raise _NotOurs from None

    @staticmethod
    async def _load(conn: aiosqlite.Connection) -> Snapshot:
        reader = _RowReader()
        reservations = reader.open_rows(await conn.execute_fetchall(_SELECT_OPEN))
        reservations += reader.settled_rows(await conn.execute_fetchall(_SELECT_SETTLED))
        buckets = tuple(
            BucketLevels(BucketKey(s, m, u), rq, it, ot, as_of)
            for s, m, u, rq, it, ot, as_of in await conn.execute_fetchall("SELECT * FROM buckets")
        )
        pauses = tuple(
            PauseSet(s, m, until)
            for s, m, until in await conn.execute_fetchall("SELECT * FROM pauses")
        )
        return Snapshot(reservations=tuple(reservations), buckets=buckets, pauses=pauses)

    # ---- write

    async def write(self, changes: Sequence[Change]) -> None:
        conn = self._conn
        if conn is None:
            raise StorageError(f"{self.path} is not open")
        if not changes:
            return
        plan = _plan(changes)
        try:
            # The whole batch in one hop to aiosqlite's thread: a hop per statement (BEGIN,
            # each executemany, COMMIT) costs more than the SQL at small batch sizes.
            # Connection._execute is how every aiosqlite method reaches that thread.
            await conn._execute(_apply, conn, plan)  # type: ignore[no-untyped-call]
        except (sqlite3.Error, OSError, ValueError, OverflowError) as e:
            # OverflowError: an int beyond SQLite's 64 bits, i.e. bad input, not a crash.
            await self._rollback_quietly(conn)
            raise StorageError(f"{self.path}: write failed, nothing was written: {e}") from e
        except BaseException:
            await self._rollback_quietly(conn)
            raise

    @staticmethod
    async def _rollback_quietly(conn: aiosqlite.Connection) -> None:
        try:
            if conn.in_transaction:
                await conn.execute("ROLLBACK")
        except (sqlite3.Error, ValueError):
            pass  # SQLite rolls back by itself on the errors that break this

    # ---- the error log (limiterd.errorlog.ErrorStore)

    async def load_errors(self, since: float) -> list[ErrorEntry]:
        conn = self._conn
        if conn is None:
            return []
        rows = await conn.execute_fetchall(
            "SELECT * FROM errors WHERE at >= ? ORDER BY at", (since,))
        return entries_from_rows(rows)

    async def write_errors(
        self, entries: Sequence[ErrorEntry], keep_after: float, max_rows: int
    ) -> None:
        conn = self._conn
        if conn is None:
            raise StorageError(f"{self.path} is not open")
        rows = [(e.at, e.scope, e.model, e.outcome, e.http_status, e.error_type, e.error_code,
                 e.provider_request_id, int(e.fell_back)) for e in entries]

        def apply(conn: aiosqlite.Connection) -> None:
            db = conn._conn
            db.execute("BEGIN IMMEDIATE")
            try:
                db.executemany("INSERT INTO errors VALUES (?,?,?,?,?,?,?,?,?)", rows)
                db.execute("DELETE FROM errors WHERE at < ?", (keep_after,))
                db.execute(
                    "DELETE FROM errors WHERE rowid NOT IN"
                    " (SELECT rowid FROM errors ORDER BY at DESC LIMIT ?)", (max_rows,))
                db.execute("COMMIT")
            except BaseException:
                if db.in_transaction:
                    db.execute("ROLLBACK")
                raise

        try:
            await conn._execute(apply, conn)  # type: ignore[no-untyped-call]
        except (sqlite3.Error, OSError, ValueError, OverflowError) as e:
            raise StorageError(f"{self.path}: error log write failed: {e}") from e

    # ---- close

    async def close(self) -> None:
        conn, self._conn = self._conn, None
        if conn is None:
            self._unlock()
            return
        try:
            try:
                if conn.in_transaction:
                    await conn.execute("ROLLBACK")
                await conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            finally:
                await conn.close()  # stops aiosqlite's thread even if the checkpoint failed
        except (sqlite3.Error, OSError, ValueError) as e:
            raise StorageError(f"{self.path}: close failed: {e}") from e
        finally:
            self._unlock()
