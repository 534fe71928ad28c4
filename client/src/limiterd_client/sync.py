"""The sync limiter for scripts and thread pools: the async client's logic (limiter.py), run
without an event loop over a sync grpc channel (see _runtime.py)."""

from __future__ import annotations

import time
from collections.abc import Callable
from types import TracebackType

import grpc
import grpc.aio

from ._core import CHANNEL_OPTIONS
from ._runtime import SyncRuntime, run_sync
from .errors import ProviderError, ProviderMeta
from .limiter import LimiterCore, ReservationCore
from .local import FAIL_CLOSED, UnavailablePolicy
from .proto.limiter.v1 import limiter_pb2 as pb
from .proto.limiter.v1 import limiter_pb2_grpc as pb_grpc
from .wait import SyncWaitCallback

ASYNC_IN_SYNC = ("{cls} is the synchronous client: use `with`, or {other} with "
                 "`async with` in asyncio code")


class SyncLimiter(LimiterCore["SyncReservation"]):
    """Blocking twin of `Limiter`. Give a `target` or a grpc `channel` (any grpc.Channel,
    e.g. grpc_testing's). Safe to share between threads."""

    def __init__(
        self,
        target: str | None = None,
        *,
        channel: grpc.Channel | None = None,
        on_unavailable: UnavailablePolicy = FAIL_CLOSED,
        lease_ms: int = 0,
        rpc_timeout: float = 5.0,
        transport_attempts: int = 3,
        transport_backoff: float = 0.05,
        keepalive: bool = True,
        keepalive_fraction: float = 0.5,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
        wall: Callable[[], float] = time.time,
        flush_timeout: float = 10.0,
        outbox_limit: int = 1000,
    ) -> None:
        if isinstance(channel, grpc.aio.Channel):
            raise TypeError("channel: SyncLimiter needs a sync grpc.Channel; for a "
                            "grpc.aio channel use Limiter")
        self._setup(target, channel, on_unavailable, lease_ms, rpc_timeout,
                    transport_attempts, transport_backoff, keepalive, keepalive_fraction,
                    clock, wall, flush_timeout, outbox_limit)
        self._own_channel = channel is None
        ch = channel if channel is not None else grpc.insecure_channel(
            self.target, options=CHANNEL_OPTIONS)
        self._channel = ch
        self.sleep = sleep
        self._rt = SyncRuntime(ch, pb_grpc.LimiterStub(ch), sleep)

    def __enter__(self) -> SyncLimiter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    async def __aenter__(self) -> None:
        raise TypeError(ASYNC_IN_SYNC.format(cls="SyncLimiter", other="Limiter"))

    async def __aexit__(self, *exc: object) -> None:
        """Never reached (__aenter__ raises)."""

    def close(self) -> None:
        """Deliver what the outbox holds (up to `flush_timeout`), then close the channel."""
        run_sync(self._close(self._own_channel))

    def flush(self, timeout: float | None = None) -> int:
        """Wait until deferred settlements are delivered (or given up), at most `timeout`
        seconds; returns how many are still pending."""
        return run_sync(self._flush(timeout))

    def wait_ready(self, timeout: float) -> None:
        """Wait until the daemon accepts connections; LimiterUnavailable after `timeout`."""
        try:
            grpc.channel_ready_future(self._channel).result(timeout)
        except grpc.FutureTimeoutError:
            raise self._not_ready(timeout) from None

    def reserve(self, scope: str, model: str, *, input_tokens: int, max_output_tokens: int,
                max_wait: float = 0.0, user: str = "", lease_ms: int | None = None,
                on_wait: SyncWaitCallback | None = None, wait_budget: float | None = None,
                overloaded_hint: bool = False, marks_sent: bool = False) -> SyncReservation:
        """Like `Limiter.reserve`, blocking; `on_wait` is a plain callback, called on the
        thread that enters the block."""
        return self._new_reservation(SyncReservation, scope, model, input_tokens,
                                     max_output_tokens, max_wait, user, lease_ms, on_wait,
                                     wait_budget, overloaded_hint, marks_sent)


class SyncReservation(ReservationCore):
    """Blocking twin of `Reservation`; use `with limiter.reserve(...) as r:`."""

    def __enter__(self) -> SyncReservation:
        run_sync(self._enter())
        return self

    def __exit__(self, et: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        run_sync(self._exit(exc))

    async def __aenter__(self) -> None:
        raise TypeError(ASYNC_IN_SYNC.format(cls="SyncLimiter.reserve", other="Limiter"))

    async def __aexit__(self, *exc: object) -> None:
        """Never reached (__aenter__ raises)."""

    def report(self, actual_input_tokens: int, actual_output_tokens: int, *,
               outcome: pb.Outcome = pb.OK, retry_after_ms: int = 0,
               provider: ProviderMeta | None = None) -> pb.Settlement | None:
        return run_sync(self._report(actual_input_tokens, actual_output_tokens,
                                     outcome=outcome, retry_after_ms=retry_after_ms,
                                     provider=provider))

    def report_error(self, err: ProviderError, *, fell_back: bool = False
                     ) -> pb.Settlement | None:
        return run_sync(self._report_error(err, fell_back=fell_back))

    def release(self) -> pb.Settlement | None:
        return run_sync(self._release())
