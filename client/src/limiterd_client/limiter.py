"""The async limiter: reserve before a provider call, report (or release) after."""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import math
import time
import uuid
from collections.abc import Awaitable, Callable
from types import TracebackType

import grpc
import grpc.aio

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
from .errors import (
    LimiterBusy,
    LimiterRejected,
    LimiterUnavailable,
    ProviderError,
    ProviderMeta,
)
from .local import FAIL_CLOSED, FailOpen, LocalBucket, SafeCapacity, UnavailablePolicy
from .outbox import Outbox
from .proto.limiter.v1 import limiter_pb2 as pb
from .proto.limiter.v1 import limiter_pb2_grpc as pb_grpc
from .wait import WaitCallback, WaitGate, WaitUpdate


class Limiter:
    """Client of one limiterd. Give a `target` ("127.0.0.1:50051") or your own aio `channel`.

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
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
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
        self._channel = channel if channel is not None else grpc.aio.insecure_channel(
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
        self._outbox_task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> Limiter:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        """Deliver what the outbox holds (up to `flush_timeout`), then close the channel."""
        left = await self.flush(self.flush_timeout)
        if self._outbox_task is not None:
            self._outbox_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._outbox_task
        if left:
            log.warning("closing with %d settlements undelivered: their leases settle them "
                        "as consumed", left)
        if self._own_channel:
            await self._channel.close()

    @property
    def pending_settles(self) -> int:
        """Reports/Releases waiting for the daemon to come back."""
        return len(self._outbox)

    async def flush(self, timeout: float | None = None) -> int:
        """Wait until deferred settlements are delivered (or given up), at most `timeout`
        seconds; returns how many are still pending."""
        task = self._outbox_task
        if task is not None and not task.done():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(task), timeout)
        return len(self._outbox)

    async def _settle(self, method: str, request: pb.ReportRequest | pb.ReleaseRequest,
                      reservation_id: str, lease_expires_at_ms: int) -> pb.Settlement | None:
        """Report/Release now, or (daemon unreachable) hand it to the outbox and return None."""
        try:
            resp = await self._call(method, request, self.rpc_timeout)
        except LimiterUnavailable:
            if self._outbox.add(method, request, reservation_id, lease_expires_at_ms):
                self._outbox_task = asyncio.get_running_loop().create_task(self._deliver())
            return None
        assert isinstance(resp, pb.ReportResponse | pb.ReleaseResponse)
        return resp.settlement

    async def _deliver(self) -> None:
        """The outbox's driver: one try per due entry, waiting for the channel to be ready."""
        while True:
            p, wait = self._outbox.next()
            if p is None:
                return
            if wait > 0:
                await self.sleep(wait)
                continue
            try:
                await getattr(self._stub, p.method)(p.request, timeout=self.rpc_timeout,
                                                    wait_for_ready=True)
            except grpc.aio.AioRpcError as e:
                if e.code() in TRANSIENT:
                    self._outbox.retry_later(p)
                else:
                    self._outbox.refused(p, f"{e.code().name}: {e.details()}")
            else:
                self._outbox.landed(p)

    def reserve(self, scope: str, model: str, *, input_tokens: int, max_output_tokens: int,
                max_wait: float = 0.0, user: str = "", lease_ms: int | None = None,
                on_wait: WaitCallback | None = None, wait_budget: float | None = None,
                overloaded_hint: bool = False) -> Reservation:
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
        """
        validate(scope, model, input_tokens, max_output_tokens, max_wait)
        gate = WaitGate(wait_budget, overloaded_hint)
        return Reservation(self, scope, model, user, input_tokens, max_output_tokens, max_wait,
                           self.lease_ms if lease_ms is None else lease_ms, on_wait, gate)

    async def _call(self, method: str, request: object, timeout: float) -> object:
        """One RPC with transport retries (same request, so idempotent on the daemon)."""
        rpc = getattr(self._stub, method)
        for attempt in range(1, self.transport_attempts + 1):
            try:
                return await rpc(request, timeout=timeout)
            except grpc.aio.AioRpcError as e:
                if e.code() in TRANSIENT and attempt < self.transport_attempts:
                    if method == "Acquire":
                        self.counters.acquire_retries += 1
                    await self.sleep(self.transport_backoff * 2 ** (attempt - 1))
                    continue
                raise map_status(e.code(), e.details() or "", e.trailing_metadata()) from e
        raise AssertionError("unreachable")

    def _request(self, r: Reservation, max_wait: float) -> pb.AcquireRequest:
        return pb.AcquireRequest(scope=r.scope, model=r.model, user=r.user,
                                 input_tokens=r.input_tokens,
                                 max_output_tokens=r.max_output_tokens,
                                 max_wait_ms=round(max_wait * 1000), lease_ms=r.lease_ms,
                                 request_id=r.request_id)

    async def _acquire(self, r: Reservation) -> Grant:
        try:
            if r.streams:
                return await self._acquire_stream(r)
            resp = await self._call("Acquire", self._request(r, r.max_wait),
                                    r.max_wait + self.rpc_timeout)
        except LimiterUnavailable as e:
            return await self._unavailable(r, e)
        assert isinstance(resp, pb.AcquireResponse)
        return _grant(r.request_id, resp)

    async def _acquire_stream(self, r: Reservation) -> Grant:
        """AcquireStream with re-attach: a broken stream is called again with the same
        request_id and what is left of max_wait, so the daemon keeps the caller's place."""
        start = self.clock()
        for attempt in range(1, self.transport_attempts + 1):
            left = max(0.0, r.max_wait - (self.clock() - start))
            call = self._stub.AcquireStream(self._request(r, left),
                                            timeout=left + self.rpc_timeout)
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
            except grpc.aio.AioRpcError as e:
                if e.code() in TRANSIENT and attempt < self.transport_attempts and (
                        self.clock() - start < r.max_wait or attempt == 1):
                    self.counters.stream_reattaches += 1
                    await self.sleep(self.transport_backoff * 2 ** (attempt - 1))
                    continue
                if r.updates:  # queued once: do not leave a place (or a grant) behind
                    await asyncio.shield(self._abandon(r))
                raise map_status(e.code(), e.details() or "", e.trailing_metadata()) from e
            except BaseException:
                # A deliberate give-up (budget, hint, the callback raised, the task was
                # cancelled): leave the queue now instead of after the re-attach grace.
                call.cancel()
                await asyncio.shield(self._abandon(r))
                raise
        raise AssertionError("unreachable")

    async def _abandon(self, r: Reservation) -> None:
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
        await self._release_quietly(resp.reservation_id, resp.lease_expires_at_ms)

    async def _release_quietly(self, reservation_id: str, lease_expires_at_ms: int = 0) -> None:
        try:
            await self._settle("Release", pb.ReleaseRequest(reservation_id=reservation_id),
                               reservation_id, lease_expires_at_ms)
        except Exception as e:  # the lease still expires and settles as consumed
            self.counters.settle_failures += 1
            log.warning("could not release %s: %s", reservation_id, e)

    async def _unavailable(self, r: Reservation, err: LimiterUnavailable) -> Grant:
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
                await self.sleep(wait)
        raise err

    async def _keepalive(self, r: Reservation, grant: Grant) -> None:
        lease_s = (r.lease_ms or grant.lease_ms) / 1000
        if lease_s <= 0:
            return
        interval = lease_s * self.keepalive_fraction
        while True:
            await self.sleep(interval)
            try:
                resp = await self._call("KeepAlive", pb.KeepAliveRequest(
                    reservation_id=grant.reservation_id, lease_ms=r.lease_ms), self.rpc_timeout)
                assert isinstance(resp, pb.KeepAliveResponse)
                r.lease_expires_at_ms = resp.lease_expires_at_ms
                r.keepalives += 1
            except Exception as e:  # keep trying: the lease may still be saved
                log.warning("keepalive of %s failed: %s", grant.reservation_id, e)
                interval = max(lease_s * self.keepalive_fraction / 4, 0.01)


class Reservation:
    """One reservation. Use `async with limiter.reserve(...) as r:`.

    Call `r.mark_called()` when the provider call starts, then `await r.report(in, out)`.
    Leaving the block early settles for you: an exception before the call -> Release; after
    it -> Report ERROR with the best-known usage; no report -> Report of the reserved amounts.
    """

    def __init__(self, limiter: Limiter, scope: str, model: str, user: str, input_tokens: int,
                 max_output_tokens: int, max_wait: float, lease_ms: int,
                 on_wait: WaitCallback | None = None, gate: WaitGate | None = None) -> None:
        self._limiter = limiter
        self.on_wait = on_wait
        self.gate = gate or WaitGate()
        self.updates: list[WaitUpdate] = []  # every WaitUpdate heard, in order
        self.scope, self.model, self.user = scope, model, user
        self.input_tokens, self.max_output_tokens = input_tokens, max_output_tokens
        self.max_wait, self.lease_ms = max_wait, lease_ms
        self.request_id = uuid.uuid4().hex
        self.grant: Grant | None = None
        self.lease_expires_at_ms = 0
        self.keepalives = 0
        self._state = Settle()
        self._ka_task: asyncio.Task[None] | None = None

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
        return self.grant.mode if self.grant else ""

    @property
    def settled(self) -> bool:
        return self._state.settled

    async def __aenter__(self) -> Reservation:
        self.grant = await self._limiter._acquire(self)
        self.lease_expires_at_ms = self.grant.lease_expires_at_ms
        if self.grant.mode == "daemon" and self._limiter.keepalive:
            self._ka_task = asyncio.create_task(self._limiter._keepalive(self, self.grant))
        return self

    async def __aexit__(self, et: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        await self._stop_keepalive()
        if self._state.settled or self.grant is None:
            return
        action, outcome, in_tok, out_tok = exit_action(self._state, self.grant, exc)
        try:
            if action == "release":
                await self.release()
            else:
                retry_ms = exc.retry_after_ms if isinstance(exc, ProviderError) else None
                meta = ProviderMeta.of(exc) if isinstance(exc, ProviderError) else None
                await self.report(in_tok, out_tok, outcome=outcome,
                                  retry_after_ms=retry_ms or 0, provider=meta)
        except Exception as e:
            # The lease still expires and settles as consumed; never hide the app's error.
            self._limiter.counters.settle_failures += 1
            log.warning("could not settle %s: %s", self.reservation_id, e)

    async def _stop_keepalive(self) -> None:
        if self._ka_task is not None:
            self._ka_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._ka_task
            self._ka_task = None

    def mark_called(self) -> None:
        """The provider call has started: from now on an exception reports, not releases."""
        self._state.called = True

    def record_usage(self, input_tokens: int, output_tokens: int) -> None:
        """Best-known usage so far, reported if the block ends without an explicit report."""
        self._state.usage = (input_tokens, output_tokens)

    async def report(self, actual_input_tokens: int, actual_output_tokens: int, *,
                     outcome: pb.Outcome = pb.OK, retry_after_ms: int = 0,
                     provider: ProviderMeta | None = None) -> pb.Settlement | None:
        """Settle with what the provider used. Returns the daemon's settlement; None when the
        grant was local, or when the daemon is unreachable and the Report was handed to the
        background outbox (it is retried until it lands or the lease is over)."""
        if self.grant is None:
            raise RuntimeError("report: the reservation was not acquired")
        if self._state.settled:
            raise RuntimeError(f"report: reservation {self.reservation_id} already settled")
        if actual_input_tokens < 0 or actual_output_tokens < 0:
            raise ValueError("actual_input_tokens/actual_output_tokens: must be >= 0")
        self._state.settled = True
        await self._stop_keepalive()
        if self.grant.mode != "daemon":
            self._give_back(actual_input_tokens + actual_output_tokens)
            return None
        req = pb.ReportRequest(reservation_id=self.grant.reservation_id,
                               actual_input_tokens=actual_input_tokens,
                               actual_output_tokens=actual_output_tokens, outcome=outcome,
                               retry_after_ms=retry_after_ms, provider=provider_pb(provider))
        return await self._limiter._settle("Report", req, self.reservation_id,
                                           self.lease_expires_at_ms)

    async def report_error(self, err: ProviderError, *, fell_back: bool = False
                           ) -> pb.Settlement | None:
        """Report a failed attempt: RATE_LIMITED / OVERLOADED / ERROR with the provider's
        details, so the daemon can pause the others."""
        in_tok, out_tok = used_by_failure(err, self._state.usage, self._reserved())
        return await self.report(in_tok, out_tok, outcome=outcome_for(err),
                                 retry_after_ms=err.retry_after_ms or 0,
                                 provider=ProviderMeta.of(err, fell_back=fell_back))

    def _reserved(self) -> tuple[int, int]:
        return self.input_tokens, self.max_output_tokens

    async def release(self) -> pb.Settlement | None:
        """The provider call never happened: refund everything."""
        if self.grant is None:
            raise RuntimeError("release: the reservation was not acquired")
        if self._state.settled:
            raise RuntimeError(f"release: reservation {self.reservation_id} already settled")
        self._state.settled = True
        await self._stop_keepalive()
        if self.grant.mode != "daemon":
            self._give_back(0)
            return None
        return await self._limiter._settle(
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
