"""Pieces shared by the async and the sync limiter: status mapping, messages, exit rules."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import grpc

from .errors import (
    LimiterBusy,
    LimiterError,
    LimiterInvalidArgument,
    LimiterRejected,
    LimiterUnavailable,
    ProviderError,
    ProviderMeta,
    ReservationNotFound,
)
from .proto.limiter.v1 import limiter_pb2 as pb

log = logging.getLogger("limiterd_client")

# A lost answer to these may still have been applied: retry with the same request_id.
# CANCELLED reaches a client only from the daemon's side (our own cancellation raises
# CancelledError instead): the daemon is draining on its way down, so it is unavailable.
TRANSIENT = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED,
                       grpc.StatusCode.CANCELLED})
# A restarted sidecar should be dialled again within a second, not after grpc's default
# backoff of up to two minutes.
CHANNEL_OPTIONS = (("grpc.initial_reconnect_backoff_ms", 200),
                   ("grpc.min_reconnect_backoff_ms", 200),
                   ("grpc.max_reconnect_backoff_ms", 2000))


@dataclass
class Counters:
    """What the client did on its own; visible to the app."""

    acquire_retries: int = 0
    fail_open: int = 0
    local_grants: int = 0
    fallbacks: int = 0
    settle_failures: int = 0
    stream_reattaches: int = 0
    settles_deferred: int = 0  # Report/Release the daemon could not take at once
    settles_delivered: int = 0  # ...of which the outbox delivered later
    settles_dropped: int = 0  # ...of which the lease ended first (or the outbox overflowed)
    marks_sent: int = 0  # MarkSent calls sent (a grant held a refill until the send)


@dataclass(frozen=True)
class Grant:
    reservation_id: str
    request_id: str
    lease_expires_at_ms: int
    replayed: bool
    mode: str  # "daemon", "local" (safe capacity) or "open" (fail open)
    input_tokens: int
    output_tokens: int
    lease_ms: int = 0  # how long a lease lasts, learnt at grant time (0 = unknown)
    # The daemon holds a bucket's refill until this call is sent: mark_called() tells it.
    mark_sent_wanted: bool = False


@dataclass
class Settle:
    called: bool = False
    settled: bool = False
    usage: tuple[int, int] | None = None


def retry_after_ms(metadata: Iterable[tuple[str, Any]] | None) -> int | None:
    for key, value in metadata or ():
        if key == "retry-after-ms":
            try:
                return int(value if isinstance(value, str) else value.decode())
            except ValueError:
                return None
    return None


def map_status(code: grpc.StatusCode, details: str,
               metadata: Any) -> LimiterError:
    if code == grpc.StatusCode.RESOURCE_EXHAUSTED:
        return LimiterBusy(details or "limiter could not grant in time", retry_after_ms(metadata))
    if code == grpc.StatusCode.FAILED_PRECONDITION:
        return LimiterRejected(details or "no bucket can ever hold this request")
    if code == grpc.StatusCode.INVALID_ARGUMENT:
        return LimiterInvalidArgument(details or "invalid argument")
    if code == grpc.StatusCode.NOT_FOUND:
        return ReservationNotFound(details or "unknown reservation")
    if code in TRANSIENT:
        return LimiterUnavailable(f"limiter unavailable ({code.name}): {details}")
    return LimiterError(f"limiter error {code.name}: {details}")


def outcome_for(err: ProviderError) -> pb.Outcome:
    if err.rate_limited:
        return pb.RATE_LIMITED
    if err.overloaded:
        return pb.OVERLOADED
    return pb.ERROR


def used_by_failure(err: ProviderError, known: tuple[int, int] | None,
                    reserved: tuple[int, int]) -> tuple[int, int]:
    """What a failed attempt used: the provider's count when it gave one; nothing when it
    refused the attempt (429, 529, never connected: charging it would drain the budget for
    calls that did no work); else the best-known usage, or the reservation (the safe side)."""
    if err.usage is not None:
        return err.usage.input_tokens, err.usage.output_tokens
    if err.refused:
        return 0, 0
    return known or reserved


def provider_pb(meta: ProviderMeta | None) -> pb.ProviderInfo | None:
    if meta is None:
        return None
    return pb.ProviderInfo(http_status=meta.http_status, error_type=meta.error_type,
                           error_code=meta.error_code, request_id=meta.request_id,
                           headers=dict(meta.headers), fell_back=meta.fell_back)


def exit_action(state: Settle, grant: Grant, exc: BaseException | None
                ) -> tuple[str, pb.Outcome, int, int]:
    """How to settle a reservation left open at the end of its block:
    ("release", ...) when the call never started, else ("report", outcome, in, out)."""
    if exc is not None and not state.called:
        return "release", pb.OUTCOME_UNSPECIFIED, 0, 0
    in_tok, out_tok = state.usage or (grant.input_tokens, grant.output_tokens)
    outcome: pb.Outcome
    if exc is None:
        outcome = pb.OK
    elif isinstance(exc, ProviderError):
        outcome = outcome_for(exc)
        in_tok, out_tok = used_by_failure(exc, state.usage,
                                          (grant.input_tokens, grant.output_tokens))
    elif isinstance(exc, GeneratorExit | KeyboardInterrupt) or (
            type(exc).__name__ == "CancelledError"):
        outcome = pb.CANCELLED
    else:
        outcome = pb.ERROR
    return "report", outcome, in_tok, out_tok


def validate(scope: str, model: str, input_tokens: int, max_output_tokens: int,
             max_wait: float) -> None:
    if not scope:
        raise ValueError("scope: must be non-empty")
    if not model:
        raise ValueError("model: must be non-empty")
    if input_tokens < 0:
        raise ValueError("input_tokens: must be >= 0")
    if max_output_tokens < 0:
        raise ValueError("max_output_tokens: must be >= 0")
    if max_wait < 0:
        raise ValueError("max_wait: must be >= 0")


class ThrottledWarning:
    """A warning logged at most every `every` seconds, with how many times it happened since
    (FailOpen lets every call through: one line per call would bury the log)."""

    def __init__(self, clock: Callable[[], float], every: float = 5.0) -> None:
        self._clock, self.every = clock, every
        self._lock = threading.Lock()
        self._last: float | None = None
        self._count = 0

    def warn(self, message: str) -> bool:
        with self._lock:
            self._count += 1
            now = self._clock()
            if self._last is not None and now - self._last < self.every:
                return False
            count, self._count, self._last = self._count, 0, now
        log.warning("%s (%d times since the last such warning)", message, count)
        return True


def check_target(target: str) -> str:
    """A gRPC target a person meant: host:port, [v6]:port, unix:PATH, unix-abstract:NAME or
    dns:///host:port. Anything else is a ValueError that says what to write instead (gRPC
    would otherwise report internals, or silently dial port 443)."""
    example = "e.g. '127.0.0.1:50051' or 'unix:/run/limiterd.sock'"
    t = target.strip()
    if not t:
        raise ValueError(f"target: empty; give the daemon's host:port or unix:PATH, {example}")
    if t.startswith(("unix:", "unix-abstract:")):
        if not t.split(":", 1)[1].lstrip("/"):
            raise ValueError(f"target: {target!r} names no socket path, {example}")
        return t
    hostport = t[len("dns:///"):] if t.startswith("dns:///") else t
    if "://" in hostport:
        raise ValueError(f"target: {target!r} is a URL, but limiterd speaks gRPC, not HTTP: "
                         f"give host:port without a scheme, {example}")
    host, sep, port = hostport.rpartition(":")
    if not sep or not host or host.endswith(":") and not host.startswith("["):
        raise ValueError(f"target: {target!r} has no port (gRPC would dial 443): give "
                         f"host:port, {example}")
    if not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"target: {target!r}: the port must be a number from 1 to 65535, "
                         f"{example}")
    return t
