"""Loading: rows -> the Snapshot the ledger restores from."""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from dataclasses import replace
from typing import Any

import aiosqlite

from limiterd.ledger.model import (
    Amounts,
    BucketKey,
    BucketLevels,
    Outcome,
    PauseSet,
    Reservation,
    Settlement,
    Snapshot,
    State,
)
from limiterd.storage.sqlite.schema import NotOurs

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


async def load(db: aiosqlite.Connection) -> Snapshot:
    """Everything saved. Rows passed schema.check_rows (types, states, outcomes); the JSON
    bucket lists are checked here, where they are parsed, and raise NotOurs.

    Each query is fetched whole in one hop (execute_fetchall); iterating a cursor would cost
    a hop per 64 rows. The objects are then built on the event loop's thread."""
    reader = _RowReader()
    try:
        reservations = reader.open_rows(await db.execute_fetchall(_SELECT_OPEN))
        reservations += reader.settled_rows(await db.execute_fetchall(_SELECT_SETTLED))
    except (TypeError, ValueError, KeyError) as exc:
        raise NotOurs(f"a reservation's bucket list cannot be read: {exc}") from None
    buckets = tuple(
        BucketLevels(BucketKey(s, m, u), rq, it, ot, as_of)
        for s, m, u, rq, it, ot, as_of in await db.execute_fetchall("SELECT * FROM buckets")
    )
    pause_rows = await db.execute_fetchall("SELECT * FROM pauses")
    pauses = tuple(PauseSet(s, m, until) for s, m, until in pause_rows)
    return Snapshot(reservations=tuple(reservations), buckets=buckets, pauses=pauses)


def _bucket_keys(text: str) -> tuple[BucketKey, ...]:
    """Parsed once per distinct list (rows share a few), so checking the shape is cheap."""
    keys = json.loads(text)
    if not isinstance(keys, list) or not all(
        isinstance(k, list) and len(k) == 3 and all(isinstance(v, str) for v in k) for k in keys
    ):
        raise ValueError(f"not a list of [scope, budget, user]: {text[:80]}")
    return tuple(BucketKey(*k) for k in keys)


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
                keys = keys_cache[bjson] = _bucket_keys(bjson)
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
