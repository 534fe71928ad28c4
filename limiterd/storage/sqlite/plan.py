"""Writing: a batch of Changes collapsed to its net effect, then applied as one transaction.

The collapse happens in Python, so a batch costs a handful of executemany calls however
large it is. Every statement is idempotent (upserts; deleting a missing row is a no-op)
because the engine retries a failed batch merged with newer changes.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass, replace
from typing import Any

import aiosqlite

from limiterd.ledger.model import (
    BucketDropped,
    BucketKey,
    BucketLevels,
    Change,
    LeaseExtended,
    PauseSet,
    Reservation,
    ReservationOpened,
    ReservationSettled,
    Settlement,
    SettlementsForgotten,
    State,
)
from limiterd.storage.base import StorageError
from limiterd.storage.sqlite.connection import Connection

# One statement per kind of row.

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
class Plan:
    """A batch collapsed to its net effect, in the order the statements must run."""

    forget_before: float | None  # 1. DELETE settled rows up to this time (the latest cut)
    deletes: list[tuple[str]]  # 2. rows opened in this batch and forgotten in it again
    upserts: list[tuple[Any, ...]]  # 3. rows opened in this batch, as they ended
    extends: list[tuple[float, str]]  # 4. patches to rows of earlier batches
    settles: list[tuple[Any, ...]]
    bucket_upserts: list[tuple[Any, ...]]
    bucket_deletes: list[tuple[str, str, str]]
    pauses: list[tuple[str, str, float]]


def plan(changes: Iterable[Change]) -> Plan:
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

    return Plan(
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


async def apply(conn: Connection, p: Plan) -> None:
    """Write one planned batch as one transaction: BEGIN, one call per kind of row, COMMIT."""
    async with conn.transaction() as db:
        await _apply(db, p)


async def _apply(db: aiosqlite.Connection, p: Plan) -> None:
    if p.forget_before is not None:
        await db.execute(_FORGET, (p.forget_before,))
    for sql, rows in (
        (_DELETE_RESERVATION, p.deletes),
        (_UPSERT_RESERVATION, p.upserts),
        (_EXTEND, p.extends),
        (_SETTLE, p.settles),
        (_UPSERT_BUCKET, p.bucket_upserts),
        (_DELETE_BUCKET, p.bucket_deletes),
        (_UPSERT_PAUSE, p.pauses),
    ):
        if rows:
            await db.executemany(sql, rows)
