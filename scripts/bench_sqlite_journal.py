"""Rough numbers for the SQLite journal (not a test; nothing is asserted).

    PYTHONPATH=. python scripts/bench_sqlite_journal.py [--open N] [--batches N] [--batch N]

Prints the time to open() a file holding N open reservations, and group-commit throughput
for batches shaped like the ledger's: per request an open, a settle and two bucket levels.
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
import time
from pathlib import Path

from limiterd.ledger.model import (
    Amounts,
    BucketKey,
    BucketLevels,
    Change,
    Reservation,
    ReservationOpened,
    ReservationSettled,
    Settlement,
    State,
)
from limiterd.storage.sqlite import SqliteJournal, Synchronous

T0 = 1_700_000_000.0
KEYS = (BucketKey("team", "claude"), BucketKey("team", "claude", "alice"))


def reservation(i: int) -> Reservation:
    return Reservation(
        f"r{i:08d}", "team", "claude", "alice", f"req-{i}", Amounts(1, 1200, 800), KEYS,
        T0 + i * 1e-3, T0 + 600, 0.0,
    )  # fmt: skip


async def bench_open(folder: Path, n: int) -> None:
    path = folder / "open.sqlite3"
    j = SqliteJournal(path)
    await j.open()
    for start in range(0, n, 5000):
        await j.write([ReservationOpened(reservation(i)) for i in range(start, start + 5000)])
    await j.close()
    t = time.perf_counter()
    j = SqliteJournal(path)
    snap = await j.open()
    took = time.perf_counter() - t
    await j.close()
    size = path.stat().st_size / 2**20
    print(f"open(): {len(snap.reservations)} open reservations in {took:.3f} s ({size:.1f} MiB)")


async def bench_write(folder: Path, sync: Synchronous, batches: int, per_batch: int) -> None:
    j = SqliteJournal(folder / f"write-{sync}.sqlite3", synchronous=sync)
    await j.open()
    i = 0
    t = time.perf_counter()
    for _ in range(batches):
        batch: list[Change] = []
        for _ in range(per_batch):
            r = reservation(i)
            batch += [ReservationOpened(r), *(BucketLevels(k, 1, 2, 3, T0 + i) for k in KEYS)]
            if i >= per_batch:  # settle one from the previous batch
                batch.append(
                    ReservationSettled(f"r{i - per_batch:08d}", Settlement(State.RELEASED, T0))
                )
            i += 1
        await j.write(batch)
    took = time.perf_counter() - t
    await j.close()
    print(
        f"write() synchronous={sync}: {batches} batches of {per_batch} requests in {took:.3f} s"
        f" = {batches / took:.0f} commits/s, {i / took:.0f} requests/s"
    )


async def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--open", type=int, default=100_000)
    ap.add_argument("--batches", type=int, default=500)
    ap.add_argument("--batch", type=int, default=1)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as d:
        await bench_open(Path(d), args.open)
        for sync in ("NORMAL", "FULL"):
            await bench_write(Path(d), sync, args.batches, args.batch)


if __name__ == "__main__":
    asyncio.run(main())
