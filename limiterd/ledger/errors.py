"""Why the ledger refused. The API layer maps each to a gRPC status; messages name the field."""

from __future__ import annotations

from limiterd.ledger.model import BucketKey, Reservation


class LedgerError(Exception):
    """Base: a request the ledger will not carry out. Nothing was changed."""


class InvalidRequest(LedgerError):
    """Maps to INVALID_ARGUMENT."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field


class NeverFits(LedgerError):
    """More than a bucket could ever hold: waiting would not help (FAILED_PRECONDITION)."""

    def __init__(self, bucket: BucketKey, dimension: str, capacity: int, asked: int) -> None:
        who = f"scope x model budget {bucket.budget!r}" if not bucket.user else (
            f"user {bucket.user!r} under model budget {bucket.budget!r}"
        )
        super().__init__(
            f"{dimension}: asked for {asked}, but the {who} bucket holds at most {capacity} "
            f"{dimension} per minute"
        )
        self.bucket, self.dimension, self.capacity = bucket, dimension, capacity


class QueueFull(LedgerError):
    """Too many callers already wait (RESOURCE_EXHAUSTED at once): on this bucket set, in
    total, or as streams; `where` says which, naming the setting that caps it."""

    def __init__(self, limit: int, retry_after_s: float,
                 where: str = "for this scope and model") -> None:
        super().__init__(f"{limit} callers already wait {where}; try later")
        self.retry_after_s = retry_after_s


class NotFound(LedgerError):
    def __init__(self, reservation_id: str) -> None:
        super().__init__(f"reservation_id: no reservation {reservation_id!r} (unknown or expired)")


class AlreadySettled(LedgerError):
    """A different operation than the one that settled it, or a Report that differs from the
    one that did (FAILED_PRECONDITION). `note` says what was done all the same: a provider
    pause the refused Report carried is applied, since the 429 happened."""

    def __init__(self, reservation: Reservation, attempted: str, note: str = "") -> None:
        state = reservation.state.value
        super().__init__(
            f"reservation_id: {reservation.id} is already {state}; cannot {attempted} it"
            + (f" ({note})" if note else "")
        )
        self.reservation = reservation
