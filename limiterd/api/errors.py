"""Domain failures -> gRPC status. One table, so every RPC answers a failure the same way."""

from __future__ import annotations

import logging
import math

import grpc
from google.protobuf import any_pb2, duration_pb2
from google.rpc import error_details_pb2, status_pb2
from grpc_status import rpc_status  # type: ignore[import-untyped]  # no stubs in dev deps

from limiterd.engine import PersistenceFailing, ShuttingDown, Superseded
from limiterd.ledger.errors import (
    AlreadySettled,
    InvalidRequest,
    LedgerError,
    NeverFits,
    NotFound,
    QueueFull,
)

log = logging.getLogger("limiterd.api")

RETRY_AFTER_KEY = "retry-after-ms"

_CODES: list[tuple[type[Exception], grpc.StatusCode]] = [
    (InvalidRequest, grpc.StatusCode.INVALID_ARGUMENT),
    (NeverFits, grpc.StatusCode.FAILED_PRECONDITION),
    (AlreadySettled, grpc.StatusCode.FAILED_PRECONDITION),
    (NotFound, grpc.StatusCode.NOT_FOUND),
    (PersistenceFailing, grpc.StatusCode.UNAVAILABLE),
    (Superseded, grpc.StatusCode.ABORTED),
]


class RpcFailure(Exception):
    """An answer other than OK, ready to send."""

    def __init__(
        self,
        code: grpc.StatusCode,
        message: str,
        trailing: tuple[tuple[str, str | bytes], ...] = (),
    ) -> None:
        super().__init__(message)
        self.code, self.message, self.trailing = code, message, trailing


def exhausted(message: str, retry_after_s: float) -> RpcFailure:
    """RESOURCE_EXHAUSTED with `retry-after-ms` metadata and a google.rpc.RetryInfo."""
    return with_retry(grpc.StatusCode.RESOURCE_EXHAUSTED, message, retry_after_s)


def with_retry(code: grpc.StatusCode, message: str, retry_after_s: float) -> RpcFailure:
    """`code` with when to try again, as plain metadata and as a rich status's RetryInfo."""
    retry_ms = max(1, math.ceil(retry_after_s * 1000))
    delay = duration_pb2.Duration()
    delay.FromMilliseconds(retry_ms)
    detail = any_pb2.Any()
    detail.Pack(error_details_pb2.RetryInfo(retry_delay=delay))
    rich = rpc_status.to_status(status_pb2.Status(
        code=code.value[0], message=message, details=[detail]))
    return RpcFailure(code, message, ((RETRY_AFTER_KEY, str(retry_ms)),
                                      *rich.trailing_metadata))


def to_failure(exc: Exception) -> RpcFailure:
    if isinstance(exc, RpcFailure):
        return exc
    if isinstance(exc, QueueFull):
        return exhausted(str(exc), exc.retry_after_s)
    if isinstance(exc, ShuttingDown):
        return with_retry(grpc.StatusCode.UNAVAILABLE, str(exc), exc.retry_after_s)
    for kind, code in _CODES:
        if isinstance(exc, kind):
            return RpcFailure(code, str(exc))
    if isinstance(exc, LedgerError):
        return RpcFailure(grpc.StatusCode.FAILED_PRECONDITION, str(exc))
    log.exception("internal error while handling a call")
    return RpcFailure(grpc.StatusCode.INTERNAL, f"internal error: {type(exc).__name__}")
