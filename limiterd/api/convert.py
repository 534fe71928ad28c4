"""Protobuf <-> domain values, with every field validated. Protobuf stops here.

Validation raises InvalidRequest naming the field, so every bad input maps to one clear
INVALID_ARGUMENT and nothing reaches the ledger half-checked.
"""

from __future__ import annotations

import base64
import binascii
import json
import math
import re

from limiterd.config.model import Settings
from limiterd.ledger.errors import InvalidRequest
from limiterd.ledger.model import (
    AcquireRequest,
    BucketKey,
    Outcome,
    Reservation,
    Settlement,
    State,
)
from limiterd.views import BucketView
from limiterd_client.proto.limiter.v1 import limiter_pb2 as pb

MAX_NAME_BYTES = 256  # scope, model, user
MAX_REQUEST_ID_BYTES = 128
MAX_TOKENS = 10**12
MAX_RETRY_AFTER_MS = 24 * 3600 * 1000
MAX_HEADERS = 64
MAX_HEADER_BYTES = 1024
_RESERVATION_ID = re.compile(r"[0-9a-f]{32}")
MAX_PAGE = 1000
DEFAULT_PAGE = 100

OUTCOMES = {
    pb.OK: Outcome.OK,
    pb.RATE_LIMITED: Outcome.RATE_LIMITED,
    pb.OVERLOADED: Outcome.OVERLOADED,
    pb.ERROR: Outcome.ERROR,
    pb.CANCELLED: Outcome.CANCELLED,
}
STATES = {
    State.OPEN: pb.OPEN,
    State.REPORTED: pb.REPORTED,
    State.RELEASED: pb.RELEASED,
    State.EXPIRED: pb.EXPIRED,
}


def _name(field: str, value: str, required: bool) -> str:
    if not value:
        if required:
            raise InvalidRequest(field, "is required")
        return value
    if len(value) > MAX_NAME_BYTES // 4 and len(value.encode()) > MAX_NAME_BYTES:
        raise InvalidRequest(field, f"is longer than {MAX_NAME_BYTES} bytes")
    if not value.isprintable():
        raise InvalidRequest(field, "contains control characters")
    return value


def _count(field: str, value: int, upper: int = MAX_TOKENS) -> int:
    if value < 0:
        raise InvalidRequest(field, f"must be >= 0, got {value}")
    if value > upper:
        raise InvalidRequest(field, f"must be <= {upper}, got {value}")
    return value


def _ms_to_s(field: str, value_ms: int, max_s: float) -> float:
    _count(field, value_ms, int(max_s * 1000))
    return value_ms / 1000.0


def reservation_id(value: str) -> str:
    if not _RESERVATION_ID.fullmatch(value):
        raise InvalidRequest(
            "reservation_id",
            "is malformed (32 lowercase hex characters, as returned by Acquire)"
            if value else "is required",
        )
    return value


def acquire_request(m: pb.AcquireRequest, settings: Settings) -> tuple[AcquireRequest, float]:
    """The domain request and its max wait in seconds."""
    request_id = m.request_id
    too_long = len(request_id.encode()) > MAX_REQUEST_ID_BYTES
    if len(request_id) > MAX_REQUEST_ID_BYTES // 4 and too_long:
        raise InvalidRequest("request_id", f"is longer than {MAX_REQUEST_ID_BYTES} bytes")
    if request_id and not request_id.isprintable():
        raise InvalidRequest("request_id", "contains control characters")
    lease_s = _ms_to_s("lease_ms", m.lease_ms, settings.max_lease_s) if m.lease_ms else None
    req = AcquireRequest(
        scope=_name("scope", m.scope, required=True),
        model=_name("model", m.model, required=True),
        user=_name("user", m.user, required=False),
        input_tokens=_count("input_tokens", m.input_tokens),
        max_output_tokens=_count("max_output_tokens", m.max_output_tokens),
        request_id=request_id,
        lease_s=lease_s,
        marks_sent=m.marks_sent,
    )
    return req, _ms_to_s("max_wait_ms", m.max_wait_ms, settings.max_wait_s)


def report_request(m: pb.ReportRequest) -> tuple[str, int, int, Outcome, float]:
    outcome = OUTCOMES.get(m.outcome)
    if outcome is None:
        raise InvalidRequest(
            "outcome", "is required: one of OK, RATE_LIMITED, OVERLOADED, ERROR, CANCELLED"
        )
    if m.HasField("provider"):
        provider_info(m.provider)
    return (
        reservation_id(m.reservation_id),
        _count("actual_input_tokens", m.actual_input_tokens),
        _count("actual_output_tokens", m.actual_output_tokens),
        outcome,
        _count("retry_after_ms", m.retry_after_ms, MAX_RETRY_AFTER_MS) / 1000.0,
    )


def provider_info(p: pb.ProviderInfo) -> None:
    if not 0 <= p.http_status <= 999:
        raise InvalidRequest("provider.http_status", f"must be 0..999, got {p.http_status}")
    for field in ("error_type", "error_code", "request_id"):
        _name(f"provider.{field}", getattr(p, field), required=False)
    if len(p.headers) > MAX_HEADERS:
        raise InvalidRequest("provider.headers", f"more than {MAX_HEADERS} headers")
    for k, v in p.headers.items():
        if len(k) + len(v) > MAX_HEADER_BYTES:
            raise InvalidRequest(f"provider.headers[{k[:40]!r}]", "is too long")


def ms(t: float) -> int:
    return int(round(t * 1000))


def acquire_response(r: Reservation, replayed: bool, mark_sent: bool) -> pb.AcquireResponse:
    return pb.AcquireResponse(
        mark_sent_wanted=mark_sent,
        reservation_id=r.id,
        lease_expires_at_ms=ms(r.expires_at),
        waited_ms=ms(r.waited_s),
        reserved_requests=r.reserved.requests,
        reserved_input_tokens=r.reserved.input_tokens,
        reserved_output_tokens=r.reserved.output_tokens,
        granted_at_ms=ms(r.granted_at),
        replayed=replayed,
    )


def settlement(r: Reservation) -> pb.Settlement:
    s: Settlement | None = r.settlement
    assert s is not None
    return pb.Settlement(
        reservation_id=r.id,
        state=STATES[s.state],
        settled_at_ms=ms(s.settled_at),
        refunded_requests=s.refunded.requests,
        refunded_input_tokens=s.refunded.input_tokens,
        refunded_output_tokens=s.refunded.output_tokens,
        overrun_input_tokens=s.overrun.input_tokens,
        overrun_output_tokens=s.overrun.output_tokens,
    )


def lease(r: Reservation, alias: str) -> pb.Lease:
    return pb.Lease(
        reservation_id=r.id,
        scope=r.scope,
        scope_alias=alias,
        model=r.model,
        user=r.user,
        request_id=r.request_id,
        granted_at_ms=ms(r.granted_at),
        lease_expires_at_ms=ms(r.expires_at),
        reserved_requests=r.reserved.requests,
        reserved_input_tokens=r.reserved.input_tokens,
        reserved_output_tokens=r.reserved.output_tokens,
    )


def bucket(v: BucketView, alias: str) -> pb.Bucket:
    return pb.Bucket(
        scope=v.key.scope, scope_alias=alias, model=v.key.budget, user=v.key.user,
        dimensions=[pb.Dimension(name=d.name, level=d.level, capacity=d.capacity,
                                 refill_per_s=d.refill_per_s, learned=d.learned)
                    for d in v.dimensions],
        queue_depth=v.queue_depth,
        paused_until_ms=ms(v.paused_until),
        open_reservations=v.open_reservations,
        overloaded_until_ms=ms(v.overloaded_until),
    )


# ---- paging: a token is the sort key of the last item sent, opaque to callers --------------


def page_size(value: int) -> int:
    if not 0 <= value <= MAX_PAGE:
        raise InvalidRequest("page_size", f"must be 0..{MAX_PAGE}, got {value}")
    return value or DEFAULT_PAGE


def encode_token(key: tuple[float | str, ...]) -> str:
    return base64.urlsafe_b64encode(json.dumps(list(key)).encode()).decode()


def _token_parts(token: str) -> list[object]:
    try:
        parts = json.loads(base64.urlsafe_b64decode(token.encode()))
    except (ValueError, binascii.Error) as exc:  # JSONDecodeError and UnicodeError too
        raise _bad_token() from exc
    if not isinstance(parts, list):
        raise _bad_token()
    return parts


def _bad_token() -> InvalidRequest:
    return InvalidRequest("page_token", "is not a token this daemon returned")


def lease_token(token: str) -> tuple[float, str] | None:
    """ListLeases continues after (lease expiry, reservation id)."""
    if not token:
        return None
    match _token_parts(token):
        case [float() | int() as expires, str() as rid] if math.isfinite(expires):
            return float(expires), rid
    raise _bad_token()


def bucket_token(token: str) -> BucketKey | None:
    """GetBuckets continues after a bucket key."""
    if not token:
        return None
    match _token_parts(token):
        case [str() as scope, str() as model, str() as user]:
            return BucketKey(scope, model, user)
    raise _bad_token()
