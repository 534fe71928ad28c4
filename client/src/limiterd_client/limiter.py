"""The limiter client: reserve before a provider call, report (or release) after.

`Limiter`/`Reservation` are the asyncio client; `SyncLimiter`/`SyncReservation` (sync.py)
are thin blocking faces over the same logic, which lives here once (see _runtime.py).
"""

from __future__ import annotations

import asyncio
import inspect
import math
import time
import uuid
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from types import TracebackType
from typing import Any, Generic, TypeVar

import grpc
import grpc.aio

from ._core import (
    CHANNEL_OPTIONS,
    TRANSIENT,
    Counters,
    Grant,
    Settle,
    ThrottledWarning,
    check_target,
    exit_action,
    log,
    map_status,
    outcome_for,
    provider_pb,
    used_by_failure,
    validate,
)
from ._runtime import AsyncRuntime, Job, Runtime, Sleep
from .errors import (
    LimiterBusy,
    LimiterRejected,
    LimiterUnavailable,
    ProviderError,
    ProviderMeta,
)
from .local import FAIL_CLOSED, FailClosed, FailOpen, LocalBuckets, SafeCapacity, UnavailablePolicy
from .outbox import Outbox
from .proto.limiter.v1 import limiter_pb2 as pb
from .proto.limiter.v1 import limiter_pb2_grpc as pb_grpc
from .wait import WaitCallback, WaitGate, WaitUpdate

R = TypeVar("R", bound="ReservationCore")
# While SafeCapacity holds a caller, ask the daemon again this often: it is back -> use it.
PROBE_INTERVAL_S = 1.0


class LimiterCore(Generic[R]):
    """What the async and the sync limiter share; every I/O goes through `self._rt`."""

    _rt: Runtime

    def _setup(self, target: str | None, channel: Any, on_unavailable: UnavailablePolicy,
               lease_ms: int, rpc_timeout: float, transport_attempts: int,
               transport_backoff: float, keepalive: bool, keepalive_fraction: float,
               clock: Callable[[], float], wall: Callable[[], float], flush_timeout: float,
               outbox_limit: int) -> None:
        if (target is None) == (channel is None):
            raise ValueError("target/channel: give exactly one")
        if target is not None:
            check_target(target)
        if not 0 < keepalive_fraction < 1:
            raise ValueError("keepalive_fraction: must be in (0, 1)")
        if transport_attempts < 1:
            raise ValueError("transport_attempts: must be >= 1")
        if not isinstance(on_unavailable, FailClosed | FailOpen | SafeCapacity):
            raise TypeError("on_unavailable: FailClosed(), FailOpen() or SafeCapacity(...)")
        self.target = target or ""
        self.on_unavailable = on_unavailable
        self.lease_ms = lease_ms
        self.rpc_timeout = rpc_timeout
        self.transport_attempts = transport_attempts
        self.transport_backoff = transport_backoff
        self.keepalive = keepalive
        self.keepalive_fraction = keepalive_fraction
        self.clock = clock
        self.wall = wall
        self.probe_interval = PROBE_INTERVAL_S
        self.counters = Counters()
        self._local = (LocalBuckets(on_unavailable, clock)
                       if isinstance(on_unavailable, SafeCapacity) else None)
        self._fail_open_warning = ThrottledWarning(clock)
        self.flush_timeout = flush_timeout
        self._outbox = Outbox(self.counters, clock, wall, limit=outbox_limit)
        self._outbox_job: Job | None = None
        # provider pauses this client reported (scope, model) -> wall time, for messages
        self._pauses: dict[tuple[str, str], float] = {}

    # -- shared by both faces -------------------------------------------------------------
    def _new_reservation(self, cls: type[R], scope: str, model: str, input_tokens: int,
                         max_output_tokens: int, max_wait: float, user: str,
                         lease_ms: int | None, on_wait: Any, wait_budget: float | None,
                         overloaded_hint: bool, marks_sent: bool = False) -> R:
        validate(scope, model, input_tokens, max_output_tokens, max_wait)
        gate = WaitGate(wait_budget, overloaded_hint)
        r = cls(self, scope, model, user, input_tokens, max_output_tokens, max_wait,
                self.lease_ms if lease_ms is None else lease_ms, on_wait, gate)
        r.marks_sent = marks_sent
        return r

    def _not_ready(self, timeout: float) -> LimiterUnavailable:
        return LimiterUnavailable(
            f"limiterd at {self.target or 'the given channel'} did not accept a connection "
            f"within {timeout:g} s: is it running (make run / limiterd serve), and is the "
            "target right?")

    @property
    def pending_settles(self) -> int:
        """Reports/Releases waiting for the daemon to come back."""
        return len(self._outbox)

    async def _flush(self, timeout: float | None) -> int:
        job = self._outbox_job
        if job is not None and not job.done():
            await job.join(timeout)
        return len(self._outbox)

    async def _close(self, own_channel: bool) -> None:
        left = await self._flush(self.flush_timeout)
        if self._outbox_job is not None:
            await self._outbox_job.stop()
        if left:
            log.warning("closing with %d settlements undelivered: their leases settle them "
                        "as consumed", left)
        if own_channel:
            await self._rt.close_channel()

    async def _call(self, method: str, request: object, timeout: float,
                    attempts: int | None = None) -> Any:
        """One RPC with transport retries (same request, so idempotent on the daemon)."""
        attempts = attempts or self.transport_attempts
        for attempt in range(1, attempts + 1):
            try:
                return await self._rt.unary(method, request, timeout)
            except grpc.RpcError as e:
                code = e.code()
                if code in TRANSIENT and attempt < attempts:
                    if method == "Acquire":
                        self.counters.acquire_retries += 1
                    await self._rt.sleep(self.transport_backoff * 2 ** (attempt - 1))
                    continue
                raise map_status(code, e.details() or "",
                                 e.trailing_metadata()) from e
        raise AssertionError("unreachable")

    def _request(self, r: ReservationCore, max_wait: float) -> pb.AcquireRequest:
        return pb.AcquireRequest(scope=r.scope, model=r.model, user=r.user,
                                 input_tokens=r.input_tokens,
                                 max_output_tokens=r.max_output_tokens,
                                 max_wait_ms=round(max_wait * 1000), lease_ms=r.lease_ms,
                                 request_id=r.request_id, marks_sent=r.marks_sent)

    async def _acquire(self, r: ReservationCore) -> Grant:
        try:
            return await self._acquire_daemon(r, r.max_wait)
        except LimiterUnavailable as e:
            return await self._unavailable(r, e)
        except LimiterBusy as e:
            raise self._explain_pause(r, e) from e

    async def _acquire_daemon(self, r: ReservationCore, max_wait: float,
                              attempts: int | None = None) -> Grant:
        if r.streams:
            return await self._acquire_stream(r, max_wait)
        resp = await self._call("Acquire", self._request(r, max_wait),
                                max_wait + self.rpc_timeout, attempts)
        assert isinstance(resp, pb.AcquireResponse)
        return _grant(r.request_id, resp)

    async def _acquire_stream(self, r: ReservationCore, max_wait: float) -> Grant:
        """AcquireStream with re-attach: a broken stream is called again with the same
        request_id and what is left of max_wait, so the daemon keeps the caller's place."""
        start = self.clock()
        for attempt in range(1, self.transport_attempts + 1):
            left = max(0.0, max_wait - (self.clock() - start))
            call = self._rt.stream("AcquireStream", self._request(r, left),
                                   left + self.rpc_timeout)
            try:
                async for ev in call:
                    if ev.HasField("granted"):
                        if (stop := r.gate.check_grant(ev.granted)) is not None:
                            raise stop  # released below, with the place
                        return _grant(r.request_id, ev.granted)
                    update = WaitUpdate.of(ev.queued)
                    r.updates.append(update)
                    if r.on_wait is not None:  # heard even when it ends the wait
                        done = r.on_wait(update)
                        if inspect.isawaitable(done):
                            await done
                    if (stop := r.gate.check(update, self.clock() - start)) is not None:
                        raise stop
                raise LimiterUnavailable("limiter unavailable: the wait stream ended early")
            except grpc.RpcError as e:
                code = e.code()
                if code in TRANSIENT and attempt < self.transport_attempts and (
                        self.clock() - start < max_wait or attempt == 1):
                    self.counters.stream_reattaches += 1
                    await self._rt.sleep(self.transport_backoff * 2 ** (attempt - 1))
                    continue
                if r.updates:  # queued once: do not leave a place (or a grant) behind
                    await self._rt.shielded(self._abandon(r))
                raise map_status(code, e.details() or "",
                                 e.trailing_metadata()) from e
            except BaseException:
                # A deliberate give-up (budget, hint, the callback raised, the task was
                # cancelled): leave the queue now instead of after the re-attach grace.
                call.cancel()
                await self._rt.shielded(self._abandon(r))
                raise
        raise AssertionError("unreachable")

    async def _abandon(self, r: ReservationCore) -> None:
        """Make the daemon drop a place kept for this request_id: re-attach with max_wait 0
        (the wait ends at once) and release a grant it made meanwhile. Without this a grant
        made within the re-attach grace would stay open until its lease expired."""
        try:
            resp = await self._call("Acquire", self._request(r, 0.0), self.rpc_timeout)
        except LimiterBusy:
            return  # the place is gone: nothing held
        except Exception as e:
            self.counters.settle_failures += 1
            log.warning("could not abandon wait %s: %s", r.request_id, e)
            return
        assert isinstance(resp, pb.AcquireResponse)
        try:
            await self._settle("Release", pb.ReleaseRequest(reservation_id=resp.reservation_id),
                               resp.reservation_id, resp.lease_expires_at_ms)
        except Exception as e:  # the lease still expires and settles as consumed
            self.counters.settle_failures += 1
            log.warning("could not release %s: %s", resp.reservation_id, e)

    async def _unavailable(self, r: ReservationCore, err: LimiterUnavailable) -> Grant:
        policy = self.on_unavailable
        if isinstance(policy, FailOpen):
            self.counters.fail_open += 1
            self._fail_open_warning.warn(f"limiterd unreachable, failing open ({err})")
            return r.local_grant("open")
        if isinstance(policy, SafeCapacity):
            assert self._local is not None
            bucket = self._local.for_model(r.model)
            deadline = self.clock() + r.max_wait
            tokens = r.input_tokens + r.max_output_tokens
            while True:
                wait = bucket.try_take(tokens)
                if wait == 0:
                    self.counters.local_grants += 1
                    return r.local_grant("local")
                if math.isinf(wait):
                    raise LimiterRejected(
                        f"request of {tokens} tokens exceeds the local safe capacity for "
                        f"{r.model!r} ({policy.tokens_per_minute} tokens per minute)") from err
                if self.clock() + wait > deadline:
                    raise LimiterBusy(f"local safe capacity for {r.model!r} exhausted while "
                                      "limiterd is down", math.ceil(wait * 1000)) from err
                await self._rt.sleep(min(wait, self.probe_interval))
                try:  # the daemon may be back: then it decides, not the local budget
                    return await self._acquire_daemon(
                        r, max(0.0, deadline - self.clock()), attempts=1)
                except LimiterUnavailable:
                    continue
        raise err

    def _note_pause(self, scope: str, model: str, retry_after_ms: int) -> None:
        if retry_after_ms > 0:
            self._pauses[(scope, model)] = self.wall() + retry_after_ms / 1000

    def _explain_pause(self, r: ReservationCore, err: LimiterBusy) -> LimiterBusy:
        """Say so when the wait is a provider pause this client reported (a 429)."""
        until = self._pauses.get((r.scope, r.model), 0.0)
        if until <= self.wall():
            self._pauses.pop((r.scope, r.model), None)
            return err
        when = datetime.fromtimestamp(until, UTC).strftime("%H:%M:%S UTC")
        return type(err)(f"{r.model!r} is paused until {when} after the provider answered "
                         f"429 (rate limited); {err}", err.retry_after_ms)

    async def _keepalive(self, r: ReservationCore, grant: Grant, sleep: Sleep) -> None:
        lease_s = (r.lease_ms or grant.lease_ms) / 1000
        if lease_s <= 0:
            return
        interval = lease_s * self.keepalive_fraction
        while True:
            await sleep(interval)
            try:
                resp = await self._call("KeepAlive", pb.KeepAliveRequest(
                    reservation_id=grant.reservation_id, lease_ms=r.lease_ms), self.rpc_timeout)
                assert isinstance(resp, pb.KeepAliveResponse)
                r.lease_expires_at_ms = resp.lease_expires_at_ms
                r.keepalives += 1
                interval = lease_s * self.keepalive_fraction
            except Exception as e:  # keep trying: the lease may still be saved
                log.warning("keepalive of %s failed: %s", grant.reservation_id, e)
                interval = max(lease_s * self.keepalive_fraction / 4, 0.01)

    def _mark_sent(self, reservation_id: str) -> None:
        """MarkSent, fire and forget: the provider request goes out without waiting for it
        (lost, it only means the daemon's hold ends at the Report)."""
        self._rt.fire("MarkSent", pb.MarkSentRequest(reservation_id=reservation_id),
                      self.rpc_timeout)
        self.counters.marks_sent += 1

    async def _settle(self, method: str, request: pb.ReportRequest | pb.ReleaseRequest,
                      reservation_id: str, lease_expires_at_ms: int) -> pb.Settlement | None:
        """Report/Release now, or (daemon unreachable) hand it to the outbox and return None."""
        try:
            resp = await self._call(method, request, self.rpc_timeout)
        except LimiterUnavailable:
            if self._outbox.add(method, request, reservation_id, lease_expires_at_ms):
                self._outbox_job = self._rt.start(self._deliver, "limiterd-settle-outbox")
            return None
        assert isinstance(resp, pb.ReportResponse | pb.ReleaseResponse)
        return resp.settlement

    async def _deliver(self, sleep: Sleep) -> None:
        """The outbox's driver: one try per due entry, waiting for the channel to be ready."""
        while True:
            p, wait = self._outbox.next()
            if p is None:
                return
            if wait > 0:
                await sleep(wait)
                continue
            try:
                await self._rt.unary(p.method, p.request, self.rpc_timeout, wait_for_ready=True)
            except grpc.RpcError as e:
                code = e.code()
                if code in TRANSIENT:
                    self._outbox.retry_later(p)
                else:
                    self._outbox.refused(p, f"{code.name}: {e.details()}")
            else:
                self._outbox.landed(p)


class ReservationCore:
    """State and logic of one reservation, shared by `Reservation` and `SyncReservation`."""

    def __init__(self, limiter: LimiterCore[Any], scope: str, model: str, user: str,
                 input_tokens: int, max_output_tokens: int, max_wait: float, lease_ms: int,
                 on_wait: Any = None, gate: WaitGate | None = None) -> None:
        self._limiter = limiter
        self.on_wait = on_wait
        self.gate = gate or WaitGate()
        self.updates: list[WaitUpdate] = []  # every WaitUpdate heard, in order
        self.scope, self.model, self.user = scope, model, user
        self.input_tokens, self.max_output_tokens = input_tokens, max_output_tokens
        self.max_wait, self.lease_ms = max_wait, lease_ms
        self.request_id = uuid.uuid4().hex
        # The caller calls mark_called() just before it sends the provider request: the
        # daemon may then hold a refill until it does (issue 15), instead of guessing.
        self.marks_sent = False
        self._marked = False
        self.grant: Grant | None = None
        self.lease_expires_at_ms = 0
        self.keepalives = 0
        self._state = Settle()
        self._ka: Job | None = None

    @property
    def streams(self) -> bool:
        """Acquire runs as AcquireStream (live wait status or an early give-up asked for)."""
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
        """"daemon", "local" (SafeCapacity) or "open" (FailOpen); "" before the grant."""
        return self.grant.mode if self.grant else ""

    @property
    def settled(self) -> bool:
        return self._state.settled

    def mark_called(self, *, sent: bool = True) -> None:
        """The provider call starts now: from now on an exception reports, not releases.
        With `sent` (the default) the request goes out now too: mark_sent(). `sent=False`:
        the caller calls mark_sent() itself when it does (after connecting)."""
        self._state.called = True
        if sent:
            self.mark_sent()

    def mark_sent(self) -> None:
        """The provider request goes out now. When the grant asks for it (`marks_sent=True`),
        the daemon is told at once, once (MarkSent, not waited for): its held refill resumes
        as the provider's starts."""
        grant = self.grant
        if not self._marked and grant is not None and grant.mark_sent_wanted:
            self._marked = True
            self._limiter._mark_sent(grant.reservation_id)

    def record_usage(self, input_tokens: int, output_tokens: int) -> None:
        """Best-known usage so far, reported if the block ends without an explicit report."""
        self._state.usage = (input_tokens, output_tokens)

    async def _enter(self) -> None:
        lim = self._limiter
        self.grant = await lim._acquire(self)
        self.lease_expires_at_ms = self.grant.lease_expires_at_ms
        grant = self.grant
        if grant.mode == "daemon" and lim.keepalive and (self.lease_ms or grant.lease_ms) > 0:
            self._ka = lim._rt.start(lambda sleep: lim._keepalive(self, grant, sleep),
                                     f"limiterd-keepalive-{grant.reservation_id}")

    async def _exit(self, exc: BaseException | None) -> None:
        await self._stop_keepalive()
        if self._state.settled or self.grant is None:
            return
        action, outcome, in_tok, out_tok = exit_action(self._state, self.grant, exc)
        try:
            if action == "release":
                await self._release()
            else:
                retry_ms = exc.retry_after_ms if isinstance(exc, ProviderError) else None
                meta = ProviderMeta.of(exc) if isinstance(exc, ProviderError) else None
                await self._report(in_tok, out_tok, outcome=outcome,
                                   retry_after_ms=retry_ms or 0, provider=meta)
        except Exception as e:
            # The lease still expires and settles as consumed; never hide the app's error.
            self._limiter.counters.settle_failures += 1
            log.warning("could not settle %s: %s", self.reservation_id, e)

    async def _stop_keepalive(self) -> None:
        if self._ka is not None:
            await self._ka.stop()
            self._ka = None

    def _begin_settle(self, what: str) -> Grant:
        if self.grant is None:
            raise RuntimeError(f"{what}: the reservation was not acquired")
        if self._state.settled:
            raise RuntimeError(f"{what}: reservation {self.reservation_id} already settled")
        self._state.settled = True
        return self.grant

    async def _report(self, actual_input_tokens: int, actual_output_tokens: int, *,
                      outcome: pb.Outcome = pb.OK, retry_after_ms: int = 0,
                      provider: ProviderMeta | None = None) -> pb.Settlement | None:
        if actual_input_tokens < 0 or actual_output_tokens < 0:
            raise ValueError("actual_input_tokens/actual_output_tokens: must be >= 0")
        grant = self._begin_settle("report")
        await self._stop_keepalive()
        if outcome == pb.RATE_LIMITED:
            self._limiter._note_pause(self.scope, self.model, retry_after_ms)
        if grant.mode != "daemon":
            self._give_back(actual_input_tokens + actual_output_tokens)
            return None
        req = pb.ReportRequest(reservation_id=grant.reservation_id,
                               actual_input_tokens=actual_input_tokens,
                               actual_output_tokens=actual_output_tokens, outcome=outcome,
                               retry_after_ms=retry_after_ms, provider=provider_pb(provider))
        return await self._limiter._settle("Report", req, self.reservation_id,
                                           self.lease_expires_at_ms)

    async def _report_error(self, err: ProviderError, *, fell_back: bool = False
                            ) -> pb.Settlement | None:
        in_tok, out_tok = used_by_failure(err, self._state.usage,
                                          (self.input_tokens, self.max_output_tokens))
        return await self._report(in_tok, out_tok, outcome=outcome_for(err),
                                  retry_after_ms=err.retry_after_ms or 0,
                                  provider=ProviderMeta.of(err, fell_back=fell_back))

    async def _release(self) -> pb.Settlement | None:
        grant = self._begin_settle("release")
        await self._stop_keepalive()
        if grant.mode != "daemon":
            self._give_back(0)
            return None
        return await self._limiter._settle(
            "Release", pb.ReleaseRequest(reservation_id=grant.reservation_id),
            self.reservation_id, self.lease_expires_at_ms)

    def _give_back(self, used: int) -> None:
        local = self._limiter._local
        if self.grant is not None and self.grant.mode == "local" and local is not None:
            local.for_model(self.model).give_back(
                self.input_tokens + self.max_output_tokens - used)


def _grant(request_id: str, resp: pb.AcquireResponse) -> Grant:
    return Grant(resp.reservation_id, request_id, resp.lease_expires_at_ms, resp.replayed,
                 "daemon", resp.reserved_input_tokens, resp.reserved_output_tokens,
                 max(0, resp.lease_expires_at_ms - resp.granted_at_ms), resp.mark_sent_wanted)


SYNC_IN_ASYNC = ("{cls} is the asyncio client: use `async with`/`await`, or {other} in "
                 "synchronous code")


class Limiter(LimiterCore["Reservation"]):
    """Client of one limiterd, for asyncio. Give a `target` ("127.0.0.1:50051",
    "unix:/run/limiterd.sock") or your own aio `channel`. (Synchronous code: `SyncLimiter`.)

    `on_unavailable` decides what happens while the daemon cannot be reached: FailClosed()
    (raise LimiterUnavailable), FailOpen() (counted, logged) or SafeCapacity(rpm, tpm).

    A Report or Release the daemon cannot take (killed, restarting) never costs the app its
    provider answer: it is delivered in the background until it lands or its lease is over
    (`counters.settles_*`); `close()` (or `flush()`) waits up to `flush_timeout` for it.
    """

    def __init__(
        self,
        target: str | None = None,
        *,
        channel: grpc.aio.Channel | None = None,
        on_unavailable: UnavailablePolicy = FAIL_CLOSED,
        lease_ms: int = 0,
        rpc_timeout: float = 5.0,
        transport_attempts: int = 3,
        transport_backoff: float = 0.05,
        keepalive: bool = True,
        keepalive_fraction: float = 0.5,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], Awaitable[None]] | None = None,
        wall: Callable[[], float] = time.time,
        flush_timeout: float = 10.0,
        outbox_limit: int = 1000,
    ) -> None:
        if channel is not None and not isinstance(channel, grpc.aio.Channel):
            raise TypeError("channel: Limiter needs a grpc.aio channel; for a sync "
                            "grpc.Channel use SyncLimiter")
        self._setup(target, channel, on_unavailable, lease_ms, rpc_timeout,
                    transport_attempts, transport_backoff, keepalive, keepalive_fraction,
                    clock, wall, flush_timeout, outbox_limit)
        self._own_channel = channel is None
        ch = channel if channel is not None else grpc.aio.insecure_channel(
            self.target, options=CHANNEL_OPTIONS)
        self._channel = ch
        self.sleep = sleep or asyncio.sleep
        self._rt = AsyncRuntime(ch, pb_grpc.LimiterStub(ch), self.sleep)

    async def __aenter__(self) -> Limiter:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    def __enter__(self) -> None:
        raise TypeError(SYNC_IN_ASYNC.format(cls="Limiter", other="SyncLimiter"))

    def __exit__(self, *exc: object) -> None:
        """Never reached (__enter__ raises); present so `with` gets the clear message."""

    async def close(self) -> None:
        """Deliver what the outbox holds (up to `flush_timeout`), then close the channel."""
        await self._close(self._own_channel)

    async def flush(self, timeout: float | None = None) -> int:
        """Wait until deferred settlements are delivered (or given up), at most `timeout`
        seconds; returns how many are still pending."""
        return await self._flush(timeout)

    async def wait_ready(self, timeout: float) -> None:
        """Wait until the daemon accepts connections (start-up ordering in a pod or a
        compose file); LimiterUnavailable after `timeout` seconds."""
        try:
            await asyncio.wait_for(self._channel.channel_ready(), timeout)
        except TimeoutError:
            raise self._not_ready(timeout) from None

    def reserve(self, scope: str, model: str, *, input_tokens: int, max_output_tokens: int,
                max_wait: float = 0.0, user: str = "", lease_ms: int | None = None,
                on_wait: WaitCallback | None = None, wait_budget: float | None = None,
                overloaded_hint: bool = False, marks_sent: bool = False) -> Reservation:
        """A reservation to use as `async with`: Acquire on entry, settle on exit.

        Live wait status: give `on_wait` (a sync or async callback) and the Acquire runs as
        AcquireStream; while queued it is called with a `WaitUpdate` at once, on every change
        and at the daemon's keepalive interval, then the block is entered on the grant. A
        stream lost to UNAVAILABLE/transport errors re-attaches with the same request_id
        (up to `transport_attempts` times, within the original `max_wait`): the place in
        the queue is kept and no second reservation is made.

        Give up early (also streams): `wait_budget` (s) raises `WaitTooLong` as soon as the
        daemon's estimate exceeds what is left of the budget; `overloaded_hint=True` raises
        `ModelOverloadedHint` when the daemon marks the model overloaded. Either way the
        place is dropped at once and a grant made meanwhile is released, so nothing leaks.

        `marks_sent=True` promises to call `r.mark_called()` just before sending the
        provider request: a burst from a full bucket then refills from that moment (the
        provider's), not from a guess. Without the mark the hold lasts until the Report.
        """
        return self._new_reservation(Reservation, scope, model, input_tokens,
                                     max_output_tokens, max_wait, user, lease_ms, on_wait,
                                     wait_budget, overloaded_hint, marks_sent)


class Reservation(ReservationCore):
    """One reservation. Use `async with limiter.reserve(...) as r:`.

    Call `r.mark_called()` when the provider call starts, then `await r.report(in, out)`.
    Leaving the block early settles for you: an exception before the call -> Release; after
    it -> Report ERROR with the best-known usage; no report -> Report of the reserved amounts.
    """

    async def __aenter__(self) -> Reservation:
        await self._enter()
        return self

    async def __aexit__(self, et: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        await self._exit(exc)

    def __enter__(self) -> None:
        raise TypeError(SYNC_IN_ASYNC.format(cls="Limiter.reserve", other="SyncLimiter"))

    def __exit__(self, *exc: object) -> None:
        """Never reached (__enter__ raises)."""

    async def report(self, actual_input_tokens: int, actual_output_tokens: int, *,
                     outcome: pb.Outcome = pb.OK, retry_after_ms: int = 0,
                     provider: ProviderMeta | None = None) -> pb.Settlement | None:
        """Settle with what the provider used. Returns the daemon's settlement; None when the
        grant was local, or when the daemon is unreachable and the Report was handed to the
        background outbox (it is retried until it lands or the lease is over)."""
        return await self._report(actual_input_tokens, actual_output_tokens, outcome=outcome,
                                  retry_after_ms=retry_after_ms, provider=provider)

    async def report_error(self, err: ProviderError, *, fell_back: bool = False
                           ) -> pb.Settlement | None:
        """Report a failed attempt: RATE_LIMITED / OVERLOADED / ERROR with the provider's
        details (so the daemon can pause the others) and what it used (nothing if the
        provider refused it)."""
        return await self._report_error(err, fell_back=fell_back)

    async def release(self) -> pb.Settlement | None:
        """The provider call never happened: refund everything."""
        return await self._release()

