"""What the engine shows of its state: frozen views, read by the Admin API and by metrics.

Neither the servicers nor the metrics collector reach into the ledger; they map these. A
ledger kept elsewhere (Redis) plugs in behind the engine by answering with the same views.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import NamedTuple

from limiterd.ledger.model import BucketKey, Reservation

# A scope given as a prefix must be at least this long (the tables print 12 characters).
MIN_SCOPE_PREFIX = 6


class DimensionView(NamedTuple):
    """One limit of a bucket: `requests`, `input_tokens`, `output_tokens` or `concurrent`."""

    name: str
    level: float
    capacity: int
    refill_per_s: float = 0.0  # 0 for `concurrent`: slots come back at settlement
    learned: bool = False  # the capacity was raised from the provider's headers


RATES = ("requests", "input_tokens", "output_tokens")  # the order of levels and capacities


class BucketView(NamedTuple):
    """A bucket as it stands. Flat and a NamedTuple: a scrape reads 40,000 of these and sums
    them, and a frozen dataclass costs several times more to build; `dimensions` spells the
    figures out for a listing."""

    key: BucketKey
    levels: tuple[float, float, float]  # per RATES; meaningless where there is no capacity
    capacities: tuple[int | None, int | None, int | None]  # per RATES; None: no limit
    max_concurrent: int | None
    slots_held: int  # reservations holding a concurrency slot here
    queue_depth: int
    open_reservations: int
    paused_until: float  # 0.0: not paused
    overloaded_until: float  # 0.0: not marked overloaded
    learned: frozenset[str] = frozenset()  # RATES whose capacity the provider raised

    def rates(self) -> Iterator[tuple[str, float, int]]:
        """(dimension, level, capacity) of each rate limit the bucket has."""
        for name, level, cap in zip(RATES, self.levels, self.capacities, strict=True):
            if cap is not None:
                yield name, level, cap

    @property
    def dimensions(self) -> tuple[DimensionView, ...]:
        dims = [DimensionView(name, level, cap, cap / 60.0, name in self.learned)
                for name, level, cap in self.rates()]
        if self.max_concurrent is not None:
            dims.append(DimensionView("concurrent", self.max_concurrent - self.slots_held,
                                      self.max_concurrent))
        return tuple(dims)


@dataclass(frozen=True, slots=True)
class Stats:
    open_reservations: int
    waiting: int
    healthy: bool
    active_pauses: int = 0
    overloaded: tuple[tuple[str, float], ...] = ()  # (model, until) while marked
    local_share: bool = False  # a shared ledger's sidecar grants from its local share now


def lease_order(r: Reservation) -> tuple[float, str]:
    """ListLeases' order: soonest expiry first, then by id."""
    return (r.expires_at, r.id)


class AmbiguousScope(Exception):
    def __init__(self, prefix: str, count: int) -> None:
        super().__init__(f"{prefix!r} is the start of {count} scopes: give more characters "
                         "or the full hash")


def resolve_scope(wanted: str, known: set[str], aliases: dict[str, str]) -> frozenset[str]:
    """The scopes an operator means by `wanted`: a full hash, an alias (one alias may name
    several hashes), or a unique prefix of a hash as the tables print it. Empty: none."""
    if wanted in known:
        return frozenset((wanted,))
    by_alias = frozenset(s for s, a in aliases.items() if a == wanted)
    if by_alias:
        return by_alias
    if len(wanted) < MIN_SCOPE_PREFIX:
        return frozenset()
    matches = frozenset(s for s in known if s.startswith(wanted))
    if len(matches) > 1:
        raise AmbiguousScope(wanted, len(matches))
    return matches
