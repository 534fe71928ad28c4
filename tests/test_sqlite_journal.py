"""SqliteJournal on real files: round trips, atomic batches, and every startup fault we can
cause for real (no mocks of sqlite)."""

from __future__ import annotations

import asyncio
import errno
import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import aiosqlite
import pytest

from limiterd.clock import FakeClock
from limiterd.errorlog import ErrorEntry
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
from limiterd.storage import (
    MemoryJournal,
    StartupError,
    StorageError,
    default_db_path,
    open_journal,
)
from limiterd.storage.sqlite import MIGRATIONS, SqliteJournal
from limiterd.storage.sqlite import schema as schema_module

SCHEMA_VERSION = len(MIGRATIONS)

T0 = 1_700_000_000.0
B_MODEL = BucketKey("team", "claude")
B_USER = BucketKey("team", "claude", "alice")
IS_ROOT = os.geteuid() == 0


def res(rid: str, t: float = T0, user: str = "alice", **kw: object) -> Reservation:
    fields: dict[str, object] = dict(
        id=rid,
        scope="team",
        model="claude",
        user=user,
        request_id=f"req-{rid}",
        reserved=Amounts(1, 100, 50),
        buckets=(B_MODEL, BucketKey("team", "claude", user)),
        granted_at=t,
        expires_at=t + 60,
        waited_s=0.25,
    )
    fields.update(kw)
    return Reservation(**fields)  # type: ignore[arg-type]


def reported(t: float) -> Settlement:
    return Settlement(
        State.REPORTED, t, refunded=Amounts(0, 10, 20), overrun=Amounts(0, 0, 5), outcome=Outcome.OK
    )


def by_id(snap: Snapshot) -> dict[str, Reservation]:
    return {r.id: r for r in snap.reservations}


async def reopen(path: Path, **kw: object) -> Snapshot:
    j = SqliteJournal(path, clock=FakeClock(T0), **kw)  # type: ignore[arg-type]
    try:
        return await j.open()
    finally:
        await j.close()


@contextmanager
def tmpfs(where: Path, size: str, ro: bool = False) -> Iterator[Path]:
    """A real, tiny filesystem: needs root with CAP_SYS_ADMIN, else the test is skipped."""
    where.mkdir()
    opts = f"size={size}" + (",ro" if ro else "")
    r = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", opts, "tmpfs", str(where)], capture_output=True
    )
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {r.stderr.decode().strip()}")
    try:
        yield where
    finally:
        subprocess.run(["umount", str(where)], check=True)


# ---- round trips


async def test_round_trip_every_change_type(tmp_path: Path) -> None:
    path = tmp_path / "db.sqlite3"
    j = SqliteJournal(path, clock=FakeClock(T0))
    assert await j.open() == Snapshot((), (), ())
    r1, r2, r3, r4 = res("r1"), res("r2", user="bob"), res("r3"), res("r4")
    await j.write(
        [
            ReservationOpened(r1),
            ReservationOpened(r2),
            ReservationOpened(r3),
            ReservationSettled("r3", Settlement(State.RELEASED, T0 + 1)),  # same batch
            BucketLevels(B_MODEL, 1.0, 2.0, 3.0, T0),
            BucketLevels(B_MODEL, 4.0, None, 6.5, T0 + 1),  # later wins; None = unlimited
            BucketLevels(B_USER, 7.0, 8.0, 9.0, T0),
            PauseSet("team", "claude", T0 + 100),
            PauseSet("team", "claude", T0 + 200),
            PauseSet("team", "haiku", T0 + 300),
        ]
    )
    await j.write(
        [
            LeaseExtended("r1", T0 + 500),
            LeaseExtended("r1", T0 + 600),
            ReservationSettled("r2", reported(T0 + 5)),
            BucketDropped(B_USER),
            ReservationOpened(r4),
            ReservationSettled("r4", Settlement(State.EXPIRED, T0 + 70)),
        ]
    )
    # Forget up to T0 + 5: r2 (settled at +5) and r3 (+1) go, r4 (+70) and open r1 stay.
    await j.write([SettlementsForgotten(T0 + 5, ("r2", "r3"))])
    await j.close()
    await j.close()  # idempotent

    snap = await reopen(path)
    assert by_id(snap) == {
        "r1": res("r1", expires_at=T0 + 600),
        "r4": res("r4", settlement=Settlement(State.EXPIRED, T0 + 70)),
    }
    assert snap.buckets == (BucketLevels(B_MODEL, 4.0, None, 6.5, T0 + 1),)
    assert sorted(snap.pauses, key=lambda p: p.budget) == [
        PauseSet("team", "claude", T0 + 200),
        PauseSet("team", "haiku", T0 + 300),
    ]


async def test_settled_rows_come_back_settled(tmp_path: Path) -> None:
    path = tmp_path / "db.sqlite3"
    j = SqliteJournal(path)
    await j.open()
    await j.write([ReservationOpened(res("a")), ReservationOpened(res("b"))])
    await j.write([ReservationSettled("a", reported(T0 + 3))])
    await j.write([ReservationSettled("b", Settlement(State.RELEASED, T0 + 4))])
    await j.close()
    got = by_id(await reopen(path))
    assert got["a"].settlement == reported(T0 + 3)
    assert got["a"].state is State.REPORTED
    assert got["b"].settlement == Settlement(State.RELEASED, T0 + 4)


async def test_forgetting_inside_one_batch_follows_the_order(tmp_path: Path) -> None:
    path = tmp_path / "db.sqlite3"
    j = SqliteJournal(path)
    await j.open()
    await j.write([ReservationOpened(res("old"))])
    await j.write(
        [
            ReservationSettled("old", reported(T0 + 1)),  # row from an earlier batch
            ReservationOpened(res("x")),
            ReservationSettled("x", reported(T0 + 2)),
            SettlementsForgotten(T0 + 10, ("old", "x")),
            # Settled after the cut was taken, though its time is below it: it stays.
            ReservationOpened(res("late")),
            ReservationSettled("late", reported(T0 + 3)),
            ReservationOpened(res("open")),
        ]
    )
    await j.close()
    assert set(by_id(await reopen(path))) == {"late", "open"}


async def test_the_same_batch_twice_is_harmless(tmp_path: Path) -> None:
    path = tmp_path / "db.sqlite3"
    batch: list[Change] = [
        ReservationOpened(res("a")),
        ReservationOpened(res("b")),
        ReservationSettled("b", reported(T0 + 1)),
        LeaseExtended("a", T0 + 90),
        BucketLevels(B_MODEL, 1.0, 2.0, 3.0, T0),
        BucketDropped(B_USER),
        PauseSet("team", "claude", T0 + 5),
        SettlementsForgotten(T0 - 1, ()),
    ]
    j = SqliteJournal(path, clock=FakeClock(T0))
    await j.open()
    await j.write(batch)
    await j.close()
    once = await reopen(path)
    j = SqliteJournal(path, clock=FakeClock(T0))
    await j.open()
    await j.write(batch)
    await j.close()
    assert await reopen(path) == once
    assert by_id(once)["a"].expires_at == T0 + 90


async def test_past_pauses_are_dropped_at_open(tmp_path: Path) -> None:
    path = tmp_path / "db.sqlite3"
    j = SqliteJournal(path, clock=FakeClock(T0))
    await j.open()
    await j.write([PauseSet("team", "a", T0 + 10), PauseSet("team", "b", T0 + 100)])
    await j.close()
    j = SqliteJournal(path, clock=FakeClock(T0 + 50))
    snap = await j.open()
    await j.close()
    assert snap.pauses == (PauseSet("team", "b", T0 + 100),)


# ---- failed writes


async def test_a_failed_batch_leaves_nothing_and_can_be_retried(tmp_path: Path) -> None:
    path = tmp_path / "db.sqlite3"
    cap = 96 * 1024  # a real SQLITE_FULL via max_page_count
    j = SqliteJournal(path, max_size_bytes=cap)
    await j.open()
    await j.write([ReservationOpened(res("base")), BucketLevels(B_MODEL, 1.0, 1.0, 1.0, T0)])
    before = await reopen_copy(path)

    big: list[Change] = [
        ReservationSettled("base", reported(T0 + 1)),
        BucketLevels(B_MODEL, 9.0, 9.0, 9.0, T0 + 1),
        *(ReservationOpened(res(f"n{i:05d}", request_id="x" * 200)) for i in range(3000)),
        PauseSet("team", "claude", T0 + 99),
    ]
    with pytest.raises(StorageError) as err:
        await j.write(big)
    assert str(path) in str(err.value) and "full" in str(err.value)
    # The connection is still usable after the failure.
    await j.write([LeaseExtended("base", T0 + 77)])
    await j.close()

    after = await reopen(path)
    assert after.buckets == before.buckets
    assert after.pauses == ()
    assert by_id(after) == {"base": res("base", expires_at=T0 + 77)}

    j = SqliteJournal(path)  # the cap is lifted: the same batch goes through
    await j.open()
    await j.write(big)
    await j.close()
    done = await reopen(path)
    assert len(done.reservations) == 3001
    assert by_id(done)["base"].settlement == reported(T0 + 1)
    assert done.pauses == (PauseSet("team", "claude", T0 + 99),)


async def reopen_copy(path: Path) -> Snapshot:
    """Read what is committed without closing the journal that has it open."""
    con = sqlite3.connect(path)
    try:
        copy = path.with_name("copy.sqlite3")
        con.execute("VACUUM INTO ?", (str(copy),))
    finally:
        con.close()
    return await reopen(copy)


async def test_write_when_not_open_is_a_storage_error(tmp_path: Path) -> None:
    j = SqliteJournal(tmp_path / "db.sqlite3")
    with pytest.raises(StorageError, match="is not open"):
        await j.write([PauseSet("s", "m", T0)])
    await j.close()  # closing a journal that was never opened is fine


# ---- startup faults


async def test_missing_folders_are_created(tmp_path: Path) -> None:
    path = tmp_path / "a" / "b" / "db.sqlite3"
    j = SqliteJournal(path)
    await j.open()
    await j.close()
    assert path.is_file()
    assert not path.with_name("db.sqlite3.lock").exists()  # the database itself is locked


async def test_folder_under_a_regular_file_is_refused(tmp_path: Path) -> None:
    (tmp_path / "plain").write_text("not a folder")
    path = tmp_path / "plain" / "db.sqlite3"
    with pytest.raises(StartupError) as err:
        await SqliteJournal(path).open()
    msg = str(err.value)
    assert "\n" not in msg and str(path) in msg and "not writable" in msg


@pytest.mark.skipif(IS_ROOT, reason="root writes through chmod 0o500; see the tmpfs variant")
async def test_unwritable_folder_is_refused(tmp_path: Path) -> None:
    folder = tmp_path / "ro"
    folder.mkdir()
    folder.chmod(0o500)
    try:
        with pytest.raises(StartupError, match="not writable"):
            await SqliteJournal(folder / "db.sqlite3").open()
    finally:
        folder.chmod(0o700)


async def test_read_only_filesystem_is_refused(tmp_path: Path) -> None:
    # Works as root too: EROFS stops everyone.
    with tmpfs(tmp_path / "ro", "1m", ro=True) as mnt:
        path = mnt / "db.sqlite3"
        with pytest.raises(StartupError) as err:
            await SqliteJournal(path).open()
        assert "not writable" in str(err.value) and str(path) in str(err.value)


async def test_existing_database_on_a_read_only_filesystem_is_refused(tmp_path: Path) -> None:
    with tmpfs(tmp_path / "fs", "1m") as mnt:
        path = mnt / "db.sqlite3"
        j = SqliteJournal(path)
        await j.open()
        await j.write([ReservationOpened(res("a"))])
        await j.close()
        subprocess.run(["mount", "-o", "remount,ro", str(mnt)], check=True)
        with pytest.raises(StartupError, match="not writable"):
            await SqliteJournal(path).open()


async def test_full_disk_at_start_is_refused(tmp_path: Path) -> None:
    with tmpfs(tmp_path / "fs", "256k") as mnt:
        filler = mnt / "filler"
        with pytest.raises(OSError) as full:  # fill every block
            with filler.open("wb", buffering=0) as f:
                while True:
                    f.write(b"\0" * 4096)
        assert full.value.errno == errno.ENOSPC
        with pytest.raises(StartupError) as err:
            await SqliteJournal(mnt / "db.sqlite3").open()
        assert "disk is full" in str(err.value)
        filler.unlink()  # space again: the same path opens
        j = SqliteJournal(mnt / "db.sqlite3")
        await j.open()
        await j.close()


async def test_size_cap_too_small_to_create_the_schema_is_refused(tmp_path: Path) -> None:
    # Runs without a tmpfs: SQLite's own SQLITE_FULL when the schema does not fit in the cap.
    path = tmp_path / "db.sqlite3"
    with pytest.raises(StartupError) as err:
        await SqliteJournal(path, max_size_bytes=4096).open()
    assert "disk is full" in str(err.value) and str(path) in str(err.value)
    # Nothing half-made: without the cap the same file opens and is empty.
    assert await reopen(path) == Snapshot((), (), ())


async def test_garbage_file_is_refused_with_how_to_recover(tmp_path: Path) -> None:
    path = tmp_path / "db.sqlite3"
    path.write_bytes(b"this is not sqlite at all\n" * 500)
    with pytest.raises(StartupError) as err:
        await SqliteJournal(path).open()
    assert str(err.value) == (
        f"{path} is not a limiterd database or is corrupt: move it aside "
        f"(mv {path} {path}.bad) and start again; state in it is lost"
    )
    # The failed open released the lock: a second try says the same, not "in use".
    with pytest.raises(StartupError, match="is corrupt"):
        await SqliteJournal(path).open()


async def test_truncated_database_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "db.sqlite3"
    j = SqliteJournal(path)
    await j.open()
    await j.write([ReservationOpened(res(f"r{i}", request_id="x" * 300)) for i in range(500)])
    await j.close()
    size = path.stat().st_size
    assert size > 64 * 1024
    with path.open("r+b") as f:
        f.truncate(size // 2)
    with pytest.raises(StartupError, match="is not a limiterd database or is corrupt"):
        await SqliteJournal(path).open()


async def test_corrupted_pages_are_refused(tmp_path: Path) -> None:
    path = tmp_path / "db.sqlite3"
    j = SqliteJournal(path)
    await j.open()
    await j.write([ReservationOpened(res(f"r{i}", request_id="x" * 300)) for i in range(500)])
    await j.close()
    with path.open("r+b") as f:  # scribble over the b-tree pages, keep the header
        f.seek(8192)
        f.write(os.urandom(32 * 1024))
    with pytest.raises(StartupError, match="is not a limiterd database or is corrupt"):
        await SqliteJournal(path).open()


async def test_someone_elses_sqlite_database_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "db.sqlite3"
    con = sqlite3.connect(path)
    con.execute("CREATE TABLE photos (id INTEGER PRIMARY KEY)")
    con.commit()
    con.close()
    with pytest.raises(StartupError, match="is not a limiterd database"):
        await SqliteJournal(path).open()
    con = sqlite3.connect(path)  # and it was left alone
    assert [r[0] for r in con.execute("SELECT name FROM sqlite_master")] == ["photos"]
    con.close()


async def test_newer_schema_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "db.sqlite3"
    await reopen(path)
    con = sqlite3.connect(path)
    con.execute("UPDATE meta SET value = '99' WHERE key = 'schema_version'")
    con.commit()
    con.close()
    with pytest.raises(StartupError) as err:
        await SqliteJournal(path).open()
    assert str(err.value) == (
        f"{path} was written by a newer limiterd (schema 99, this build knows up to "
        f"{SCHEMA_VERSION}): upgrade limiterd or point --db elsewhere"
    )


async def test_schema_version_is_recorded(tmp_path: Path) -> None:
    path = tmp_path / "db.sqlite3"
    await reopen(path)
    con = sqlite3.connect(path)
    row = con.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
    mode = con.execute("PRAGMA journal_mode").fetchone()
    con.close()
    assert row == (str(SCHEMA_VERSION),)
    assert mode == ("wal",)


# ---- one daemon per file


async def test_second_journal_on_the_same_file_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "db.sqlite3"
    first = SqliteJournal(path)
    await first.open()
    try:
        with pytest.raises(StartupError) as err:
            await SqliteJournal(path).open()
        assert str(err.value) == (
            f"{path} is in use by another limiterd (pid {os.getpid()}); stop it or use another --db"
        )
        # A refused open must not take the first journal's lock away.
        await first.write([PauseSet("s", "m", T0 + 1)])
    finally:
        await first.close()
    second = SqliteJournal(path)  # released on close
    await second.open()
    await second.close()


async def test_lock_held_by_another_process_names_its_pid(tmp_path: Path) -> None:
    path = tmp_path / "db.sqlite3"
    proc = spawn(
        f"""
        import asyncio
        from limiterd.storage.sqlite import SqliteJournal
        async def main():
            j = SqliteJournal({str(path)!r})
            await j.open()
            print("ready", flush=True)
            await asyncio.sleep(60)
        asyncio.run(main())
        """
    )
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline().strip() == "ready"
        with pytest.raises(StartupError) as err:
            await SqliteJournal(path).open()
        assert f"in use by another limiterd (pid {proc.pid})" in str(err.value)
        proc.send_signal(signal.SIGKILL)  # the kernel drops a dead process's flock
        proc.wait(timeout=10)
        assert await reopen(path) == Snapshot((), (), ())
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        if proc.stdout is not None:
            proc.stdout.close()


# ---- helpers


def test_describe_names_path_and_mode(tmp_path: Path) -> None:
    d = SqliteJournal(tmp_path / "x.sqlite3", synchronous="FULL").describe()
    assert str(tmp_path / "x.sqlite3") in d and "synchronous=FULL" in d
    with pytest.raises(ValueError, match="synchronous"):
        SqliteJournal(tmp_path / "x", synchronous="OFF")  # type: ignore[arg-type]


async def test_full_mode_round_trips(tmp_path: Path) -> None:
    path = tmp_path / "db.sqlite3"
    j = SqliteJournal(path, synchronous="FULL")
    await j.open()
    await j.write([ReservationOpened(res("a"))])
    await j.close()
    assert set(by_id(await reopen(path))) == {"a"}


def test_default_db_path(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("LIMITERD_DB", raising=False)
    monkeypatch.delenv("XDG_STATE_HOME", raising=False)
    assert default_db_path() == Path("var/limiterd.sqlite3")
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path))
    assert default_db_path() == tmp_path / "limiterd" / "limiterd.sqlite3"
    monkeypatch.setenv("LIMITERD_DB", "/srv/x.sqlite3")
    assert default_db_path() == Path("/srv/x.sqlite3")


def test_open_journal_picks_the_backend(tmp_path: Path) -> None:
    assert isinstance(open_journal(":memory:"), MemoryJournal)
    j = open_journal(str(tmp_path / "db.sqlite3"))
    assert isinstance(j, SqliteJournal) and j.durable


# ---- crashes


def spawn(code: str) -> subprocess.Popen[str]:
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": f"{root}:{root / 'client' / 'src'}"}
    return subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(code)], stdout=subprocess.PIPE, env=env, text=True
    )


async def test_every_acknowledged_batch_survives_sigkill(tmp_path: Path) -> None:
    path = tmp_path / "db.sqlite3"
    writer = spawn(
        f"""
        import asyncio
        from limiterd.ledger.model import *
        from limiterd.storage.sqlite import SqliteJournal
        K = BucketKey("team", "claude")
        async def main():
            j = SqliteJournal({str(path)!r})
            await j.open()
            for n in range(1_000_000):
                r = Reservation(f"r{{n}}", "team", "claude", "", "", Amounts(1, 2, 3), (K,),
                                1.0, 2.0)
                batch = [ReservationOpened(r), BucketLevels(K, n, n, n, float(n))]
                if n:
                    batch.append(ReservationSettled(f"r{{n - 1}}",
                                                    Settlement(State.RELEASED, float(n))))
                await j.write(batch)
                print(n, flush=True)  # acknowledged: must survive from here on
        asyncio.run(main())
        """
    )
    try:
        assert writer.stdout is not None
        acked = -1
        while acked < 300:
            line = writer.stdout.readline()
            assert line, "the writer died before it was killed"
            acked = int(line)
        writer.send_signal(signal.SIGKILL)
        writer.wait(timeout=10)
        rest = writer.stdout.read().split()
        acked = int(rest[-1]) if rest else acked
    finally:
        if writer.poll() is None:
            writer.kill()
            writer.wait()
        if writer.stdout is not None:
            writer.stdout.close()

    snap = await reopen(path)  # the lock died with the writer; quick_check passes
    got = by_id(snap)
    # Batch n is all there or not at all, and every acknowledged one is there.
    last = max(int(rid[1:]) for rid in got)
    assert last >= acked
    assert set(got) == {f"r{n}" for n in range(last + 1)}
    assert [r.id for r in snap.reservations if r.settlement is None] == [f"r{last}"]
    assert snap.buckets == (BucketLevels(BucketKey("team", "claude"), last, last, last, last),)


async def test_a_folder_as_the_db_path_is_refused(tmp_path: Path) -> None:
    with pytest.raises(StartupError, match="is a folder"):
        await SqliteJournal(tmp_path).open()


async def test_a_value_sqlite_cannot_hold_fails_the_whole_batch(tmp_path: Path) -> None:
    path = tmp_path / "db.sqlite3"
    j = SqliteJournal(path)
    await j.open()
    huge = res("huge", reserved=Amounts(1, 2**70, 1))
    with pytest.raises(StorageError, match="nothing was written"):
        await j.write([ReservationOpened(res("ok")), BucketLevels(B_MODEL, 1, 1, 1, T0),
                       ReservationOpened(huge)])  # fmt: skip
    await j.close()
    assert await reopen(path) == Snapshot((), (), ())


# ---- the journal and the error log share one connection


async def test_batches_and_error_log_writes_at_once_each_stay_whole(tmp_path: Path) -> None:
    """A transaction is several driver calls; the journal's batches and the error log's
    writes share the connection, so run together neither may put a statement inside the
    other's transaction (a second BEGIN fails; a COMMIT would commit half a batch)."""
    path = tmp_path / "db.sqlite3"
    j = SqliteJournal(path, clock=FakeClock(T0))
    await j.open()
    store = j.error_store()
    assert store is not None
    n = 20
    entries = [ErrorEntry(T0 + i, "team", "claude", "overloaded", 529, "overloaded_error", "",
                          f"req-{i}", i % 2 == 0) for i in range(n)]  # fmt: skip
    batches = [
        [ReservationOpened(res(f"r{i}")), BucketLevels(B_USER, i, 1, 1, T0 + i),
         PauseSet("team", "claude", T0 + i)]
        for i in range(n)
    ]  # fmt: skip
    await asyncio.gather(
        *(j.write(b) for b in batches),
        *(store.write_errors([e], keep_after=0.0, max_rows=1000) for e in entries),
    )
    assert await store.load_errors(0.0) == entries
    await j.close()
    snap = await reopen(path)
    assert set(by_id(snap)) == {f"r{i}" for i in range(n)}
    assert snap.buckets == (BucketLevels(B_USER, n - 1, 1, 1, T0 + n - 1),)
    assert snap.pauses == (PauseSet("team", "claude", T0 + n - 1),)


@pytest.mark.parametrize("begun", [False, True], ids=["BEGIN queued", "BEGIN ran"])
async def test_a_cancelled_write_keeps_nothing_and_leaves_no_transaction(
    tmp_path: Path, begun: bool
) -> None:
    """A batch is several calls; a cancellation between them must not leave SQLite's write
    lock held or part of a batch written. A call already queued still runs, then the
    rollback. Here the cancellation lands while the batch waits for its BEGIN."""
    path = tmp_path / "db.sqlite3"
    j = SqliteJournal(path, clock=FakeClock(T0))
    await j.open()
    batch = [ReservationOpened(res("a")), BucketLevels(B_USER, 1, 1, 1, T0)]
    task = asyncio.create_task(j.write(batch))
    await asyncio.sleep(0)  # the task has queued BEGIN and waits for its answer
    if begun:  # wait, without letting the task run on, until the driver's thread ran it
        db = j._conn.db  # type: ignore[union-attr]
        deadline = time.monotonic() + 30
        while not db.in_transaction and time.monotonic() < deadline:
            time.sleep(0.001)
        assert db.in_transaction
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    other = sqlite3.connect(path, timeout=0)  # "database is locked" if a BEGIN is still held
    other.execute("BEGIN IMMEDIATE")
    other.rollback()
    other.close()
    await j.write([ReservationOpened(res("b"))])
    await j.close()
    snap = await reopen(path)
    assert set(by_id(snap)) == {"b"} and snap.buckets == ()


# ---- migrations


async def test_a_new_migration_is_one_function_and_runs_in_a_transaction(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    mod = schema_module
    path = tmp_path / "db.sqlite3"
    base = len(mod.MIGRATIONS)
    j = SqliteJournal(path)
    await j.open()
    await j.write([ReservationOpened(res("a"))])
    await j.close()

    async def v2_broken(db: aiosqlite.Connection) -> None:
        await db.execute("ALTER TABLE reservations ADD COLUMN note TEXT")
        await db.execute("THIS IS NOT SQL")

    monkeypatch.setattr(mod, "MIGRATIONS", [*mod.MIGRATIONS, v2_broken])
    with pytest.raises(StartupError, match="cannot open"):
        await SqliteJournal(path).open()
    con = sqlite3.connect(path)  # still the old version, without the half-added column
    cols = [r[1] for r in con.execute("PRAGMA table_info(reservations)")]
    assert con.execute("SELECT value FROM meta").fetchall() == [(str(base),)]
    con.close()
    assert "note" not in cols

    async def v2(db: aiosqlite.Connection) -> None:
        await db.execute("ALTER TABLE reservations ADD COLUMN note TEXT")

    monkeypatch.setattr(mod, "MIGRATIONS", [*mod.MIGRATIONS[:base], v2])
    assert set(by_id(await reopen(path))) == {"a"}
    con = sqlite3.connect(path)
    assert con.execute("SELECT value FROM meta").fetchall() == [(str(base + 1),)]
    con.close()


async def test_a_version_1_database_migrates_forward_keeping_its_rows(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    mod = schema_module
    path = tmp_path / "db.sqlite3"
    full = list(mod.MIGRATIONS)
    monkeypatch.setattr(mod, "MIGRATIONS", full[:1])  # written by the first release
    j = SqliteJournal(path)
    await j.open()
    await j.write([ReservationOpened(res("a"))])
    await j.close()
    monkeypatch.setattr(mod, "MIGRATIONS", full)
    assert set(by_id(await reopen(path))) == {"a"}
    con = sqlite3.connect(path)
    assert con.execute("SELECT value FROM meta").fetchall() == [(str(len(full)),)]
    assert con.execute("SELECT count(*) FROM errors").fetchone() == (0,)
    con.close()


# ---- one daemon per database, whatever the path (issue 10, item 6)


def refused_start(proc: subprocess.Popen[str]) -> str:
    """A daemon expected to refuse to start: its stderr. One that serves instead is stopped
    (the test then fails on its exit code) rather than left running."""
    try:
        return proc.communicate(timeout=30)[1]
    except subprocess.TimeoutExpired:
        proc.kill()
        return proc.communicate()[1]


def test_symlink_and_hard_link_meet_the_same_lock(tmp_path: Path) -> None:
    # Three real daemons on one file, through its path, a symlink and a hard link: each once
    # took its own lock and granted nearly the whole bucket. Only the first may start.
    from tests.test_process import ANY_PORT, limiterd, serve

    db = tmp_path / "a" / "limiterd.sqlite3"
    db.parent.mkdir()
    sqlite3.connect(db).close()
    (tmp_path / "link.sqlite3").symlink_to(db)
    (tmp_path / "b").mkdir()
    os.link(db, tmp_path / "b" / "hard.sqlite3")
    first, _ = serve("--db", str(db))
    try:
        for other in (tmp_path / "link.sqlite3", tmp_path / "b" / "hard.sqlite3"):
            proc = limiterd("serve", "--listen", ANY_PORT, "--db", str(other))
            err = refused_start(proc)
            assert proc.returncode == 1, err
            assert err.strip() == (
                f"limiterd: cannot start: {other} is in use by another limiterd "
                f"(pid {first.pid}); stop it or use another --db"
            )
    finally:
        first.kill()
        first.communicate()


async def test_a_hard_link_is_refused_in_process_too(tmp_path: Path) -> None:
    path = tmp_path / "db.sqlite3"
    first = SqliteJournal(path)
    await first.open()
    try:
        os.link(path, tmp_path / "other.sqlite3")
        with pytest.raises(StartupError, match=f"in use by another limiterd .pid {os.getpid()}"):
            await SqliteJournal(tmp_path / "other.sqlite3").open()
        await first.write([PauseSet("s", "m", T0 + 1)])  # the refusal took nothing away
    finally:
        await first.close()


async def test_a_hard_linked_database_is_warned_about(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "db.sqlite3"
    await reopen(path)
    assert "hard links" not in caplog.text
    os.link(path, tmp_path / "other.sqlite3")
    await reopen(path)
    assert f"{path} has 2 hard links: always start limiterd with the same name" in caplog.text


# ---- readable SQLite, unreadable rows (issue 10, item 12)

BAD_ROWS = {
    "unknown state": "UPDATE reservations SET state = 'vanished' WHERE id = 'settled'",
    "open row with a state": "UPDATE reservations SET state = 'reported' WHERE id = 'open'",
    "broken JSON": "UPDATE reservations SET buckets = '[[\"team\", \"cla' WHERE id = 'open'",
    "JSON of the wrong shape": "UPDATE reservations SET buckets = '[1, 2]' WHERE id = 'open'",
    "JSON object": """UPDATE reservations SET buckets = '{"abc": 1}' WHERE id = 'open'""",
    "text for a number": "UPDATE reservations SET reserved_input = 'lots' WHERE id = 'open'",
    "unknown outcome": "UPDATE reservations SET outcome = 'meh' WHERE id = 'settled'",
    "bucket level as text": "UPDATE buckets SET requests = 'full'",
    "pause without a time": "INSERT INTO pauses VALUES ('s', 'm', 'soon')",
    "error row with a text status": (
        "INSERT INTO errors VALUES (1, 's', 'm', 'error', 'five hundred', '', '', '', 0)"),
}


async def database_with(path: Path, sql: str) -> None:
    j = SqliteJournal(path, clock=FakeClock(T0))
    await j.open()
    await j.write([ReservationOpened(res("open")), ReservationOpened(res("settled")),
                   ReservationSettled("settled", reported(T0 + 1)),
                   BucketLevels(B_MODEL, 1.0, 2.0, 3.0, T0)])
    await j.close()
    con = sqlite3.connect(path)
    con.execute(sql)
    con.commit()
    con.close()


@pytest.mark.parametrize("case", sorted(BAD_ROWS))
async def test_unreadable_rows_stop_the_start_with_one_line(tmp_path: Path, case: str) -> None:
    path = tmp_path / "db.sqlite3"
    await database_with(path, BAD_ROWS[case])
    with pytest.raises(StartupError) as err:
        await SqliteJournal(path, clock=FakeClock(T0)).open()
    msg = str(err.value)
    assert "\n" not in msg and msg.startswith(f"{path} is not a limiterd database or is corrupt")
    assert msg.endswith(f"(mv {path} {path}.bad) and start again; state in it is lost")


@pytest.mark.parametrize("case", ["unknown state", "broken JSON"])
async def test_the_daemon_says_so_in_one_line_not_a_traceback(tmp_path: Path, case: str) -> None:
    from tests.test_process import ANY_PORT, limiterd

    path = tmp_path / "db.sqlite3"
    await database_with(path, BAD_ROWS[case])
    proc = limiterd("serve", "--listen", ANY_PORT, "--db", str(path))
    err = refused_start(proc)
    assert proc.returncode == 1, err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert err.startswith(f"limiterd: cannot start: {path} is not a limiterd database or is")
