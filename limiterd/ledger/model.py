"""The ledger's values. Frozen and typed; protobuf never reaches this far."""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import NamedTuple


class BucketKey(NamedTuple):
    """scope x budget (user == "") or scope x budget x user.

    `budget` names what a model draws on: the matched config rule's group or pattern, so
    every version and alias of a model class shares one bucket (config.model.Budget)."""

    scope: str
    budget: str
    user: str = ""


class Outcome(enum.Enum):
    OK = "ok"
    RATE_LIMITED = "rate_limited"
    OVERLOADED = "overloaded"
    ERROR = "error"
    CANCELLED = "cancelled"


class State(enum.Enum):
    OPEN = "open"
    REPORTED = "reported"
    RELEASED = "released"
    EXPIRED = "expired"  # the lease lapsed: settled as consumed (an orphan)


@dataclass(frozen=True, slots=True)
class Amounts:
    requests: int = 0
    input_tokens: int = 0
    output_tokens: int = 0


@dataclass(frozen=True, slots=True)
class AcquireRequest:
    scope: str
    model: str
    user: str
    input_tokens: int
    max_output_tokens: int
    request_id: str = ""
    lease_s: float | None = None  # None = the configured default
    # The caller will mark the moment it sends the provider request, when its grant asks
    # (MarkSent): a take from full then holds the refill until the mark (ledger.buckets).
    marks_sent: bool = False


@dataclass(frozen=True, slots=True)
class Settlement:
    state: State
    settled_at: float
    refunded: Amounts = Amounts()
    overrun: Amounts = Amounts()
    outcome: Outcome | None = None  # set for REPORTED


@dataclass(frozen=True, slots=True)
class Reservation:
    id: str
    scope: str
    model: str
    user: str
    request_id: str
    reserved: Amounts
    buckets: tuple[BucketKey, ...]
    granted_at: float
    expires_at: float
    waited_s: float = 0.0
    settlement: Settlement | None = None

    def settled(self, settlement: Settlement) -> Reservation:
        """This reservation, settled. (dataclasses.replace is slow on the hot path.)"""
        return Reservation(
            self.id, self.scope, self.model, self.user, self.request_id, self.reserved,
            self.buckets, self.granted_at, self.expires_at, self.waited_s, settlement,
        )

    @property
    def state(self) -> State:
        return self.settlement.state if self.settlement else State.OPEN

    def reported(self) -> tuple[int, int, Outcome | None]:
        """(input tokens, output tokens, outcome) its Report said; reserved - refunded +
        overrun, as the settlement keeps them."""
        s = self.settlement
        assert s is not None
        return (
            self.reserved.input_tokens - s.refunded.input_tokens + s.overrun.input_tokens,
            self.reserved.output_tokens - s.refunded.output_tokens + s.overrun.output_tokens,
            s.outcome,
        )

    def same_request(self, req: AcquireRequest) -> bool:
        """Whether a repeated request_id asks for the same thing (else it is a client bug)."""
        return (
            (self.scope, self.model, self.user) == (req.scope, req.model, req.user)
            and self.reserved.input_tokens == req.input_tokens
            and self.reserved.output_tokens == req.max_output_tokens
        )


@dataclass(frozen=True, slots=True)
class BucketLevels:
    """The durable part of a bucket: token levels at a time. Concurrency is derived from
    the open reservations, so it is not stored."""

    key: BucketKey
    requests: float | None
    input_tokens: float | None
    output_tokens: float | None
    as_of: float


@dataclass(frozen=True, slots=True)
class ProviderLimits:
    """What the provider said of a key's limits after a call, per rate dimension (requests,
    input tokens, output tokens); None where it said nothing. Parsed at the API edge."""

    limits: tuple[int | None, int | None, int | None]
    remaining: tuple[int | None, int | None, int | None]


# ---- Changes: everything the journal records. The ledger emits them; nothing else does.


@dataclass(frozen=True, slots=True)
class ReservationOpened:
    reservation: Reservation


@dataclass(frozen=True, slots=True)
class LeaseExtended:
    reservation_id: str
    expires_at: float


@dataclass(frozen=True, slots=True)
class ReservationSettled:
    reservation_id: str
    settlement: Settlement


@dataclass(frozen=True, slots=True)
class PauseSet:
    """A provider 429 pauses every grant on scope x budget until `until`."""

    scope: str
    budget: str
    until: float


@dataclass(frozen=True, slots=True)
class BucketDropped:
    key: BucketKey


@dataclass(frozen=True, slots=True)
class SettlementsForgotten:
    """Settled reservations up to and including this settle time are no longer kept."""

    settled_before: float
    ids: tuple[str, ...]


Change = (
    ReservationOpened
    | LeaseExtended
    | ReservationSettled
    | PauseSet
    | BucketLevels
    | BucketDropped
    | SettlementsForgotten
)


@dataclass(frozen=True, slots=True)
class Snapshot:
    """What a journal hands back at start: enough to rebuild the ledger exactly."""

    reservations: tuple[Reservation, ...]  # open, and settled within the retention window
    buckets: tuple[BucketLevels, ...]
    pauses: tuple[PauseSet, ...]
