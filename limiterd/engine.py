"""The async shell around the pure ledger: callers waiting, timers, and group commit.

Every ledger call happens on the one event loop, synchronously, so a check-and-reserve can
never interleave with another. After each call the engine:
- answers the waiters the ledger says have ended (granted or timed out),
- re-arms one timer for the ledger's next wakeup (lease expiry, deadlines, refills),
- wakes the writer task, which group-commits everything changed since its last commit in one
  journal write. A request is answered only after the write holding its change returns.
"""

from __future__ import annotations

import asyncio
import heapq
import logging
import math
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass

from limiterd.clock import Clock, Timer
from limiterd.config.model import Config
from limiterd.ledger.buckets import RATE_DIMS
from limiterd.ledger.errors import AlreadySettled, QueueFull
from limiterd.ledger.ledger import LIMIT_FIELDS, Granted, Ledger, Rejected, Waiter, random_id
from limiterd.ledger.model import (
    AcquireRequest,
    BucketKey,
    Change,
    Outcome,
    ProviderLimits,
    Reservation,
)
from limiterd.storage.base import Journal, StorageError
from limiterd.streams import Streams
from limiterd.views import BucketView, Stats, lease_order, resolve_scope

log = logging.getLogger("limiterd.engine")

_NOTHING: frozenset[str] = frozenset()

# Backoff between journal write attempts while persistence is failing.
WRITE_RETRY_MIN_S = 0.05
WRITE_RETRY_MAX_S = 5.0


class PersistenceFailing(Exception):
    """New grants are refused while the journal cannot write (UNAVAILABLE)."""


class Superseded(Exception):
    """A newer Acquire with the same request_id took over this wait (ABORTED)."""


class ShuttingDown(Exception):
    """The daemon is stopping: a wait ends at once, to be retried elsewhere or after the
    restart (UNAVAILABLE with a retry-after)."""

    def __init__(self, retry_after_s: float) -> None:
        super().__init__("the daemon is shutting down; try again shortly")
        self.retry_after_s = retry_after_s


@dataclass(frozen=True, slots=True)
class WaitStatus:
    """Where a waiting caller stands (AcquireStream's Queued event)."""

    position: int
    estimated_wait_s: float
    queue_depth: int
    waited_s: float
    model_overloaded: bool


StatusCallback = Callable[[WaitStatus], Awaitable[None]]


ChangeListener = Callable[[Sequence[Change]], None]


class Engine:
    """The API layer and metrics call the methods below and read the views they return
    (limiterd.views); `ledger`, `clock` and `journal` are the engine's own parts, public
    only so tests can look inside."""

    def __init__(self, config: Config, journal: Journal, clock: Clock,
                 new_id: Callable[[], str] = random_id) -> None:
        self.clock = clock
        self.journal = journal
        self.ledger = Ledger(config, clock.now(), new_id)
        self._waiting: dict[Waiter, asyncio.Future[Granted | Rejected]] = {}
        self._timer: Timer | None = None
        self._timer_at = math.inf
        self._pending: list[asyncio.Future[bool]] = []
        self._retry_batch: list[Change] = []
        self._wake = asyncio.Event()
        self._writer: asyncio.Task[None] | None = None
        self._healthy = True
        self._write_backoff = WRITE_RETRY_MIN_S
        self._listeners: list[ChangeListener] = []
        self._stopping = False
        self._draining: ShuttingDown | None = None  # set: waits end at once with this
        self._detached: dict[Waiter, Timer] = {}  # lost streams keeping their place
        self._streams = Streams(self.ledger, clock)  # waiting AcquireStream callers

    # ---- lifecycle ---------------------------------------------------------------------------

    async def start(self) -> None:
        """Load what the journal kept, settle what lapsed while down, start the writer."""
        snapshot = await self.journal.open()
        now = self.clock.now()
        self.ledger.restore(snapshot, now)
        self.ledger.advance(now)
        await self.journal.write(self.ledger.take_changes())
        self._writer = asyncio.create_task(self._write_loop(), name="limiterd-writer")
        self._arm()

    async def stop(self) -> None:
        """Flush everything pending, then close the journal."""
        self._stopping = True
        self._streams.close()
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._writer is not None:
            self._wake.set()
            self._writer.cancel()
            try:
                await self._writer
            except asyncio.CancelledError:
                pass
        batch = self._retry_batch + self.ledger.take_changes()
        try:
            if batch:
                await self.journal.write(batch)
            self._retry_batch = []
        except StorageError as exc:
            log.error("could not write the last %d changes at shutdown: %s", len(batch), exc)
        for fut in self._pending:
            if not fut.done():
                fut.set_result(False)
        await self.journal.close()

    def end_waits(self, retry_after_s: float) -> int:
        """The daemon is stopping: every waiting caller hears ShuttingDown now, instead of
        being held through the grace and cut off; a wait that starts later ends the same
        way. Grants that need no wait still go through. Returns how many waits ended."""
        self._draining = ShuttingDown(retry_after_s)
        now = self.clock.now()
        ended = 0
        for w, fut in list(self._waiting.items()):
            if not fut.done() and w.result is None:
                self.ledger.cancel_wait(w, now)
                fut.set_exception(ShuttingDown(retry_after_s))
                del self._waiting[w]
                ended += 1
        for w, timer in list(self._detached.items()):
            timer.cancel()
            self.ledger.cancel_wait(w, now)
        self._detached.clear()
        self._after()
        return ended

    def add_listener(self, listener: ChangeListener) -> None:
        """Called with every batch of changes (metrics observe the ledger this way)."""
        self._listeners.append(listener)

    @property
    def _record(self) -> bool:
        """Whether the writer has anything to do with changes. In memory mode with nobody
        listening it has not, and waking it on every call would cost a task switch."""
        return self.journal.durable or bool(self._listeners)

    # ---- calls ---------------------------------------------------------------------------------

    async def acquire(
        self,
        req: AcquireRequest,
        max_wait_s: float,
        on_status: StatusCallback | None = None,
    ) -> Granted | Rejected:
        """Grant, or wait up to `max_wait_s`. Raises LedgerError (bad request),
        PersistenceFailing, Superseded.

        With `on_status` (AcquireStream), a waiting caller hears where it stands at once, at
        the configured interval and whenever its position or estimate changes; if it goes
        away with a request_id, it keeps its place for the re-attach grace.
        """
        self._refuse_while_failing()
        now = self.clock.now()
        result = self.ledger.acquire(req, now, now + max_wait_s)
        if isinstance(result, Waiter):
            if on_status is not None:
                self._check_streams(result, now)
            result = await self._wait(result, on_status)
        else:
            self._after()
        if isinstance(result, Rejected) or result.replayed:
            if isinstance(result, Granted):
                await self._commit()  # the original grant may still be in flight to disk
            return result
        try:
            durable = await self._commit()
        except asyncio.CancelledError:
            self._abandon(result)
            raise
        if not durable:
            self._release_quietly(result.reservation.id)
            raise PersistenceFailing("the journal is failing to write; the grant was undone")
        return result

    async def _wait(self, w: Waiter, on_status: StatusCallback | None) -> Granted | Rejected:
        if self._draining is not None:
            self.ledger.cancel_wait(w, self.clock.now())
            self._after()
            raise ShuttingDown(self._draining.retry_after_s)
        fut: asyncio.Future[Granted | Rejected] = asyncio.get_running_loop().create_future()
        previous = self._waiting.get(w)
        if previous is not None and not previous.done():
            previous.set_exception(Superseded("a newer Acquire with this request_id took over"))
        if (timer := self._detached.pop(w, None)) is not None:
            timer.cancel()  # a lost stream came back in time: it keeps its place
        self._waiting[w] = fut
        self._after()
        try:
            if on_status is not None:
                await self._report_status(w, fut, on_status)
            return await fut
        except asyncio.CancelledError:
            if fut.done() and not fut.cancelled():
                fut.exception()  # ended (shutdown, a newer Acquire) as the caller left: heard
            if self._waiting.get(w) is fut:
                del self._waiting[w]
                grace = self.ledger.config.settings.reattach_grace_s
                if w.result is None and on_status is not None and w.request.request_id:
                    self._detached[w] = self.clock.call_at(
                        self.clock.now() + grace, lambda: self._give_up(w)
                    )
                elif w.result is None:
                    self.ledger.cancel_wait(w, self.clock.now())
                    self._after()
                elif isinstance(w.result, Granted):
                    self._abandon(w.result)
            raise

    def _check_streams(self, w: Waiter, now: float) -> None:
        """Refuse a new waiting stream beyond daemon.max_streams (a re-attach keeps its
        place): each holds a stream open, so their number is capped in total."""
        cap = self.ledger.config.settings.max_streams
        if len(self._streams) < cap or w in self._detached or w in self._waiting:
            return
        retry_after = self.ledger.wait_status(w, now)[1]
        self.ledger.cancel_wait(w, now)
        self._after()
        raise QueueFull(len(self._streams), retry_after,
                        "as streams (daemon.max_streams); wait with Acquire instead")

    async def _report_status(
        self, w: Waiter, fut: asyncio.Future[Granted | Rejected], on_status: StatusCallback
    ) -> None:
        """Send WaitStatus until `fut` is done: at once, when there is news (limiterd.streams
        decides), and every interval as a keepalive."""
        interval = self.ledger.config.settings.stream_update_interval_s
        watch = self._streams.add(w)
        fut.add_done_callback(lambda _: watch.wake.set())
        try:
            while not fut.done():
                self._streams.refresh(watch)  # may find news for this very stream
                watch.wake.clear()
                now = self.clock.now()
                overloaded = self.ledger.overloaded_until(w.queue[0].budget, now) > 0
                await on_status(WaitStatus(watch.position, watch.estimate_at(now), watch.depth,
                                           now - w.enqueued_at, overloaded))
                watch.sent(now)
                if fut.done():
                    break
                timer = self.clock.call_at(now + interval, watch.wake.set)
                try:
                    await watch.wake.wait()
                finally:
                    timer.cancel()
        finally:
            self._streams.remove(watch)

    def _give_up(self, w: Waiter) -> None:
        """The re-attach grace of a lost stream ran out: its place is given up."""
        self._detached.pop(w, None)
        if w not in self._waiting and w.result is None:
            self.ledger.cancel_wait(w, self.clock.now())
            self._after()

    def _abandon(self, granted: Granted) -> None:
        """The caller left after its grant was made but before it could hear of it. Without a
        request_id it can never claim the grant, so give it back; with one, a retry will."""
        if not granted.reservation.request_id:
            self._release_quietly(granted.reservation.id)

    def _release_quietly(self, reservation_id: str) -> None:
        try:
            self.ledger.release(reservation_id, self.clock.now())
        except Exception:  # already settled by someone else: nothing to undo
            pass
        self._after()

    async def report(
        self,
        reservation_id: str,
        actual_input: int,
        actual_output: int,
        outcome: Outcome,
        retry_after_s: float,
        provider: ProviderLimits | None = None,
    ) -> tuple[Reservation, bool]:
        """Settle with actual usage. `provider`: what the provider said of the key's limits
        (from its response headers), to correct the ledger from. Raises PersistenceFailing
        when the settlement could not be made durable (see `_durably`)."""
        self._refuse_while_failing()
        now = self.clock.now()
        try:
            r, replayed = self.ledger.report(
                reservation_id, actual_input, actual_output, outcome, retry_after_s, now
            )
        except AlreadySettled:
            self._after()  # a refused Report may still have paused its budget: journal it
            await self._durably()
            raise
        if provider is not None and not replayed:
            for note in self.ledger.sync_from_provider(r.buckets[0], provider, now):
                log.info("provider sync: %s", note)
        self._after()
        await self._durably()
        return r, replayed

    async def release(self, reservation_id: str) -> tuple[Reservation, bool]:
        self._refuse_while_failing()
        r, replayed = self.ledger.release(reservation_id, self.clock.now())
        self._after()
        await self._durably()
        return r, replayed

    async def keep_alive(self, reservation_id: str, lease_s: float | None) -> Reservation:
        self._refuse_while_failing()
        r = self.ledger.keep_alive(reservation_id, lease_s, self.clock.now())
        self._after()
        await self._durably()
        return r

    async def mark_sent(self, reservation_id: str) -> None:
        """The caller is sending its provider request now (Ledger.mark_sent). Answered at
        once, not after the journal: a mark lost in a crash only means the hold ends at the
        restart, which it does anyway (a restart ends every hold)."""
        self.ledger.mark_sent(reservation_id, self.clock.now())
        self._after()

    # An answer is a promise that the change survives kill -9, so Report, Release and
    # KeepAlive are answered OK only once their change is on disk. They are idempotent and
    # clients retry UNAVAILABLE, so refusing them while the journal fails loses nothing.

    def _refuse_while_failing(self) -> None:
        """Fail fast rather than wait out the writer's backoff for a write that will fail."""
        if not self._healthy:
            raise PersistenceFailing("the journal is failing to write; try again shortly")

    async def _durably(self) -> None:
        """Wait for the change just made to be journaled. If that write fails, the change
        stays in memory and is journaled with the retried batch; the caller hears
        UNAVAILABLE and its retry is answered from the ledger as a replay."""
        if not await self._commit():
            raise PersistenceFailing("the journal is failing to write; try again shortly")

    def set_config(self, config: Config) -> None:
        self.ledger.set_config(config, self.clock.now())
        self._after()

    # ---- the read API: frozen views ------------------------------------------------------

    @property
    def config(self) -> Config:
        return self.ledger.config

    def describe(self) -> str:
        return f"local; journal {self.journal.describe()}"

    async def refresh(self) -> None:
        """The views are read from the ledger in this process: nothing to fetch."""

    def now(self) -> float:
        return self.clock.now()

    @property
    def healthy(self) -> bool:
        return self._healthy

    def stats(self) -> Stats:
        now = self.clock.now()
        ledger = self.ledger
        return Stats(
            ledger.open_count, ledger.waiting_count, self._healthy, ledger.active_pauses(now),
            tuple(sorted(ledger.overloaded_models(now).items())),
        )

    def overloaded_until(self, budget: str) -> float:
        """When the overload mark on a model budget lifts (0.0: not marked)."""
        return self.ledger.overloaded_until(budget, self.clock.now())

    def scopes(self, wanted: str) -> frozenset[str] | None:
        """The scope hashes an operator means by `wanted` (a hash, an alias or a unique
        prefix; None: every scope). Raises AmbiguousScope."""
        if not wanted:
            return None
        known = {k.scope for k in self.ledger.bucket_keys()}
        known.update(r.scope for r in self.ledger.open_reservations())
        aliases = {s: c.alias for s, c in self.config.scopes.items()}
        known.update(aliases)
        return resolve_scope(wanted, known, aliases)

    def buckets(
        self,
        scopes: frozenset[str] | None = None,
        model: str = "",
        after: BucketKey | None = None,
        limit: int | None = None,
    ) -> list[BucketView]:
        """Buckets in key order, after `after`, at most `limit`. Only the keys are scanned
        in full; views are built for the page alone, so a page of 40,000 buckets costs
        little more than a page of 100."""
        keys: Iterable[BucketKey] = (
            k for k in self.ledger.bucket_keys()
            if (scopes is None or k.scope in scopes) and (not model or self._spends(k, model))
            and (after is None or k > after)
        )
        page = sorted(keys) if limit is None else heapq.nsmallest(limit, keys)
        now = self.clock.now()
        return [self._bucket_view(k, now) for k in page]

    async def reset_buckets(
        self, scopes: frozenset[str] | None, model: str, user: str = ""
    ) -> list[BucketView]:
        """Refill the matching buckets to full, forgiving their debt (an operator's reset).
        Answers once the reset is journaled; PersistenceFailing when it could not be."""
        keys = sorted(
            k for k in self.ledger.bucket_keys()
            if (scopes is None or k.scope in scopes) and self._spends(k, model)
            and k.user == user
        )
        now = self.clock.now()
        for k in keys:
            self.ledger.reset_bucket(k, now)
        self._after()
        if keys and not await self._commit():
            raise PersistenceFailing("the journal is failing to write; the reset is kept in "
                                     "memory and written when it recovers")
        return [self._bucket_view(k, now) for k in keys]

    def _spends(self, key: BucketKey, model: str) -> bool:
        """A filter names a budget, or a model id that draws on it."""
        if key.budget == model:
            return True
        budget = self.config.budget_for(key.scope, model, bool(key.user))
        return budget is not None and budget.name == key.budget

    def _bucket_view(self, key: BucketKey, now: float) -> BucketView:
        ledger = self.ledger
        b = ledger.bucket(key, now)
        lv = b.levels
        return BucketView(
            key, (lv[0], lv[1], lv[2]), b.caps, b.limits.max_concurrent, b.in_flight,
            ledger.queue_depth(b), b.in_flight,
            0.0 if key.user else ledger.paused_until(key.scope, key.budget, now),
            ledger.overloaded_until(key.budget, now), self._learned_rates(key),
        )

    def _learned_rates(self, key: BucketKey) -> frozenset[str]:
        learned = self.ledger.learned_fields(key)
        if not learned:
            return _NOTHING
        return frozenset(n for n, f in zip(RATE_DIMS, LIMIT_FIELDS, strict=True) if f in learned)

    def leases(
        self,
        scopes: frozenset[str] | None = None,
        model: str = "",
        after: tuple[float, str] | None = None,
        limit: int | None = None,
    ) -> list[Reservation]:
        """Open reservations, soonest expiry first (lease_order), after `after`."""
        found = (
            r for r in self.ledger.open_reservations()
            if (scopes is None or r.scope in scopes) and (not model or r.model == model)
            and (after is None or lease_order(r) > after)
        )
        if limit is None:
            return sorted(found, key=lease_order)
        return heapq.nsmallest(limit, found, key=lease_order)

    # ---- the loop's bookkeeping -------------------------------------------------------------

    def _after(self) -> None:
        """After every ledger call: answer ended waiters, re-arm the timer, wake the writer."""
        ended = self.ledger.take_ended()
        for w in ended:
            fut = self._waiting.pop(w, None)
            if fut is not None and not fut.done():
                assert w.result is not None
                fut.set_result(w.result)
        moved = self.ledger.take_moved()  # always taken: it must not pile up
        if moved and len(self._streams):
            self._streams.moved(moved)
        self._arm()
        if self._record:
            self._wake.set()
        else:
            self.ledger.discard_changes()

    def _arm(self) -> None:
        if self._stopping:
            return
        at = self.ledger.next_wakeup()
        if at is None or at >= self._timer_at:
            return
        if self._timer is not None:
            self._timer.cancel()
        self._timer_at = at
        self._timer = self.clock.call_at(at, self._on_timer)

    def _on_timer(self) -> None:
        self._timer, self._timer_at = None, math.inf
        self.ledger.advance(self.clock.now())
        self._after()

    async def flush(self) -> bool:
        """Wait until every change made so far is journaled (tests step a fake clock, then
        wait on this, not on time). False: the write failed and will be retried."""
        return await self._commit()

    async def _commit(self) -> bool:
        """Wait until the changes made so far are durable. False: the write failed."""
        if not self.journal.durable or self._writer is None:
            return True
        fut: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        self._pending.append(fut)
        self._wake.set()
        return await fut

    async def _write_loop(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            batch = self._retry_batch + self.ledger.take_changes()
            waiting, self._pending = self._pending, []
            ok = True
            if batch:
                try:
                    await self.journal.write(batch)
                except StorageError as exc:
                    ok = False
                    self._write_failed(batch, exc)
                else:
                    self._write_ok()
                    for listener in self._listeners:
                        listener(batch)
            for fut in waiting:
                if not fut.done():
                    fut.set_result(ok)

    def _write_failed(self, batch: list[Change], exc: StorageError) -> None:
        if self._healthy:
            log.error("persistence is failing, refusing new grants until it recovers: %s", exc)
        self._healthy = False
        self._retry_batch = batch
        delay, self._write_backoff = (
            self._write_backoff,
            min(WRITE_RETRY_MAX_S, self._write_backoff * 2),
        )
        self.clock.call_at(self.clock.now() + delay, self._wake.set)

    def _write_ok(self) -> None:
        if not self._healthy:
            log.warning("persistence recovered; %s", self.journal.describe())
        self._healthy = True
        self._retry_batch = []
        self._write_backoff = WRITE_RETRY_MIN_S
