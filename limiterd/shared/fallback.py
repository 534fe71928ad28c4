"""`when_unavailable = "local_share"`: what a sidecar does while Redis cannot be reached.

It grants from a local, in-memory ledger whose limits are `share` of the configured ones
(say 1 / the number of replicas), so the replicas together stay near the key's limits and
none of them ever spends the key's full budget alone. Reports, Releases and KeepAlives of
reservations the shared ledger granted are answered from what this sidecar knows of them and
kept, in order, to be delivered when Redis answers again: no refund or debt is lost. The
outbox is bounded; when it is full such calls answer UNAVAILABLE (the client retries them).
"""

from __future__ import annotations

import math
from collections import OrderedDict
from dataclasses import dataclass, fields, replace
from types import MappingProxyType
from typing import Any

from limiterd.config.model import Config, Limits, ModelRule
from limiterd.ledger.model import Amounts, Outcome, Reservation, Settlement, State

OUTBOX_MAX = 10_000


def scaled(config: Config, share: float) -> Config:
    """`config` with every limit at `share` of its value (at least 1), for the local ledger."""

    def limits(lim: Limits) -> Limits:
        values = {f.name: getattr(lim, f.name) for f in fields(lim)}
        return Limits(**{k: None if v is None else max(1, math.floor(v * share))
                         for k, v in values.items()})

    def rules(rs: tuple[ModelRule, ...]) -> tuple[ModelRule, ...]:
        return tuple(replace(r, limits=limits(r.limits)) for r in rs)

    scopes = {k: replace(sc, models=rules(sc.models), user_models=rules(sc.user_models))
              for k, sc in config.scopes.items()}
    return Config(config.settings, rules(config.models), rules(config.user_models),
                  MappingProxyType(scopes), source=config.source)


@dataclass(frozen=True, slots=True)
class Pending:
    """A settlement of a shared reservation, answered while Redis was away."""

    op: str  # "report", "release" or "keepalive"
    args: tuple[Any, ...]
    answer: Reservation


class Outbox:
    def __init__(self, limit: int = OUTBOX_MAX) -> None:
        self.limit = limit
        self._pending: OrderedDict[str, list[Pending]] = OrderedDict()
        self._count = 0

    def __len__(self) -> int:
        return self._count

    def full(self) -> bool:
        return self._count >= self.limit

    def settled(self, reservation_id: str) -> Reservation | None:
        """The answer already given for a settlement waiting here (a duplicate replays it)."""
        for p in reversed(self._pending.get(reservation_id, [])):
            if p.answer.settlement is not None:
                return p.answer
        return None

    def add(self, reservation_id: str, pending: Pending) -> None:
        self._pending.setdefault(reservation_id, []).append(pending)
        self._count += 1

    def take(self) -> list[tuple[str, Pending]]:
        out = [(rid, p) for rid, ps in self._pending.items() for p in ps]
        self._pending.clear()
        self._count = 0
        return out


def settle_locally(r: Reservation, op: str, args: tuple[Any, ...], now: float) -> Reservation:
    """What the settle script would answer for an open reservation `r`."""
    if op == "keepalive":
        return replace(r, expires_at=now + float(args[0]))
    if op == "release":
        return r.settled(Settlement(State.RELEASED, now, refunded=r.reserved))
    actual_in, actual_out, outcome = int(args[0]), int(args[1]), Outcome(args[2])
    d_in = r.reserved.input_tokens - actual_in
    d_out = r.reserved.output_tokens - actual_out
    return r.settled(Settlement(
        State.REPORTED, now,
        refunded=Amounts(0, max(0, d_in), max(0, d_out)),
        overrun=Amounts(0, max(0, -d_in), max(0, -d_out)), outcome=outcome,
    ))
