"""No persistence: state lives only as long as the process (`--db :memory:`)."""

from __future__ import annotations

from collections.abc import Sequence

from limiterd.ledger.model import Change, Snapshot
from limiterd.storage.base import Journal


class MemoryJournal(Journal):
    durable = False

    async def open(self) -> Snapshot:
        return Snapshot(reservations=(), buckets=(), pauses=())

    async def write(self, changes: Sequence[Change]) -> None:
        return None

    async def close(self) -> None:
        return None

    def name(self) -> str:
        return ":memory:"

    def describe(self) -> str:
        return ":memory: (nothing survives a restart)"
