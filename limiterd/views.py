"""What the engine shows of its state: frozen views, read by the Admin API and by metrics.

Neither the servicers nor the metrics collector reach into the ledger; they map these. A
ledger kept elsewhere (Redis) plugs in behind the engine by answering with the same views.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

from limiterd.ledger.model import BucketKey, Reservation

# A scope given as a prefix must be at least this long (the tables print 12 characters).
MIN_SCOPE_PREFIX = 6


class DimensionView(NamedTuple):
    """One limit of a bucket: `requests`, `input_tokens`, `output_tokens` or `concurrent`.
    (A NamedTuple: a page holds thousands, and these build several times faster.)"""

    name: str
    level: float
    capacity: int
    refill_per_s: float = 0.0  # 0 for `concurrent`: slots come back at settlement
    learned: bool = False  # the capacity was raised from the provider's headers


@dataclass(frozen=True, slots=True)
class BucketView:
    key: BucketKey
    dimensions: tuple[DimensionView, ...]
    queue_depth: int
    open_reservations: int
    paused_until: float  # 0.0: not paused
    overloaded_until: float  # 0.0: not marked overloaded


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
