"""The sync limiter for scripts: same reserve/report semantics over a sync grpc channel."""

from __future__ import annotations

import math
import threading
import time
import uuid
from collections.abc import Callable
from types import TracebackType

import grpc

from ._core import (
    CHANNEL_OPTIONS,
    TRANSIENT,
    Counters,
    Grant,
    Settle,
    exit_action,
    log,
    map_status,
    outcome_for,
    provider_pb,
    used_by_failure,
    validate,
)
from .errors import LimiterBusy, LimiterRejected, LimiterUnavailable, ProviderError, ProviderMeta
from .local import FAIL_CLOSED, FailOpen, LocalBucket, SafeCapacity, UnavailablePolicy
from .outbox import Outbox
from .proto.limiter.v1 import limiter_pb2 as pb
from .proto.limiter.v1 import limiter_pb2_grpc as pb_grpc
from .wait import SyncWaitCallback, WaitGate, WaitUpdate


class SyncLimiter:
    """Blocking twin of `Limiter`. Give a `target` or a grpc `channel` (any grpc.Channel,
    e.g. grpc_testing's)."""

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
        if (target is None) == (channel is None):
            raise ValueError("target/channel: give exactly one")
        if not 0 < keepalive_fraction < 1:
            raise ValueError("keepalive_fraction: must be in (0, 1)")
        if transport_attempts < 1:
            raise ValueError("transport_attempts: must be >= 1")
        self._own_channel = channel is None
        self._channel = channel if channel is not None else grpc.insecure_channel(
            target or "", options=CHANNEL_OPTIONS)
        self._stub = pb_grpc.LimiterStub(self._channel)
        self.on_unavailable = on_unavailable
        self.lease_ms = lease_ms
        self.rpc_timeout = rpc_timeout
        self.transport_attempts = transport_attempts
        self.transport_backoff = transport_backoff
        self.keepalive = keepalive
        self.keepalive_fraction = keepalive_fraction
        self.clock = clock
        self.sleep = sleep
        self.counters = Counters()
        self._local = (LocalBucket(on_unavailable, clock)
                       if isinstance(on_unavailable, SafeCapacity) else None)
        self.flush_timeout = flush_timeout
        self._outbox = Outbox(self.counters, clock, wall, limit=outbox_limit)
        self._outbox_thread: threading.Thread | None = None
        self._closing = threading.Event()

    def __enter__(self) -> SyncLimiter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Deliver what the outbox holds (up to `flush_timeout`), then close the channel."""
        left = self.flush(self.flush_timeout)
        self._closing.set()
        if self._outbox_thread is not None:
            self._outbox_thread.join()
        if left:
            log.warning("closing with %d settlements undelivered: their leases settle them "
                        "as consumed", left)
        if self._own_channel:
            self._channel.close()

    @property
    def pending_settles(self) -> int:
        return len(self._outbox)

    def flush(self, timeout: float | None = None) -> int:
        """Wait until deferred settlements are delivered (or given up), at most `timeout`
        seconds; returns how many are still pending."""
        thread = self._outbox_thread
        if thread is not None:
            thread.join(timeout)
        return len(self._outbox)

    def _settle(self, method: str, request: pb.ReportRequest | pb.ReleaseRequest,
                reservation_id: str, lease_expires_at_ms: int) -> pb.Settlement | None:
        """Report/Release now, or (daemon unreachable) hand it to the outbox and return None."""
        try:
            resp = self._call(method, request, self.rpc_timeout)
        except LimiterUnavailable:
            if self._outbox.add(method, request, reservation_id, lease_expires_at_ms):
                self._outbox_thread = threading.Thread(
                    target=self._deliver, daemon=True, name="limiterd-settle-outbox")
                self._outbox_thread.start()
            return None
        assert isinstance(resp, pb.ReportResponse | pb.ReleaseResponse)
        return resp.settlement

    def _deliver(self) -> None:
        """The outbox's driver thread (see Limiter._deliver)."""
        while not self._closing.is_set():
            p, wait = self._outbox.next()
            if p is None:
                return
            if wait > 0:
                self._closing.wait(wait)
                continue
            try:
                getattr(self._stub, p.method)(p.request, timeout=self.rpc_timeout,
                                              wait_for_ready=True)
            except grpc.RpcError as e:
                if e.code() in TRANSIENT:
                    self._outbox.retry_later(p)
                else:
                    self._outbox.refused(p, f"{e.code().name}: {e.details()}")
            else:
                self._outbox.landed(p)

    def reserve(self, scope: str, model: str, *, input_tokens: int, max_output_tokens: int,
                max_wait: float = 0.0, user: str = "", lease_ms: int | None = None,
                on_wait: SyncWaitCallback | None = None, wait_budget: float | None = None,
                overloaded_hint: bool = False) -> SyncReservation:
        """Like `Limiter.reserve`, blocking; `on_wait` is a plain callback, called on the
        thread that enters the block."""
        validate(scope, model, input_tokens, max_output_tokens, max_wait)
        return SyncReservation(self, scope, model, user, input_tokens, max_output_tokens,
                               max_wait, self.lease_ms if lease_ms is None else lease_ms,
                               on_wait, WaitGate(wait_budget, overloaded_hint))

    def _call(self, method: str, request: object, timeout: float) -> object:
        rpc = getattr(self._stub, method)
        for attempt in range(1, self.transport_attempts + 1):
            try:
                return rpc(request, timeout=timeout)
            except grpc.RpcError as e:
                code = e.code()
                if code in TRANSIENT and attempt < self.transport_attempts:
                    if method == "Acquire":
                        self.counters.acquire_retries += 1
                    self.sleep(self.transport_backoff * 2 ** (attempt - 1))
                    continue
                raise map_status(code, e.details() or "", e.trailing_metadata()) from e
        raise AssertionError("unreachable")

    def _request(self, r: SyncReservation, max_wait: float) -> pb.AcquireRequest:
        return pb.AcquireRequest(scope=r.scope, model=r.model, user=r.user,
                                 input_tokens=r.input_tokens,
                                 max_output_tokens=r.max_output_tokens,
                                 max_wait_ms=round(max_wait * 1000), lease_ms=r.lease_ms,
                                 request_id=r.request_id)

    def _acquire(self, r: SyncReservation) -> Grant:
        try:
            if r.streams:
                return self._acquire_stream(r)
            resp = self._call("Acquire", self._request(r, r.max_wait),
                              r.max_wait + self.rpc_timeout)
        except LimiterUnavailable as e:
            return self._unavailable(r, e)
        assert isinstance(resp, pb.AcquireResponse)
        return _grant(r.request_id, resp)

    def _acquire_stream(self, r: SyncReservation) -> Grant:
        """Blocking twin of Limiter._acquire_stream (re-attach, early give-up, no leaks)."""
        start = self.clock()
        for attempt in range(1, self.transport_attempts + 1):
            left = max(0.0, r.max_wait - (self.clock() - start))
            call = self._stub.AcquireStream(self._request(r, left),
                                            timeout=left + self.rpc_timeout)
            try:
                for ev in call:
                    if ev.HasField("granted"):
                        if (stop := r.gate.check_grant(ev.granted)) is not None:
                            raise stop  # released below, with the place
                        return _grant(r.request_id, ev.granted)
                    update = WaitUpdate.of(ev.queued)
                    r.updates.append(update)
                    if r.on_wait is not None:
                        r.on_wait(update)
                    if (stop := r.gate.check(update, self.clock() - start)) is not None:
                        raise stop
                raise LimiterUnavailable("limiter unavailable: the wait stream ended early")
            except grpc.RpcError as e:
                code = e.code()
                if code in TRANSIENT and attempt < self.transport_attempts and (
                        self.clock() - start < r.max_wait or attempt == 1):
                    self.counters.stream_reattaches += 1
                    self.sleep(self.transport_backoff * 2 ** (attempt - 1))
                    continue
                if r.updates:
                    self._abandon(r)
                raise map_status(code, e.details() or "", e.trailing_metadata()) from e
            except BaseException:
                call.cancel()
                self._abandon(r)
                raise
        raise AssertionError("unreachable")

    def _abandon(self, r: SyncReservation) -> None:
        """Drop the kept place now and release a grant made meanwhile (see Limiter)."""
        try:
            resp = self._call("Acquire", self._request(r, 0.0), self.rpc_timeout)
        except LimiterBusy:
            return
        except Exception as e:
            self.counters.settle_failures += 1
            log.warning("could not abandon wait %s: %s", r.request_id, e)
            return
        assert isinstance(resp, pb.AcquireResponse)
        try:
            self._settle("Release", pb.ReleaseRequest(reservation_id=resp.reservation_id),
                         resp.reservation_id, resp.lease_expires_at_ms)
        except Exception as e:
            self.counters.settle_failures += 1
            log.warning("could not release %s: %s", resp.reservation_id, e)

    def _unavailable(self, r: SyncReservation, err: LimiterUnavailable) -> Grant:
        policy = self.on_unavailable
        if isinstance(policy, FailOpen):
            self.counters.fail_open += 1
            log.warning("limiterd unreachable, failing open for %s (%s)", r.model, err)
            return r.local_grant("open")
        if isinstance(policy, SafeCapacity):
            assert self._local is not None
            deadline = self.clock() + r.max_wait
            tokens = r.input_tokens + r.max_output_tokens
            while True:
                wait = self._local.try_take(tokens)
                if wait == 0:
                    self.counters.local_grants += 1
                    return r.local_grant("local")
                if math.isinf(wait):
                    raise LimiterRejected(
                        f"request of {tokens} tokens exceeds the local safe capacity") from err
                if self.clock() + wait > deadline:
                    raise LimiterBusy("local safe capacity exhausted while limiterd is down",
                                      math.ceil(wait * 1000)) from err
                self.sleep(wait)
        raise err


class SyncReservation:
    """Blocking twin of `Reservation`; use `with limiter.reserve(...) as r:`."""

    def __init__(self, limiter: SyncLimiter, scope: str, model: str, user: str,
                 input_tokens: int, max_output_tokens: int, max_wait: float,
                 lease_ms: int, on_wait: SyncWaitCallback | None = None,
                 gate: WaitGate | None = None) -> None:
        self._limiter = limiter
        self.on_wait = on_wait
        self.gate = gate or WaitGate()
        self.updates: list[WaitUpdate] = []
        self.scope, self.model, self.user = scope, model, user
        self.input_tokens, self.max_output_tokens = input_tokens, max_output_tokens
        self.max_wait, self.lease_ms = max_wait, lease_ms
        self.request_id = uuid.uuid4().hex
        self.grant: Grant | None = None
        self.lease_expires_at_ms = 0
        self.keepalives = 0
        self._state = Settle()
        self._stop = threading.Event()
        self._ka: threading.Thread | None = None

    @property
    def streams(self) -> bool:
        return (self.on_wait is not None or self.gate.budget is not None
                or self.gate.overloaded_hint)

    def local_grant(self, mode: str) -> Grant:
        return Grant("", self.request_id, 0, False, mode, self.input_tokens,
                     self.max_output_tokens)

    @property
    def reservation_id(self) -> str:
        return self.grant.reservation_id if self.grant else ""

    @property
    def mode(self) -> str:
        return self.grant.mode if self.grant else ""

    @property
    def settled(self) -> bool:
        return self._state.settled

    def __enter__(self) -> SyncReservation:
        self.grant = self._limiter._acquire(self)
        self.lease_expires_at_ms = self.grant.lease_expires_at_ms
        lease_s = (self.lease_ms or self.grant.lease_ms) / 1000
        if self.grant.mode == "daemon" and self._limiter.keepalive and lease_s > 0:
            self._ka = threading.Thread(target=self._keepalive, args=(lease_s,), daemon=True,
                                        name=f"limiterd-keepalive-{self.reservation_id}")
            self._ka.start()
        return self

    def _keepalive(self, lease_s: float) -> None:
        interval = lease_s * self._limiter.keepalive_fraction
        while not self._stop.wait(interval):
            try:
                resp = self._limiter._call("KeepAlive", pb.KeepAliveRequest(
                    reservation_id=self.reservation_id, lease_ms=self.lease_ms),
                    self._limiter.rpc_timeout)
                assert isinstance(resp, pb.KeepAliveResponse)
                self.lease_expires_at_ms = resp.lease_expires_at_ms
                self.keepalives += 1
            except Exception as e:
                log.warning("keepalive of %s failed: %s", self.reservation_id, e)
                interval = max(lease_s * self._limiter.keepalive_fraction / 4, 0.01)

    def _stop_keepalive(self) -> None:
        self._stop.set()
        if self._ka is not None and self._ka is not threading.current_thread():
            self._ka.join()
            self._ka = None

    def __exit__(self, et: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self._stop_keepalive()
        if self._state.settled or self.grant is None:
            return
        action, outcome, in_tok, out_tok = exit_action(self._state, self.grant, exc)
        try:
            if action == "release":
                self.release()
            else:
                retry_ms = exc.retry_after_ms if isinstance(exc, ProviderError) else None
                meta = ProviderMeta.of(exc) if isinstance(exc, ProviderError) else None
                self.report(in_tok, out_tok, outcome=outcome, retry_after_ms=retry_ms or 0,
                            provider=meta)
        except Exception as e:
            self._limiter.counters.settle_failures += 1
            log.warning("could not settle %s: %s", self.reservation_id, e)

    def mark_called(self) -> None:
        self._state.called = True

    def record_usage(self, input_tokens: int, output_tokens: int) -> None:
        self._state.usage = (input_tokens, output_tokens)

    def report(self, actual_input_tokens: int, actual_output_tokens: int, *,
               outcome: pb.Outcome = pb.OK, retry_after_ms: int = 0,
               provider: ProviderMeta | None = None) -> pb.Settlement | None:
        if self.grant is None:
            raise RuntimeError("report: the reservation was not acquired")
        if self._state.settled:
            raise RuntimeError(f"report: reservation {self.reservation_id} already settled")
        if actual_input_tokens < 0 or actual_output_tokens < 0:
            raise ValueError("actual_input_tokens/actual_output_tokens: must be >= 0")
        self._state.settled = True
        self._stop_keepalive()
        if self.grant.mode != "daemon":
            self._give_back(actual_input_tokens + actual_output_tokens)
            return None
        req = pb.ReportRequest(reservation_id=self.grant.reservation_id,
                               actual_input_tokens=actual_input_tokens,
                               actual_output_tokens=actual_output_tokens, outcome=outcome,
                               retry_after_ms=retry_after_ms, provider=provider_pb(provider))
        return self._limiter._settle("Report", req, self.reservation_id,
                                     self.lease_expires_at_ms)

    def report_error(self, err: ProviderError, *, fell_back: bool = False
                     ) -> pb.Settlement | None:
        in_tok, out_tok = used_by_failure(err, self._state.usage,
                                          (self.input_tokens, self.max_output_tokens))
        return self.report(in_tok, out_tok, outcome=outcome_for(err),
                           retry_after_ms=err.retry_after_ms or 0,
                           provider=ProviderMeta.of(err, fell_back=fell_back))

    def release(self) -> pb.Settlement | None:
        if self.grant is None:
            raise RuntimeError("release: the reservation was not acquired")
        if self._state.settled:
            raise RuntimeError(f"release: reservation {self.reservation_id} already settled")
        self._state.settled = True
        self._stop_keepalive()
        if self.grant.mode != "daemon":
            self._give_back(0)
            return None
        return self._limiter._settle(
            "Release", pb.ReleaseRequest(reservation_id=self.grant.reservation_id),
            self.reservation_id, self.lease_expires_at_ms)

    def _give_back(self, used: int) -> None:
        bucket = self._limiter._local
        if self.grant is not None and self.grant.mode == "local" and bucket is not None:
            bucket.give_back(self.input_tokens + self.max_output_tokens - used)


def _grant(request_id: str, resp: pb.AcquireResponse) -> Grant:
    return Grant(resp.reservation_id, request_id, resp.lease_expires_at_ms, resp.replayed,
                 "daemon", resp.reserved_input_tokens, resp.reserved_output_tokens,
                 max(0, resp.lease_expires_at_ms - resp.granted_at_ms))
