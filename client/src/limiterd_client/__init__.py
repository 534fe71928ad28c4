"""limiterd's Python client: reserve/report around LLM provider calls, retries, fallback.

The anthropic adapter imports `anthropic` only when it is used (pip install
"limiterd-client[anthropic]").
"""

from importlib.metadata import PackageNotFoundError, version

from ._core import Counters, check_target
from .anthropic_adapter import (
    AnthropicAdapter,
    AsyncAnthropicAdapter,
    count_tokens_estimator,
    count_tokens_estimator_sync,
    estimate_chars,
    to_provider_error,
)
from .errors import (
    LimiterBusy,
    LimiterError,
    LimiterInvalidArgument,
    LimiterRejected,
    LimiterUnavailable,
    PartialResponseError,
    ProviderError,
    ProviderMeta,
    ReservationNotFound,
    Usage,
    classify_http,
    connection_error,
    parse_retry_after_ms,
)
from .fallback import CallResult, FallbackPolicy, FallbackTriggers, Hop, HopProposal
from .hooks import CallEvent
from .limiter import Limiter, Reservation
from .local import FailClosed, FailOpen, SafeCapacity
from .retry import RetryPolicy
from .runner import Attempt, StreamCall, SyncStreamCall, run_call, run_call_sync
from .scope import scope_for_api_key
from .sync import SyncLimiter, SyncReservation
from .wait import ModelOverloadedHint, WaitCallback, WaitTooLong, WaitUpdate

try:
    __version__ = version("limiterd-client")  # one source: client/pyproject.toml
except PackageNotFoundError:  # imported from a source tree that was never installed
    __version__ = "0+unknown"

_TRANSPORT = ("AsyncLimitedTransport", "LimitedTransport", "limited_http_client", "wrap")


def __getattr__(name: str) -> object:
    """The drop-in transport needs httpx (the anthropic extra): imported on first use."""
    if name in _TRANSPORT:
        from . import transport
        return getattr(transport, name)
    raise AttributeError(f"module 'limiterd_client' has no attribute {name!r}")


__all__ = [
    "__version__", "AnthropicAdapter", "AsyncAnthropicAdapter", "Attempt", "CallEvent",
    "CallResult", "Counters", "check_target",
    "FailClosed", "FailOpen", "FallbackPolicy", "FallbackTriggers", "Hop", "HopProposal",
    "Limiter", "LimiterBusy", "LimiterError", "LimiterInvalidArgument", "LimiterRejected",
    "LimiterUnavailable", "ModelOverloadedHint", "PartialResponseError", "ProviderError",
    "ProviderMeta", "Reservation",
    "ReservationNotFound", "RetryPolicy", "SafeCapacity", "StreamCall", "SyncLimiter",
    "SyncReservation", "SyncStreamCall", "Usage", "classify_http", "connection_error",
    "count_tokens_estimator", "count_tokens_estimator_sync", "estimate_chars",
    "parse_retry_after_ms", "run_call", "run_call_sync", "scope_for_api_key",
    "to_provider_error", "WaitCallback", "WaitTooLong", "WaitUpdate",
]
