"""The engine on a real SQLite file: restarts, downtime, orphans, failing writes.

Time is a FakeClock shared across "restarts", so downtime is stepped, not slept.
"""

from __future__ import annotations

import asyncio
import sqlite3
import subprocess
from collections.abc import Sequence
from pathlib import Path

import pytest

from limiterd.clock import FakeClock
from limiterd.engine import Engine, PersistenceFailing
from limiterd.ledger.ledger import Granted
from limiterd.ledger.model import AcquireRequest, BucketKey, Change, Outcome, State
from limiterd.storage import StorageError
from limiterd.storage.sqlite import SqliteJournal
from tests.conftest import make_test_config
from tests.test_sqlite_journal import tmpfs

WAL_BOUND_BYTES = 1_200_000  # README, Durability: "the WAL stays under 1.2 MB"


def tiny(tokens: int, lease_s: float | None = None, request_id: str = "") -> AcquireRequest:
    return AcquireRequest("s", "tiny", "", tokens, 0, request_id=request_id, lease_s=lease_s)


async def started(db: Path, clock: FakeClock) -> Engine:
    engine = Engine(make_test_config(), SqliteJournal(db), clock)
    await engine.start()
    return engine


def level(engine: Engine, dim: int = 1) -> float:
    bucket = next(b for b in engine.ledger.buckets(engine.clock.now())
                  if b.key == BucketKey("s", "tiny"))
    return bucket.levels[dim]


async def test_restart_keeps_reservations_and_levels(tmp_path: Path) -> None:
    clock, db = FakeClock(), tmp_path / "l.sqlite3"
    engine = await started(db, clock)
    kept = await engine.acquire(tiny(300, request_id="keep"), 0)
    done = await engine.acquire(tiny(200), 0)
    assert isinstance(kept, Granted) and isinstance(done, Granted)
    await engine.report(done.reservation.id, 100, 0, Outcome.OK, 0)
    await engine.stop()

    again = await started(db, clock)
    try:
        assert [r.id for r in again.ledger.open_reservations()] == [kept.reservation.id]
        assert level(again) == pytest.approx(1000 - 300 - 100)
        replay = await again.acquire(tiny(300, request_id="keep"), 0)
        assert isinstance(replay, Granted) and replay.replayed
        assert replay.reservation.id == kept.reservation.id
        r, replayed = await again.report(done.reservation.id, 100, 0, Outcome.OK, 0)
        assert replayed and r.state is State.REPORTED
    finally:
        await again.stop()


async def test_restart_after_downtime_refills_and_settles_lapsed_leases(tmp_path: Path) -> None:
    clock, db = FakeClock(), tmp_path / "l.sqlite3"
    engine = await started(db, clock)
    short = await engine.acquire(tiny(500, lease_s=20), 0)
    long = await engine.acquire(tiny(400, lease_s=600), 0)
    assert isinstance(short, Granted) and isinstance(long, Granted)
    await engine.stop()
    clock.advance(30)  # down for 30 s: 500 tokens refill, the short lease lapses

    again = await started(db, clock)
    try:
        assert level(again) == pytest.approx(100 + 500)
        lapsed = again.ledger.get(short.reservation.id)
        assert lapsed is not None and lapsed.state is State.EXPIRED
        assert [r.id for r in again.ledger.open_reservations()] == [long.reservation.id]
        clock.advance(60)
        assert level(again) == 1000  # never above capacity
    finally:
        await again.stop()


async def test_a_restart_never_grants_more_than_no_restart(tmp_path: Path) -> None:
    clock = FakeClock()
    steady = Engine(make_test_config(), SqliteJournal(tmp_path / "a.sqlite3"), clock)
    await steady.start()
    restarted = await started(tmp_path / "b.sqlite3", clock)
    for engine in (steady, restarted):
        for tokens in (400, 300, 200):
            assert isinstance(await engine.acquire(tiny(tokens), 0), Granted)
    await restarted.stop()
    clock.advance(3)
    restarted = await started(tmp_path / "b.sqlite3", clock)
    try:
        results = [[isinstance(await e.acquire(tiny(60), 0), Granted) for _ in range(4)]
                    for e in (steady, restarted)]
        assert results[0] == results[1] == [True, True, False, False]
    finally:
        await steady.stop()
        await restarted.stop()


async def test_orphans_expire_and_capacity_comes_back(tmp_path: Path) -> None:
    clock = FakeClock()
    engine = await started(tmp_path / "l.sqlite3", clock)
    try:
        ids = []
        for _ in range(2):  # "conc" allows 2 in flight; these callers then vanish
            g = await engine.acquire(AcquireRequest("s", "conc", "", 10, 10, lease_s=30), 0)
            assert isinstance(g, Granted)
            ids.append(g.reservation.id)
        refused = await engine.acquire(AcquireRequest("s", "conc", "", 10, 10), 0)
        assert not isinstance(refused, Granted)
        clock.advance(30.01)
        for rid in ids:
            r = engine.ledger.get(rid)
            assert r is not None and r.state is State.EXPIRED
        assert isinstance(await engine.acquire(AcquireRequest("s", "conc", "", 10, 10), 0),
                          Granted)
    finally:
        await engine.stop()


@pytest.mark.logs_errors  # "persistence is failing" is the point
async def test_failing_writes_refuse_grants_and_recover_without_restart(tmp_path: Path) -> None:
    clock = FakeClock()
    with tmpfs(tmp_path / "fs", "512k") as mnt:
        engine = await started(mnt / "l.sqlite3", clock)
        try:
            before = await engine.acquire(tiny(100), 0)
            assert isinstance(before, Granted)
            filler = mnt / "filler"
            subprocess.run(["dd", "if=/dev/zero", f"of={filler}", "bs=4k"],
                           capture_output=True)  # fills the disk: ENOSPC
            for i in range(200):  # writes now fail; the grants are undone, not half-held
                try:
                    await engine.acquire(AcquireRequest(f"s{i}", "tiny", "", 1, 1), 0)
                except PersistenceFailing:
                    break
            else:
                pytest.fail("the disk never filled")
            with pytest.raises(PersistenceFailing, match="journal is failing"):
                await engine.acquire(tiny(1), 0)
            # Nothing can be made durable, so nothing is acknowledged: Report, Release and
            # KeepAlive are refused (the client retries them) and the ledger is unchanged.
            rid = before.reservation.id
            for call in (engine.report(rid, 50, 0, Outcome.OK, 0), engine.release(rid),
                         engine.keep_alive(rid, 100)):
                with pytest.raises(PersistenceFailing, match="journal is failing"):
                    await call
            held = engine.ledger.get(rid)
            assert held is not None and held.state is State.OPEN
            assert not engine.healthy

            filler.unlink()  # space again: the writer retries on its own
            async with asyncio.timeout(20):  # its backoff is stepped; the write is real
                while not engine.healthy:
                    clock.advance(1)
                    await asyncio.sleep(0.01)
            r, replayed = await engine.report(rid, 50, 0, Outcome.OK, 0)  # the retry
            assert r.state is State.REPORTED and not replayed
            assert isinstance(await engine.acquire(tiny(1), 0), Granted)
            held = {r.id for r in engine.ledger.open_reservations()}
        finally:
            await engine.stop()
        again = await started(mnt / "l.sqlite3", clock)
        try:
            settled = again.ledger.get(before.reservation.id)
            assert settled is not None and settled.state is State.REPORTED
            assert {r.id for r in again.ledger.open_reservations()} == held
        finally:
            await again.stop()


async def test_the_wal_stays_bounded_under_many_grants(tmp_path: Path) -> None:
    # A 2 MB volume once filled after ~380 grants: the WAL grew to 4 MiB before SQLite's
    # default checkpoint. Now it is checkpointed and cut back every MiB or so.
    clock, db = FakeClock(), tmp_path / "l.sqlite3"
    wal = db.with_name(db.name + "-wal")
    engine = await started(db, clock)
    largest = 0
    try:
        for i in range(1500):
            g = await engine.acquire(AcquireRequest(f"s{i % 50}", "claude-x", "", 10, 10), 0)
            assert isinstance(g, Granted)
            await engine.report(g.reservation.id, 10, 5, Outcome.OK, 0)
            largest = max(largest, wal.stat().st_size)
            clock.advance(0.01)
    finally:
        await engine.stop()
    assert db.stat().st_size > 200_000  # the data went somewhere: into the database
    assert largest <= WAL_BOUND_BYTES, f"the WAL reached {largest} bytes"


class BrokenDisk(SqliteJournal):
    """The real SQLite journal, whose writes fail while `broken` is set (as on a full disk),
    raising what the journal raises then. The file itself is real and read back for real."""

    broken = False

    async def write(self, changes: Sequence[Change]) -> None:
        if self.broken and changes:
            raise StorageError(f"{self.path}: write failed, nothing was written: disk I/O error")
        await super().write(changes)


def settled_on_disk(db: Path, rid: str) -> bool:
    con = sqlite3.connect(db)  # a second reader: WAL lets it see what is committed
    try:
        row = con.execute("SELECT settled_at FROM reservations WHERE id = ?", (rid,)).fetchone()
    finally:
        con.close()
    return row is not None and row[0] is not None


@pytest.mark.logs_errors  # the write failure is the point
async def test_a_report_whose_write_fails_is_unavailable_then_its_retry_is_kept(
    tmp_path: Path,
) -> None:
    # The first write to fail carries a Report: it was answered OK although nothing was on
    # disk. Now the caller hears UNAVAILABLE, and its retry is answered once it is kept.
    clock, db = FakeClock(), tmp_path / "l.sqlite3"
    journal = BrokenDisk(db)
    engine = Engine(make_test_config(), journal, clock)
    await engine.start()
    try:
        g = await engine.acquire(tiny(100), 0)
        assert isinstance(g, Granted) and engine.healthy
        journal.broken = True
        with pytest.raises(PersistenceFailing):
            await engine.report(g.reservation.id, 50, 0, Outcome.OK, 0)
        assert not engine.healthy and not settled_on_disk(db, g.reservation.id)
        with pytest.raises(PersistenceFailing):  # the client's retry, still failing
            await engine.report(g.reservation.id, 50, 0, Outcome.OK, 0)

        journal.broken = False
        clock.advance(1)  # the writer's backoff: it retries the batch on its own
        assert await engine.flush() and engine.healthy
        r, replayed = await engine.report(g.reservation.id, 50, 0, Outcome.OK, 0)
        assert replayed and r.state is State.REPORTED  # settled once, by the first call
        assert settled_on_disk(db, g.reservation.id)
    finally:
        await engine.stop()
