"""Errors: the limiter's own, and one structured type for every provider failure."""

from __future__ import annotations

import email.utils
import re
from collections.abc import Mapping
from dataclasses import dataclass, field

RETRYABLE_STATUSES = frozenset({408, 409, 429, 500, 502, 503, 504, 529})
# A 429 that means "you are out of money", not "slow down": retrying cannot help.
_SPEND_LIMIT = re.compile(r"billing|credit|spend[ _-]?limit|usage[ _-]?limit|insufficient_quota",
                          re.IGNORECASE)


class LimiterError(Exception):
    """Base class of every error raised by the limiter client."""

    gave_up: str = ""  # set when a call loop gave up on this error: why, and models tried
    models_tried: tuple[str, ...] = ()


class LimiterUnavailable(LimiterError):
    """The daemon is down or its persistence is failing, and the policy is fail-closed."""


class LimiterBusy(LimiterError):
    """The daemon could not grant in time (RESOURCE_EXHAUSTED); retry after `retry_after_ms`."""

    def __init__(self, message: str, retry_after_ms: int | None) -> None:
        super().__init__(message)
        self.retry_after_ms = retry_after_ms


class LimiterRejected(LimiterError):
    """No bucket could ever hold the request (FAILED_PRECONDITION)."""


class LimiterInvalidArgument(LimiterError, ValueError):
    """The daemon rejected a field (INVALID_ARGUMENT); the message names it."""


class ReservationNotFound(LimiterError):
    """The daemon does not know the reservation id (NOT_FOUND)."""


@dataclass(frozen=True)
class Usage:
    input_tokens: int = 0
    output_tokens: int = 0


class ProviderError(Exception):
    """One failed provider call, classified.

    `status` is the HTTP status (None for connection errors; 200 for an error event inside a
    stream), `code` the provider's error type (e.g. "overloaded_error", "connection_error").
    """

    gave_up: str = ""  # set when a call loop gave up on this error: why, and models tried
    models_tried: tuple[str, ...] = ()

    def __init__(
        self,
        *,
        provider: str,
        status: int | None,
        code: str | None,
        message: str,
        retryable: bool,
        retry_after_ms: int | None = None,
        request_id: str | None = None,
        error_code: str | None = None,
        headers: Mapping[str, str] | None = None,
        usage: Usage | None = None,
        timeout: bool = False,
        sent: bool = True,
    ) -> None:
        super().__init__(message)
        self.provider = provider
        self.status = status
        self.code = code
        self.message = message
        self.retryable = retryable
        self.retry_after_ms = retry_after_ms
        self.request_id = request_id
        self.error_code = error_code
        self.headers: dict[str, str] = dict(headers or {})
        self.usage = usage  # best-known usage of the failed call, when any was consumed
        self.timeout = timeout
        self.sent = sent  # False: the request never reached the provider (connect failed)

    @property
    def refused(self) -> bool:
        """The provider did no work for this attempt, so it used no tokens: the request never
        left (connection refused), or it was turned away (429, 529, or another 4xx but 408)
        before any work was done."""
        if not self.sent:
            return True
        status = self.status
        return status == 529 or (status is not None and 400 <= status < 500 and status != 408)

    @property
    def rate_limited(self) -> bool:
        return self.status == 429

    @property
    def overloaded(self) -> bool:
        return self.status == 529 or self.code == "overloaded_error"

    def __repr__(self) -> str:
        return (f"ProviderError(provider={self.provider!r}, status={self.status}, "
                f"code={self.code!r}, retryable={self.retryable}, "
                f"retry_after_ms={self.retry_after_ms}, request_id={self.request_id!r}, "
                f"message={self.message!r})")


class PartialResponseError(Exception):
    """A stream failed after text had been delivered to the caller; it is not retried."""

    def __init__(self, text: str, usage: Usage, cause: ProviderError) -> None:
        super().__init__(f"stream failed after {len(text)} characters: {cause.message}")
        self.text = text
        self.usage = usage
        self.cause = cause


def lower_headers(headers: Mapping[str, str] | None) -> dict[str, str]:
    return {k.lower(): v for k, v in (headers or {}).items()}


def parse_retry_after_ms(headers: Mapping[str, str], now: float) -> int | None:
    """`retry-after-ms`, else `retry-after` as seconds or an HTTP date; `now` is unix seconds."""
    h = lower_headers(headers)
    raw_ms = h.get("retry-after-ms")
    if raw_ms is not None:
        try:
            return max(0, round(float(raw_ms)))
        except ValueError:
            pass
    raw = h.get("retry-after")
    if raw is None:
        return None
    try:
        return max(0, round(float(raw) * 1000))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(raw)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        return None
    return max(0, round((when.timestamp() - now) * 1000))


def _should_retry_header(headers: Mapping[str, str]) -> bool | None:
    value = lower_headers(headers).get("x-should-retry", "").strip().lower()
    return {"true": True, "false": False}.get(value)


def classify_http(
    *,
    provider: str,
    status: int,
    headers: Mapping[str, str] | None = None,
    code: str | None = None,
    error_code: str | None = None,
    message: str = "",
    request_id: str | None = None,
    now: float,
) -> ProviderError:
    """Classify an HTTP error answer (or an error event inside a 200 stream)."""
    h = lower_headers(headers)
    effective = status
    if code == "overloaded_error" and status < 400:
        effective = 529  # an overload delivered inside a 200 stream is still an overload
    retryable = effective in RETRYABLE_STATUSES
    if effective == 429 and _SPEND_LIMIT.search(" ".join(filter(None, [code, error_code,
                                                                       message]))):
        retryable = False
    override = _should_retry_header(h)
    if override is not None:
        retryable = override
    return ProviderError(
        provider=provider, status=effective, code=code, message=message or f"HTTP {status}",
        retryable=retryable, retry_after_ms=parse_retry_after_ms(h, now),
        request_id=request_id or h.get("request-id"), error_code=error_code, headers=h,
        timeout=effective in (408, 504),
    )


def connection_error(provider: str, message: str, *, timeout: bool = False,
                     usage: Usage | None = None, sent: bool = True) -> ProviderError:
    """A reset, refused or timed-out connection: always retryable. `sent=False` when the
    connection was never made, so the provider cannot have done (or charged) any work."""
    return ProviderError(provider=provider, status=None,
                         code="timeout" if timeout else "connection_error", message=message,
                         retryable=True, timeout=timeout, usage=usage, sent=sent)


@dataclass(frozen=True)
class ProviderMeta:
    """What the provider said about an attempt; sent to the daemon in ReportRequest.provider."""

    http_status: int = 0
    error_type: str = ""
    error_code: str = ""
    request_id: str = ""
    headers: Mapping[str, str] = field(default_factory=dict)
    fell_back: bool = False

    @staticmethod
    def of(err: ProviderError, *, fell_back: bool = False) -> ProviderMeta:
        return ProviderMeta(http_status=err.status or 0, error_type=err.code or "",
                            error_code=err.error_code or "", request_id=err.request_id or "",
                            headers=reported_headers(err.headers), fell_back=fell_back)


def reported_headers(headers: Mapping[str, str]) -> dict[str, str]:
    """The headers worth sending to the daemon: rate-limit state, retry hints, request id."""
    keep = ("retry-after", "retry-after-ms", "x-should-retry", "request-id")
    return {k: v for k, v in lower_headers(headers).items()
            if k in keep or k.startswith("anthropic-ratelimit-")}
