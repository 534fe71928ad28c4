"""The ledger: buckets, reservations, leases and FIFO wait queues, as a pure state machine.

Every method takes `now` from the caller and does no I/O; the async engine drives it on one
event loop, so check-and-reserve is atomic without locks. Two outboxes tell the outside what
happened, and are the only way it learns:
- take_changes(): the Change values a journal must record (group-committed by the engine);
- take_ended(): waiters whose wait ended (granted or timed out), for the engine to answer.

Buckets are keyed by budget, not by the caller's model string: every model a config rule
matches draws on the rule's one budget (config.model.Budget), as the provider counts a model
class's limit across its versions and aliases.

Waiting: each bucket set (scope x budget, plus scope x budget x user where user limits apply)
has a FIFO queue. A newcomer is granted at once only when no queue touching its buckets has
anyone waiting; otherwise it joins its queue and the queues are drained oldest-first. A waiter
that cannot be granted claims the buckets it lacks, so nobody younger takes them first, but
it does not block buckets it does not lack (one exhausted user never stalls the others).
"""

from __future__ import annotations

import heapq
import os
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, replace

from limiterd.config.model import Config, Limits
from limiterd.ledger.buckets import RATE_DIMS, Bucket, amounts_tuple
from limiterd.ledger.errors import AlreadySettled, InvalidRequest, NeverFits, NotFound, QueueFull
from limiterd.ledger.model import (
    AcquireRequest,
    Amounts,
    BucketDropped,
    BucketKey,
    Change,
    LeaseExtended,
    Outcome,
    PauseSet,
    ProviderLimits,
    Reservation,
    ReservationOpened,
    ReservationSettled,
    Settlement,
    SettlementsForgotten,
    Snapshot,
    State,
)
from limiterd.ledger.overload import OverloadMarks
from limiterd.ledger.refunds import Refunds, Schedule
from limiterd.ledger.refunds import seconds_until as expected_wait

QueueKey = tuple[BucketKey, ...]
GLOB_CHARS = frozenset("*?[]")
LIMIT_FIELDS = ("requests_per_minute", "input_tokens_per_minute", "output_tokens_per_minute")

# When only a concurrency slot is missing, nothing refills by itself: the wait ends when a
# reservation settles. This is the retry-after we tell callers in that case.
CONCURRENCY_RETRY_S = 1.0
# How many buckets one idle sweep step looks at, so a sweep never stalls the loop.
SWEEP_CHUNK = 2000
# The soonest a blocked waiter is looked at again (see _plan_retry).
MIN_RETRY_S = 0.001
# Stale heap entries tolerated before the heaps are rebuilt (see _compact_heaps).
COMPACT_SLACK = 4096


@dataclass(frozen=True, slots=True)
class Granted:
    reservation: Reservation
    replayed: bool = False
    # The caller promised to mark when it sends, and this grant took from a bucket whose
    # refill is held until such a mark: it should call MarkSent just before it sends.
    mark_sent: bool = False


@dataclass(frozen=True, slots=True)
class Rejected:
    """Not granted in time. `retry_after_s`: the estimated time until it could be."""

    retry_after_s: float


@dataclass(slots=True, eq=False)
class Waiter:
    """A caller in a queue. Mutable handle shared with the engine; `result` is set once."""

    seq: int
    request: AcquireRequest
    queue: QueueKey
    amounts: tuple[int, int, int]
    enqueued_at: float
    deadline: float
    result: Granted | Rejected | None = None
    probing: bool = False  # a try-once being evaluated right now: its deadline is `now`


def random_id() -> str:
    """A reservation id: 32 lowercase hex characters, unguessable (the API checks the form)."""
    return os.urandom(16).hex()


class Ledger:
    def __init__(
        self, config: Config, now: float, new_id: Callable[[], str] = random_id
    ) -> None:
        """`new_id` makes reservation ids (injected, like time: tests may count instead)."""
        self._config = config
        self._new_id = new_id
        self._buckets: dict[BucketKey, Bucket] = {}
        self._open: dict[str, Reservation] = {}
        self._settled: dict[str, Reservation] = {}
        self._settled_order: deque[tuple[float, str]] = deque()
        self._by_request: dict[tuple[str, str], Reservation | Waiter] = {}
        self._queues: dict[QueueKey, deque[Waiter]] = {}
        self._pauses: dict[tuple[str, str], float] = {}  # (scope, budget) -> until
        self._leases: list[tuple[float, str]] = []  # (expires_at, id), lazily pruned
        self._deadlines: list[tuple[float, int, Waiter]] = []  # lazily pruned
        self._retries: list[tuple[float, QueueKey]] = []  # when a blocked head may fit
        self._retry_at: dict[QueueKey, float] = {}
        self._heap_limit = COMPACT_SLACK
        self._seq = 0
        self._changes: list[Change] = []
        self._dirty: set[BucketKey] = set()
        self._ended: list[Waiter] = []
        self._next_sweep = now + config.settings.idle_sweep_interval_s
        self._sweep_keys: list[BucketKey] = []
        self._overloads = OverloadMarks()
        self._refunds = Refunds()  # what calls in flight are expected to give back
        self._learned: dict[BucketKey, Limits] = {}  # capacities learned from the provider
        self._waiting = 0  # waiters on every queue
        # Buckets whose waiters' positions or estimates may have changed (a waiter left, a
        # level rose), for the engine to tell the streams watching them: take_moved().
        self._moved: set[BucketKey] = set()
        # Open reservations granted during a hold, whose mark may end it: id -> ((bucket,
        # holder), ...). In memory only: a restart ends every hold (buckets.py).
        self._markable: dict[str, tuple[tuple[BucketKey, str], ...]] = {}

    # ---- outboxes -------------------------------------------------------------------------

    def take_changes(self) -> list[Change]:
        """What changed since the last call, for the journal; bucket levels deduplicated."""
        changes = self._changes
        if self._dirty:
            for key in self._dirty:
                b = self._buckets.get(key)
                if b is not None:
                    changes.append(b.snapshot())
            self._dirty = set()
        self._changes = []
        return changes

    def discard_changes(self) -> None:
        """Nobody records them (in-memory mode): drop them without building snapshots."""
        self._changes.clear()
        self._dirty.clear()

    def take_moved(self) -> set[QueueKey]:
        """Queues whose waiters may stand elsewhere since the last call: someone left, or
        a level they wait on rose. A newcomer at the tail moves nobody."""
        moved: set[QueueKey] = set()
        for key in self._moved:
            b = self._buckets.get(key)
            if b is not None:
                moved |= b.queues
        self._moved.clear()
        return moved

    def take_ended(self) -> list[Waiter]:
        ended, self._ended = self._ended, []
        return ended

    @property
    def config(self) -> Config:
        return self._config

    # ---- acquire ----------------------------------------------------------------------------

    def acquire(
        self, req: AcquireRequest, now: float, deadline: float
    ) -> Granted | Waiter | Rejected:
        """Grant now, queue until `deadline`, or reject. Raises LedgerError for bad requests.

        A repeated request_id returns the original grant (Granted.replayed) or the same
        Waiter, whose deadline becomes the new caller's: the engine moves the wait to it. A
        repeat that will not wait is answered at once, and the waiter ends with that answer.
        """
        rid_key = (req.scope, req.request_id) if req.request_id else None
        if rid_key is not None and (prior := self._by_request.get(rid_key)) is not None:
            return self._repeat(prior, req, now, deadline)

        keys, limits = self._plan(req)
        amounts = (1, req.input_tokens, req.max_output_tokens)
        buckets = [self._bucket(k, lim, now) for k, lim in zip(keys, limits, strict=True)]
        for b in buckets:
            if (over := b.exceeds_capacity(amounts)) is not None:
                name, cap = over
                raise NeverFits(b.key, name, cap, amounts[RATE_DIMS.index(name)])
        paused = self._paused_until(req.scope, keys[0].budget, now)
        free = not paused and not any(b.queues for b in buckets)
        if free and all(b.fits(amounts) for b in buckets):
            return self._grant(req, keys, buckets, amounts, now, now)

        queue = self._queues.get(keys)
        s = self._config.settings
        if queue is not None and len(queue) >= s.max_waiters_per_queue:
            raise QueueFull(len(queue), self._estimate(None, keys, amounts, now),
                            "for this scope and model (daemon.max_waiters_per_queue)")
        if self._waiting >= s.max_waiters:
            raise QueueFull(self._waiting, self._estimate(None, keys, amounts, now),
                            "in total (daemon.max_waiters)")
        self._seq += 1
        w = Waiter(self._seq, req, keys, amounts, now, deadline)
        self._enqueue(w)
        if rid_key is not None:
            self._by_request[rid_key] = w
        if deadline <= now:
            result = self._try_now(w, now)
            self._ended.remove(w)  # answered here, not through take_ended()
            return result
        self._drain(buckets, now)
        if isinstance(w.result, Granted):
            self._ended.remove(w)
            return w.result
        return w

    def _try_now(self, w: Waiter, now: float) -> Granted | Rejected:
        """A waiter whose caller will not wait (deadline <= now): granted if it is first in
        line and fits, else it leaves the queue at once, rejected."""
        w.probing = True
        self._drain([self._buckets[k] for k in w.queue], now)
        w.probing = False
        if w.result is None:
            self._end(w, Rejected(self._estimate(w, w.queue, w.amounts, now)), now)
        assert w.result is not None
        return w.result

    def _repeat(
        self, prior: Reservation | Waiter, req: AcquireRequest, now: float, deadline: float
    ) -> Granted | Waiter | Rejected:
        if isinstance(prior, Waiter):
            if prior.request != replace(req, lease_s=prior.request.lease_s,
                                        marks_sent=prior.request.marks_sent):
                raise InvalidRequest("request_id", "already used for a different request")
            prior.deadline = deadline
            heapq.heappush(self._deadlines, (deadline, prior.seq, prior))
            if deadline <= now:
                # The caller taking over will not wait: answer it now, like any try-once. The
                # waiter stays in take_ended(), so an earlier caller still attached hears the
                # same answer (a waiter is never left in a queue past its deadline).
                return self._try_now(prior, now)
            return prior
        if not prior.same_request(req):
            raise InvalidRequest("request_id", "already used for a different request")
        return Granted(prior, replayed=True, mark_sent=prior.id in self._markable)

    def cancel_wait(self, w: Waiter, now: float) -> None:
        """The caller went away: leave the queue at once, holding nothing."""
        if w.result is not None:
            return
        self._end(w, Rejected(0.0), now)
        self._ended.remove(w)

    # ---- settle ------------------------------------------------------------------------------

    def report(
        self,
        reservation_id: str,
        actual_input: int,
        actual_output: int,
        outcome: Outcome,
        retry_after_s: float,
        now: float,
    ) -> tuple[Reservation, bool]:
        """Settle with actual usage: refund what was not used, charge an overrun as debt.

        Returns (the settled reservation, replayed). A 429 (RATE_LIMITED) with a retry-after
        pauses every grant on its scope x budget until then.
        """
        r = self._open.get(reservation_id)
        if r is None:
            return self._report_again(reservation_id, (actual_input, actual_output, outcome),
                                      retry_after_s, now), True
        d_in = r.reserved.input_tokens - actual_input
        d_out = r.reserved.output_tokens - actual_output
        settlement = Settlement(
            State.REPORTED,
            now,
            refunded=Amounts(0, max(0, d_in), max(0, d_out)),
            overrun=Amounts(0, max(0, -d_in), max(0, -d_out)),
            outcome=outcome,
        )
        for key in r.buckets:
            self._refunds.reported(key, amounts_tuple(r.reserved),
                                   (1, actual_input, actual_output), now - r.granted_at)
        if outcome is Outcome.RATE_LIMITED and retry_after_s > 0:
            self._pause(r.scope, r.buckets[0].budget, now + retry_after_s)
        elif outcome is Outcome.OVERLOADED:
            self._overloads.note(r.buckets[0].budget, now, self._config.settings)
        return self._settle(r, settlement, (0.0, float(d_in), float(d_out)), now), False

    def release(self, reservation_id: str, now: float) -> tuple[Reservation, bool]:
        """The provider call never happened: refund everything."""
        r = self._open.get(reservation_id)
        if r is None:
            return self._settled_again(reservation_id, State.RELEASED, "release"), True
        settlement = Settlement(State.RELEASED, now, refunded=r.reserved)
        refund = tuple(float(x) for x in amounts_tuple(r.reserved))
        return self._settle(r, settlement, refund, now), False  # type: ignore[arg-type]

    def mark_sent(self, reservation_id: str, now: float) -> None:
        """The caller is sending the provider request now. The first mark from a reservation
        granted during a hold ends it: the held dimensions refill again, charged one
        allowance (the way to the provider, whose refill starts when the request arrives). A
        mark on a bucket whose hold already ended, again, or after the reservation settled
        changes nothing."""
        if reservation_id not in self._open:
            if reservation_id in self._settled:
                return
            raise NotFound(reservation_id)
        marks = self._markable.pop(reservation_id, ())
        ended = []
        for key, holder in marks:
            b = self._buckets.get(key)
            if b is not None and b.hold is not None and b.hold.holder == holder:
                b.refill(now)
                b.end_hold(charge=True)
                self._dirty.add(key)
                self._moved.add(key)
                ended.append(b)
        self._drain(ended, now)  # waiters' retries move to the new refill time

    def keep_alive(self, reservation_id: str, lease_s: float | None, now: float) -> Reservation:
        r = self._open.get(reservation_id)
        if r is None:
            raise self._not_open(reservation_id, "keep alive")
        lease = lease_s if lease_s is not None else self._config.settings.default_lease_s
        r = replace(r, expires_at=now + lease)
        self._open[r.id] = r
        self._index_request(r)
        heapq.heappush(self._leases, (r.expires_at, r.id))
        self._changes.append(LeaseExtended(r.id, r.expires_at))
        return r

    def reset_bucket(self, key: BucketKey, now: float) -> bool:
        """An operator forgives a bucket: full again, debt gone (journaled as its levels);
        waiters move up. False: no such bucket is kept (an idle one is full anyway)."""
        b = self._buckets.get(key)
        if b is None:
            return False
        b.reset(now)
        self._dirty.add(key)
        self._moved.add(key)
        self._drain([b], now)
        return True

    def _report_again(
        self,
        reservation_id: str,
        usage: tuple[int, int, Outcome],
        retry_after_s: float,
        now: float,
    ) -> Reservation:
        """A Report for a settled reservation. The same Report again gets the first answer;
        a different one is refused (AlreadySettled) but a provider pause it carries is
        applied all the same, since the 429 happened whatever the numbers. The pause is a
        change to journal even though an error is raised."""
        r = self._settled.get(reservation_id)
        if r is None:
            raise NotFound(reservation_id)
        if r.state is State.REPORTED and r.reported() == usage:
            return r
        note = ""
        if usage[2] is Outcome.RATE_LIMITED and retry_after_s > 0:
            self._pause(r.scope, r.buckets[0].budget, now + retry_after_s)
            note = f"its {retry_after_s:g} s provider pause is applied"
        if r.state is not State.REPORTED:
            raise AlreadySettled(r, "report", note)
        i, o, outcome = r.reported()
        assert outcome is not None
        differs = (f"it was reported as {i} input and {o} output tokens, {outcome.name}, "
                   "and this Report differs")
        raise AlreadySettled(r, "report", differs + (f"; {note}" if note else ""))

    def _settled_again(self, reservation_id: str, state: State, verb: str) -> Reservation:
        r = self._settled.get(reservation_id)
        if r is None:
            raise NotFound(reservation_id)
        if r.state is not state:
            raise AlreadySettled(r, verb)
        return r

    def _not_open(self, reservation_id: str, verb: str) -> Exception:
        r = self._settled.get(reservation_id)
        return AlreadySettled(r, verb) if r is not None else NotFound(reservation_id)

    def _settle(
        self,
        r: Reservation,
        settlement: Settlement,
        give: tuple[float, float, float],
        now: float,
    ) -> Reservation:
        del self._open[r.id]
        settled = r.settled(settlement)
        self._remember(settled)
        self._changes.append(ReservationSettled(r.id, settlement))
        if len(self._leases) + len(self._deadlines) > self._heap_limit:
            self._compact_heaps()
        self._markable.pop(r.id, None)
        touched = []
        for key in r.buckets:
            b = self._buckets.get(key)
            if b is None:  # only after a config change removed its limits
                continue
            b.refill(now)
            if b.hold is not None and b.hold.holder == r.id:
                b.end_hold(charge=False)  # no mark came: the call is over or never went out
            b.give(give)
            b.in_flight -= 1
            self._dirty.add(key)
            if b.queues:
                self._moved.add(key)
            touched.append(b)
        self._drain(touched, now)
        return settled

    def _compact_heaps(self) -> None:
        """Settled reservations and ended waiters leave stale heap entries behind (they are
        skipped when they come due). Under sustained load they would pile up for a whole
        lease; rebuild the heaps when most of an entry set is stale."""
        self._leases = [(r.expires_at, r.id) for r in self._open.values()]
        heapq.heapify(self._leases)
        self._deadlines = [e for e in self._deadlines if e[2].result is None]
        heapq.heapify(self._deadlines)
        self._heap_limit = 2 * (len(self._leases) + len(self._deadlines)) + COMPACT_SLACK

    def _remember(self, settled: Reservation) -> None:
        assert settled.settlement is not None
        self._settled[settled.id] = settled
        self._settled_order.append((settled.settlement.settled_at, settled.id))
        self._index_request(settled)

    def _index_request(self, r: Reservation) -> None:
        if r.request_id:
            self._by_request[(r.scope, r.request_id)] = r

    # ---- time ---------------------------------------------------------------------------------

    def advance(self, now: float) -> None:
        """Do what is due by `now`: time out waiters, expire leases, wake waiters whose
        buckets refilled, forget old settlements, drop idle buckets."""
        touched: dict[BucketKey, Bucket] = {}
        while self._deadlines and self._deadlines[0][0] <= now:
            deadline, _, w = heapq.heappop(self._deadlines)
            if w.result is None and w.deadline == deadline:
                self._end(w, Rejected(self._estimate(w, w.queue, w.amounts, now)), now)
        while self._leases and self._leases[0][0] <= now:
            expires_at, rid = heapq.heappop(self._leases)
            r = self._open.get(rid)
            if r is not None and r.expires_at == expires_at:
                # Orphaned: the provider most likely did the work, so nothing is refunded.
                self._settle(r, Settlement(State.EXPIRED, now), (0.0, 0.0, 0.0), now)
        while self._retries and self._retries[0][0] <= now:
            at, qkey = heapq.heappop(self._retries)
            if self._retry_at.get(qkey) == at:
                del self._retry_at[qkey]
                for k in qkey:
                    if (b := self._buckets.get(k)) is not None:
                        touched[k] = b
        if touched:
            self._drain(touched.values(), now)
        self._forget_settled(now)
        if now >= self._next_sweep:
            self._sweep_idle(now)

    def next_wakeup(self) -> float | None:
        """The earliest time advance() has something to do (may be early, never late)."""
        times = [h[0][0] for h in (self._deadlines, self._leases, self._retries) if h]
        if self._settled_order:
            times.append(self._settled_order[0][0] + self._config.settings.settlement_retention_s)
        if self._buckets:
            times.append(self._next_sweep)
        return min(times) if times else None

    def _forget_settled(self, now: float) -> None:
        s = self._config.settings
        horizon = now - s.settlement_retention_s
        order, forgotten = self._settled_order, []
        last = 0.0
        while order and (order[0][0] <= horizon or len(self._settled) > s.max_settlements):
            last, rid = order.popleft()
            r = self._settled.pop(rid, None)
            if r is None:
                continue
            forgotten.append(rid)
            if r.request_id and self._by_request.get((r.scope, r.request_id)) is r:
                del self._by_request[(r.scope, r.request_id)]
        if forgotten:
            self._changes.append(SettlementsForgotten(last, tuple(forgotten)))

    def _sweep_idle(self, now: float) -> None:
        """Drop buckets that are full and idle: they carry no information. In chunks."""
        if not self._sweep_keys:
            self._sweep_keys = list(self._buckets)
        chunk, self._sweep_keys = self._sweep_keys[:SWEEP_CHUNK], self._sweep_keys[SWEEP_CHUNK:]
        for key in chunk:
            b = self._buckets.get(key)
            if b is None:
                continue
            b.refill(now)
            if b.is_idle_full():
                del self._buckets[key]
                self._refunds.forget(key)
                self._dirty.discard(key)
                self._changes.append(BucketDropped(key))
        for pause_key, until in list(self._pauses.items()):
            if until <= now:
                del self._pauses[pause_key]
        if not self._sweep_keys:
            self._next_sweep = now + self._config.settings.idle_sweep_interval_s

    # ---- queues ---------------------------------------------------------------------------------

    def _enqueue(self, w: Waiter) -> None:
        q = self._queues.get(w.queue)
        if q is None:
            q = self._queues[w.queue] = deque()
            for k in w.queue:
                self._buckets[k].queues.add(w.queue)
        q.append(w)
        self._count(w, 1)
        heapq.heappush(self._deadlines, (w.deadline, w.seq, w))
        if len(self._leases) + len(self._deadlines) > self._heap_limit:
            self._compact_heaps()

    def _end(
        self, w: Waiter, result: Granted | Rejected, now: float, redrain: bool = True
    ) -> None:
        """Take `w` out of its queue with its result; let the others move up (unless the
        caller is _drain itself, which moves on to the next head anyway)."""
        q = self._queues[w.queue]
        was_head = q[0] is w
        if was_head:
            q.popleft()
        else:
            q.remove(w)
        self._count(w, -1)
        if not q:
            del self._queues[w.queue]
            self._retry_at.pop(w.queue, None)
            for k in w.queue:
                if (b := self._buckets.get(k)) is not None:
                    b.queues.discard(w.queue)
        w.result = result
        self._ended.append(w)
        req = w.request
        if req.request_id and isinstance(result, Rejected):
            if self._by_request.get((req.scope, req.request_id)) is w:
                del self._by_request[(req.scope, req.request_id)]
        if redrain and isinstance(result, Rejected) and was_head:
            self._drain([self._buckets[k] for k in w.queue if k in self._buckets], now)

    def _drain(self, buckets: Iterable[Bucket], now: float) -> None:
        """Grant waiters on queues touching `buckets`, oldest first, while they fit."""
        qkeys: set[QueueKey] = set()
        for b in buckets:
            qkeys |= b.queues
        if not qkeys:
            return
        heads = [(self._queues[qk][0].seq, qk) for qk in qkeys]
        heapq.heapify(heads)
        claimed: set[BucketKey] = set()  # owed to an older waiter that does not fit yet
        while heads:
            seq, qk = heapq.heappop(heads)
            q = self._queues.get(qk)
            if not q or q[0].seq != seq:
                continue
            w = q[0]
            if w.deadline <= now and not w.probing:
                # Past its deadline (a timer may not have fired yet): never grant late.
                self._end(w, Rejected(self._estimate(w, qk, w.amounts, now)), now, redrain=False)
            elif not claimed.isdisjoint(qk):
                continue
            else:
                bs = [self._buckets[k] for k in qk]
                for b in bs:
                    b.refill(now)
                paused = self._paused_until(qk[0].scope, qk[0].budget, now)
                lacking = [b.key for b in bs if not b.fits(w.amounts)]
                if paused or lacking:
                    claimed.update(lacking or qk[:1])
                    self._plan_retry(w, bs, paused, now)
                    continue
                q.popleft()
                self._count(w, -1)
                self._retry_at.pop(qk, None)
                w.result = self._grant(w.request, qk, bs, w.amounts, now, w.enqueued_at)
                self._ended.append(w)
                if not q:
                    del self._queues[qk]
                    for b in bs:
                        b.queues.discard(qk)
            q = self._queues.get(qk)
            if q:
                heapq.heappush(heads, (q[0].seq, qk))

    def _count(self, w: Waiter, sign: int) -> None:
        """`w` joined (1) or left (-1) its queue: keep the totals the estimates read."""
        self._waiting += sign
        a = w.amounts
        for k in w.queue:
            b = self._buckets.get(k)
            if b is not None:
                q = b.queued
                q[0] += sign * a[0]
                q[1] += sign * a[1]
                q[2] += sign * a[2]
                if sign < 0:
                    self._moved.add(k)

    def _plan_retry(self, w: Waiter, bs: list[Bucket], paused_until: float, now: float) -> None:
        wait = max(b.seconds_until(w.amounts, now) for b in bs)
        if wait <= 0 and paused_until <= now:
            return  # only a concurrency slot is missing: a settlement will wake it
        # At unix-time magnitudes a float second has ~1e-7 s of resolution: a timer can fire a
        # hair early and find the bucket a sliver short. Never plan a retry for "now".
        at = max(now + max(wait, MIN_RETRY_S), paused_until)
        current = self._retry_at.get(w.queue)
        if current is None or at < current or current <= now:
            self._retry_at[w.queue] = at
            heapq.heappush(self._retries, (at, w.queue))

    def _estimate(
        self, w: Waiter | None, keys: QueueKey, amounts: tuple[int, int, int], now: float
    ) -> float:
        """Seconds until this request could be granted: refill for the demand queued ahead of
        it (and its own), or the end of a pause; a bare concurrency wait gets a short retry.
        `w` None: a newcomer not queued yet. A caller last in line (the usual case: it just
        came) is answered from the buckets' totals, without walking the queues."""
        tail = w is None or self._is_last(w)
        worst = 0.0
        for k in keys:
            b = self._buckets.get(k)
            if b is None:
                continue
            b.refill(now)
            if tail:
                own = amounts if w is None else (0, 0, 0)
                demand = [float(b.queued[i] + own[i]) for i in range(3)]
                ahead = self._depth(b.queues) - (w is not None)
            else:
                assert w is not None
                demand, ahead = list(map(float, amounts)), 0
                for other in _by_seq([self._queues[qk] for qk in b.queues]):
                    if other.seq >= w.seq:
                        break
                    ahead += 1
                    for i in range(3):
                        demand[i] += other.amounts[i]
            worst = max(worst, self._eta(b, demand, ahead, self._schedule(b, now), now,
                                         amounts))
        return max(worst, self._pause_wait(keys, now))

    def _eta(self, b: Bucket, demand: list[float], ahead: int, schedule: Schedule,
             now: float, own: tuple[int, int, int]) -> float:
        """Seconds until `demand` (what waits ahead on `b`, plus the caller's own) fits `b`:
        by refill, and by the refunds expected from calls in flight (`schedule`). Those
        ahead are counted at what they are expected to use, not what they reserve: they
        too give back the rest at their Report."""
        if schedule:
            used = self._refunds.used_share(b.key)
            cost = [own[i] + used[i] * (demand[i] - own[i]) for i in range(3)]
            # A held refill, or a refill time in the future (buckets.py).
            wait = b.refill_delay(now) + expected_wait(b.levels, b.caps, cost, schedule, now)
        else:
            wait = b.seconds_until((demand[0], demand[1], demand[2]), now)
        mc = b.limits.max_concurrent
        if mc is not None and b.in_flight + ahead >= mc:
            wait = max(wait, CONCURRENCY_RETRY_S)
        return wait

    def _pause_wait(self, keys: QueueKey, now: float) -> float:
        paused = self._paused_until(keys[0].scope, keys[0].budget, now)
        return paused - now if paused else 0.0

    def _related(self, qk: QueueKey) -> set[QueueKey]:
        """The queues that share a bucket with `qk` (itself included)."""
        related: set[QueueKey] = set()
        for k in qk:
            if (b := self._buckets.get(k)) is not None:
                related |= b.queues
        return related

    def _depth(self, queues: Iterable[QueueKey]) -> int:
        return sum(len(self._queues[qk]) for qk in queues)

    def _is_last(self, w: Waiter) -> bool:
        """Nobody waiting on any of w's buckets came after it."""
        return all(self._queues[qk][-1].seq <= w.seq for qk in self._related(w.queue))

    # ---- grants and buckets ----------------------------------------------------------------

    def _grant(
        self,
        req: AcquireRequest,
        keys: QueueKey,
        buckets: list[Bucket],
        amounts: tuple[int, int, int],
        now: float,
        since: float,
    ) -> Granted:
        allowance = self._config.settings.refill_allowance_s
        rid = self._new_id()
        holder = rid if req.marks_sent else ""
        marks = []
        for b in buckets:
            b.take(amounts, now, allowance, holder)
            self._dirty.add(b.key)
            if holder and b.hold is not None:
                marks.append((b.key, b.hold.holder))
        if marks:
            self._markable[rid] = tuple(marks)
        lease = req.lease_s if req.lease_s is not None else self._config.settings.default_lease_s
        r = Reservation(
            id=rid,
            scope=req.scope,
            model=req.model,
            user=req.user,
            request_id=req.request_id,
            reserved=Amounts(*amounts),
            buckets=keys,
            granted_at=now,
            expires_at=now + lease,
            waited_s=now - since,
        )
        self._open[r.id] = r
        self._index_request(r)
        heapq.heappush(self._leases, (r.expires_at, r.id))
        self._changes.append(ReservationOpened(r))
        for key in keys:
            self._refunds.granted(key, r.id, now, amounts)
        return Granted(r, mark_sent=bool(marks))

    def _plan(self, req: AcquireRequest) -> tuple[QueueKey, tuple[Limits, ...]]:
        """The buckets a request draws on: its model's budget, and its user's under it."""
        check_model_name(req.model)
        budget = self._config.budget_for(req.scope, req.model)
        if budget is None:
            raise InvalidRequest(
                "model", f"no limits are configured for model {req.model!r} (and no default)"
            )
        key = BucketKey(req.scope, budget.name)
        limits = self._with_learned(key, budget.limits) if self._learned else budget.limits
        if req.user:
            per_user = self._config.budget_for(req.scope, req.model, user=True)
            if per_user is not None:
                return (
                    (key, BucketKey(req.scope, per_user.name, req.user)),
                    (limits, per_user.limits),
                )
        return (key,), (limits,)

    def _bucket(self, key: BucketKey, limits: Limits, now: float) -> Bucket:
        b = self._buckets.get(key)
        if b is None:
            b = self._buckets[key] = Bucket.full(key, limits, now)
        else:
            b.refill(now)
        return b

    def _paused_until(self, scope: str, budget: str, now: float) -> float:
        until = self._pauses.get((scope, budget))
        return until if until is not None and until > now else 0.0

    def _pause(self, scope: str, budget: str, until: float) -> None:
        if until > self._pauses.get((scope, budget), 0.0):
            self._pauses[(scope, budget)] = until
            self._changes.append(PauseSet(scope, budget, until))

    # ---- restart and reload -------------------------------------------------------------------

    def restore(self, snap: Snapshot, now: float) -> None:
        """Rebuild from a journal's snapshot; then advance() settles leases that lapsed while
        the daemon was down. Levels are brought forward by the refill for the downtime,
        within the current config's bounds (never above capacity, at most one in debt)."""
        for bl in snap.buckets:
            limits = self._limits_for_key(bl.key)
            if limits is None:
                continue
            # A level "as of" a time still to come: the wall clock was stepped back while the
            # daemon was down. Counting from then would stop refills until it caught up.
            b = Bucket.full(bl.key, limits, min(bl.as_of, now))
            b.set_levels((bl.requests, bl.input_tokens, bl.output_tokens))
            b.refill(now)
            self._buckets[bl.key] = b
        for r in sorted(snap.reservations, key=lambda r: r.granted_at):
            if r.settlement is not None:
                self._remember(r)
                continue
            self._open[r.id] = r
            self._index_request(r)
            heapq.heappush(self._leases, (r.expires_at, r.id))
            for key in r.buckets:
                self._refunds.granted(key, r.id, r.granted_at, amounts_tuple(r.reserved))
                held = self._buckets.get(key)
                if held is None:
                    limits = self._limits_for_key(key)
                    if limits is None:
                        continue
                    held = self._buckets[key] = Bucket.full(key, limits, now)
                held.in_flight += 1
        order = sorted(self._settled_order)
        self._settled_order = deque(order)
        for p in snap.pauses:
            if p.until > now:
                self._pauses[(p.scope, p.budget)] = p.until

    def set_config(self, config: Config, now: float) -> None:
        """Apply new limits, keeping levels and reservations (hot reload)."""
        self._config = config
        for b in self._buckets.values():
            limits = self._limits_for_key(b.key)
            if limits is not None:
                b.refill(now)
                b.set_limits(limits)
                self._dirty.add(b.key)
                if b.queues:
                    self._moved.add(b.key)
        self._drain(list(self._buckets.values()), now)

    def _limits_for_key(self, key: BucketKey) -> Limits | None:
        """None: the config no longer has this budget (e.g. a state from before budgets)."""
        limits = self._config.budget_limits(key.scope, key.budget, user=bool(key.user))
        if key.user or limits is None:
            return limits
        return self._with_learned(key, limits)

    def _with_learned(self, key: BucketKey, limits: Limits) -> Limits:
        learned = self._learned.get(key)
        return limits.merged(learned) if learned is not None else limits

    # ---- overload awareness and provider sync -------------------------------------------

    def overloaded_until(self, budget: str, now: float) -> float:
        """When the overload mark on a model budget lifts (0.0: not marked)."""
        return self._overloads.until(budget, now)

    def overloaded_models(self, now: float) -> dict[str, float]:
        return self._overloads.active(now)

    def sync_from_provider(
        self, key: BucketKey, told: ProviderLimits, now: float
    ) -> list[str]:
        """Correct the scope x budget bucket `key` from what the provider said.

        Lowers a level when the provider says less remains than the ledger believes, by more
        than the provider's rounding (so repeated reports do not thrash). Never raises a level;
        raises a capacity only when config allows learning limits. Returns what it changed,
        for the log.
        """
        b = self._buckets.get(key)
        if b is None:
            return []
        b.refill(now)
        notes = []
        s = self._config.settings
        for i, name in enumerate(RATE_DIMS):
            tolerance = 1 if i == 0 else s.sync_tolerance_tokens
            limit, remaining, cap = told.limits[i], told.remaining[i], b.caps[i]
            if cap is None:
                continue
            if s.learn_limits and limit is not None and limit > cap:
                field = LIMIT_FIELDS[i]
                learned = self._learned.get(key, Limits())
                self._learned[key] = learned.merged(Limits(**{field: limit}))
                b.set_limits(b.limits.merged(Limits(**{field: limit})))
                notes.append(f"learned {field}={limit} for {key.budget} from the provider "
                             f"(configured {cap})")
            if remaining is not None and remaining + tolerance < b.levels[i]:
                notes.append(f"lowered {name} for {key.budget} from {b.levels[i]:.0f} to "
                             f"{remaining}: the provider reports less remaining")
                b.levels[i] = float(remaining)
                self._dirty.add(key)
                self._moved.add(key)
        return notes

    def learned_fields(self, key: BucketKey) -> frozenset[str]:
        learned = self._learned.get(key)
        if learned is None:
            return frozenset()
        return frozenset(f for f in LIMIT_FIELDS if getattr(learned, f) is not None)

    def wait_status(self, w: Waiter, now: float) -> tuple[int, float, int]:
        """(position, estimated seconds, queue depth) of a waiting caller. Position 1 is
        next in line among everyone waiting on any of its buckets. A caller last in line is
        answered without walking the queues; one further up costs one queue_statuses."""
        if self._is_last(w):
            depth = self._depth(self._related(w.queue))
            return depth, self._estimate(w, w.queue, w.amounts, now), depth
        depth, rows = self.queue_statuses(w.queue, now)
        return next((pos, est, depth) for other, pos, est in rows if other is w)

    def queue_statuses(
        self, qk: QueueKey, now: float
    ) -> tuple[int, list[tuple[Waiter, int, float]]]:
        """Where every waiter on queue `qk` stands, in one pass over the queues sharing its
        buckets: (depth, [(waiter, position, estimated seconds)]) in line order. The same
        figures as wait_status for each, for the cost of one."""
        q = self._queues.get(qk)
        if not q:
            return 0, []
        pause = self._pause_wait(qk, now)
        b = self._buckets.get(qk[0])
        if len(qk) == 1 and b is not None and len(b.queues) == 1:
            return len(q), self._alone_statuses(q, b, pause, now)
        estimates = [pause] * len(q)
        for k in qk:
            b = self._buckets.get(k)
            if b is None:
                continue
            b.refill(now)
            schedule = self._schedule(b, now)
            demand, ahead, i = [0.0, 0.0, 0.0], 0, 0
            for other in _by_seq([self._queues[r] for r in b.queues]):
                a = other.amounts
                demand[0] += a[0]
                demand[1] += a[1]
                demand[2] += a[2]
                if other.queue == qk:
                    estimates[i] = max(estimates[i],
                                       self._eta(b, demand, ahead, schedule, now, a))
                    i += 1
                ahead += 1
        positions, depth = [], 0
        for other in _by_seq([self._queues[r] for r in self._related(qk)]):
            depth += 1
            if other.queue == qk:
                positions.append(depth)
        return depth, list(zip(q, positions, estimates, strict=True))

    def _alone_statuses(
        self, q: deque[Waiter], b: Bucket, pause: float, now: float
    ) -> list[tuple[Waiter, int, float]]:
        """queue_statuses for a queue alone on its one bucket (the usual case): positions
        are places in line, and one running sum gives every estimate."""
        b.refill(now)
        schedule = self._schedule(b, now)
        demand = [0.0, 0.0, 0.0]
        rows = []
        for ahead, w in enumerate(q):
            a = w.amounts
            demand[0] += a[0]
            demand[1] += a[1]
            demand[2] += a[2]
            rows.append((w, ahead + 1,
                         max(pause, self._eta(b, demand, ahead, schedule, now, a))))
        return rows

    def _schedule(self, b: Bucket, now: float) -> Schedule:
        """The refunds expected on `b` from calls in flight (none unless configured)."""
        if not b.in_flight or not self._config.settings.expect_refunds:
            return []
        return self._refunds.schedule(b.key, now, self._open.__contains__, b.in_flight)

    # ---- inspection ---------------------------------------------------------------------------

    def open_reservations(self) -> Iterator[Reservation]:
        return iter(self._open.values())

    def buckets(self, now: float) -> Iterator[Bucket]:
        for b in self._buckets.values():
            b.refill(now)
            yield b

    def bucket_keys(self) -> Iterable[BucketKey]:
        return self._buckets.keys()

    def bucket(self, key: BucketKey, now: float) -> Bucket:
        b = self._buckets[key]
        b.refill(now)
        return b

    def queue_depth(self, b: Bucket) -> int:
        return sum(len(self._queues[qk]) for qk in b.queues)

    def active_pauses(self, now: float) -> int:
        return sum(1 for until in self._pauses.values() if until > now)

    def paused_until(self, scope: str, budget: str, now: float) -> float:
        return self._paused_until(scope, budget, now)

    def get(self, reservation_id: str) -> Reservation | None:
        return self._open.get(reservation_id) or self._settled.get(reservation_id)

    @property
    def open_count(self) -> int:
        return len(self._open)

    @property
    def waiting_count(self) -> int:
        return self._waiting


def _by_seq(queues: list[deque[Waiter]]) -> Iterable[Waiter]:
    """Waiters of several queues, oldest first (each queue is in arrival order already)."""
    if len(queues) == 1:
        return queues[0]
    return heapq.merge(*queues, key=lambda w: w.seq)


def check_model_name(model: str) -> None:
    """A model id is matched against config patterns, so a name with whitespace or glob
    characters would only ever be a mistake or an attempt to get a budget of its own."""
    bad = next((c for c in model if c.isspace() or c in GLOB_CHARS), None)
    if bad is not None:
        raise InvalidRequest(
            "model", f"{model!r} contains {bad!r}; model ids have no whitespace or * ? [ ]"
        )
