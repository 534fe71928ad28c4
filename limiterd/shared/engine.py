"""The engine of a sidecar whose ledger lives in Redis, shared with the other sidecars.

It answers the same calls as limiterd.engine.Engine. Every decision (grant, wait, settle,
lapse) is one Lua script run inside Redis on Redis' clock (lua/); this module only plans
which keys and limits a request touches, waits, and turns replies into ledger values.

Waiting: a caller that cannot be granted takes a ticket in the tag's queue in Redis and
claims the buckets it lacks or is queued behind, so no younger caller on any sidecar passes
it. It tries again when a script publishes on the wake channel (a settlement, a grant, a
waiter leaving), when its refill is due, and at least every third of the queue entry TTL,
which also renews its entry: a sidecar that dies stops renewing, and its entries stop
blocking after that TTL. Deadlines are kept on this sidecar's clock, like the local engine.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import math
import os
from collections import OrderedDict
from collections.abc import Callable, Coroutine, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from redis import exceptions as rx
from redis.asyncio import Redis, RedisCluster
from redis.asyncio.retry import Retry
from redis.asyncio.sentinel import Sentinel
from redis.backoff import ExponentialBackoff

from limiterd.clock import Clock
from limiterd.config.model import Config, Limits
from limiterd.engine import (
    Engine,
    PersistenceFailing,
    ShuttingDown,
    StatusCallback,
    Superseded,
    WaitStatus,
)
from limiterd.ledger.buckets import RATE_DIMS, capacities
from limiterd.ledger.errors import (
    AlreadySettled,
    InvalidRequest,
    LedgerError,
    NeverFits,
    NotFound,
    QueueFull,
)
from limiterd.ledger.ledger import LIMIT_FIELDS, Granted, Rejected, check_model_name
from limiterd.ledger.model import (
    AcquireRequest,
    Amounts,
    BucketKey,
    Change,
    Outcome,
    PauseSet,
    ProviderLimits,
    Reservation,
    ReservationOpened,
    ReservationSettled,
    Settlement,
    State,
)
from limiterd.shared.batch import Batcher
from limiterd.shared.fallback import Outbox, Pending, scaled, settle_locally
from limiterd.shared.keys import Keys
from limiterd.shared.scripts import Scripts, text
from limiterd.shared.settings import SharedLedger, WhenUnavailable
from limiterd.storage.base import StartupError
from limiterd.storage.memory import MemoryJournal
from limiterd.views import BucketView, Stats, lease_order, resolve_scope

log = logging.getLogger("limiterd.shared")

# Redis failures that mean "not reachable right now" (as opposed to a bug in a script).
UNREACHABLE = (rx.ConnectionError, rx.TimeoutError, rx.BusyLoadingError, OSError)
REMEMBERED = 100_000  # reservation id -> base, and bases seen, kept per sidecar (LRU)
RESUBSCRIBE_S = 0.5
LISTEN_POLL_S = 1.0  # how long stop() may wait for the wake listener, at most
MIRROR_REFRESH_S = 5.0  # how stale the bucket gauges of /metrics may be
EPOCH_CHECK_S = 0.05  # how soon a sidecar notices that Redis lost its data, at most
LOST_DATA_SAFE_S = 60.0  # one refill period: after it, an empty bucket would be full anyway
# A capacity learned from the provider's headers (learn_limits) is kept this long after the
# last Report whose headers still said so; then the configured one applies again.
LEARNED_KEPT_S = 3600.0
_CAP_FIELDS = ("cr", "ci", "co")  # the bucket hash's capacity fields, per RATE_DIMS

ChangeListener = Callable[[Sequence[Change]], None]


def _caps(limits: Limits) -> list[str]:
    values = (*capacities(limits), limits.max_concurrent)
    return ["" if v is None else str(v) for v in values]


def _int(value: str) -> int:
    return int(float(value)) if value else 0


def user_bucket(budget: str, user: str) -> str:
    """How a user's bucket is named under its tag (lua/common.lua `ub`)."""
    return f"{len(budget)}:{budget}:{user}"


def parse_user_bucket(ub: str) -> tuple[str, str]:
    n, _, rest = ub.partition(":")
    return rest[:int(n)], rest[int(n) + 1:]


def reservation_from(reply: Sequence[Any]) -> Reservation:
    """A reservation from a script's reply (lua/common.lua res_reply)."""
    (rid, scope, model, user, request_id, ri, ro, granted, expires, waited, state, settled_at,
     fr, fi, fo, oi, oo, outcome, ub, budget) = (text(v) for v in reply[2:22])
    keys: tuple[BucketKey, ...] = (BucketKey(scope, budget),)
    if ub:
        keys += (BucketKey(scope, *parse_user_bucket(ub)),)
    settlement = None
    if state != "open":
        settlement = Settlement(
            State(state), float(settled_at),
            refunded=Amounts(_int(fr), _int(fi), _int(fo)),
            overrun=Amounts(0, _int(oi), _int(oo)),
            outcome=Outcome(outcome) if outcome else None,
        )
    return Reservation(rid, scope, model, user, request_id, Amounts(1, _int(ri), _int(ro)),
                       keys, float(granted), float(expires), float(waited), settlement)


@dataclass(frozen=True, slots=True)
class _Plan:
    base: str
    budget: str
    limits: Limits
    user_bucket: str  # "" when users are not limited
    user_limits: Limits | None


@dataclass(slots=True)
class _Wait:
    """One Acquire call's place in its tag's queue (ticket 0: none yet). `rid` is the call's
    id: the reservation's if granted, and the owner of its queue entry."""

    req: AcquireRequest
    plan: _Plan
    rid: str
    lease_s: float
    deadline: float
    try_once: bool
    detachable: bool  # a stream with a request_id: keeps its place when it breaks
    ticket: int = 0
    calling: bool = False  # a script call is on its way (its undo handles a cancel)


def _connect(shared: SharedLedger) -> tuple[Redis | RedisCluster, Sentinel | None]:
    """A client for a single Redis (or one behind a proxy or managed endpoint), for a Cluster
    whose nodes are discovered from the one named (every script touches one slot), or for the
    master that Sentinel names (asked again on every new connection, so a failover is followed;
    the Sentinel's own clients are returned to be closed with it)."""
    options: dict[str, Any] = dict(
        password=shared.password(), socket_timeout=shared.timeout_s,
        socket_connect_timeout=shared.timeout_s,
        retry=Retry(ExponentialBackoff(cap=0.2, base=0.02), 2),
        retry_on_error=[rx.ConnectionError, rx.TimeoutError],
    )
    if (where := shared.sentinel) is not None:
        timeouts = {k: v for k, v in options.items() if k.startswith("socket_")}
        sentinel = Sentinel(  # type: ignore[no-untyped-call]  # redis-py leaves it untyped
            list(where.sentinels), sentinel_kwargs={**timeouts, "ssl": where.tls}, **options)
        master = sentinel.master_for(where.service, db=where.db, ssl=where.tls,
                                     health_check_interval=30)
        return master, sentinel
    if shared.cluster:
        return RedisCluster.from_url(shared.url, **options), None
    return Redis.from_url(shared.url, health_check_interval=30, **options), None


class SharedEngine:
    """The Engine's calls, decided in Redis. Raises PersistenceFailing while Redis is away."""

    def __init__(self, config: Config, shared: SharedLedger, clock: Clock,
                 client: Redis | None = None) -> None:
        self.clock = clock
        self.shared = shared
        self._config = config
        # Overload marks (budget -> when it lifts, Redis' clock) and learned capacities, both
        # kept in Redis; these are this sidecar's last reads of them (every Acquire reads its
        # budget's mark in its round trip; refresh() reads them all).
        self._overloaded: dict[str, float] = {}
        self._learned: dict[BucketKey, Limits] = {}
        self._mirror = _Mirror()
        self.keys = Keys(shared.key_prefix)
        # A pooled connection found dead (Redis restarted) is retried once on a new one:
        # every script is idempotent (acquire by its reservation id), so a retry after a
        # lost reply answers the same, never twice.
        self._sentinel: Sentinel | None = None
        connected: Redis | RedisCluster | None = client
        if connected is None:
            connected, self._sentinel = _connect(shared)
        self.client: Any = connected  # Redis or RedisCluster
        self.scripts = Scripts.register(self.client)
        self._batch = Batcher(self.client, self.scripts)
        self._epoch: str | None = None  # see check_epoch
        self._epoch_checked_at = -math.inf
        self._indexed: dict[str, float] = {}  # base -> when this sidecar last indexed it
        self._safe_until = -math.inf
        self._where: OrderedDict[str, str] = OrderedDict()  # reservation id -> base
        self._known: OrderedDict[str, None] = OrderedDict()  # bases this sidecar has used
        self._wakes: dict[str, set[asyncio.Event]] = {}
        self._waiting = 0
        self._healthy = True
        self._listeners: list[ChangeListener] = []
        self._tasks: list[asyncio.Task[None]] = []
        self._calls: set[asyncio.Future[list[Any]]] = set()  # script calls on their way
        self._stopping = False
        self._draining: ShuttingDown | None = None  # set: waits end at once with this
        self._local: Engine | None = None  # local_share: the ledger used while Redis is away
        if shared.when_unavailable is WhenUnavailable.LOCAL_SHARE:
            self._local = Engine(scaled(config, shared.local_share), MemoryJournal(), clock)
        self._mine: OrderedDict[str, Reservation] = OrderedDict()  # granted here, still open
        self._outbox = Outbox()
        self.journal = None  # no local journal: ErrorLog keeps its entries in memory

    # ---- lifecycle ---------------------------------------------------------------------------

    async def start(self) -> None:
        """Check that Redis answers (a clear error if not), then sweep and listen for wakes."""
        try:
            await self.client.ping()
            await self.check_epoch()
        except UNREACHABLE as exc:
            if self.shared.when_unavailable.value == "fail_closed":
                log.error("the shared ledger is unreachable at start: %s", exc)
            self._unhealthy(exc)
        except rx.AuthenticationError as exc:
            raise StartupError(f"redis {self.shared.describe()}: {exc}") from None
        if self._local is not None:
            await self._local.start()
        self._tasks.append(asyncio.create_task(self._listen(), name="limiterd-shared-wake"))
        self._tasks.append(asyncio.create_task(self._sweep_loop(), name="limiterd-shared-sweep"))

    async def stop(self) -> None:
        self._stopping = True
        for t in self._tasks:
            t.cancel()
        for t in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await t
        # A call its caller left (a detached wait cancelled above) still holds a connection.
        await asyncio.gather(*self._calls, return_exceptions=True)
        if self._local is not None:
            await self._local.stop()
        await self.client.aclose()
        if self._sentinel is not None:
            for asked in self._sentinel.sentinels:
                await asked.aclose()

    def end_waits(self, retry_after_s: float) -> int:
        """The daemon is stopping: waiting callers leave their queues and hear ShuttingDown
        now (limiterd.engine.Engine.end_waits)."""
        self._draining = ShuttingDown(retry_after_s)
        self._wake_all()
        return self._waiting

    def add_listener(self, listener: ChangeListener) -> None:
        self._listeners.append(listener)

    def set_config(self, config: Config) -> None:
        self._config = config
        if self._local is not None:
            self._local.set_config(scaled(config, self.shared.local_share))

    def describe(self) -> str:
        return self.shared.describe()

    # ---- the read API: frozen views of the shared state, as of the last refresh() ----------

    @property
    def config(self) -> Config:
        return self._config

    @property
    def healthy(self) -> bool:
        return self._healthy

    def now(self) -> float:
        return self.clock.now()

    def stats(self) -> Stats:
        """Open reservations and pauses in Redis (as of the last refresh); waiting callers
        and the overload mark of this sidecar."""
        now = self.clock.now()
        m = self._mirror
        return Stats(len(m.leases), self._waiting, self._healthy,
                     sum(1 for v in m.buckets.values() if v.paused_until > now),
                     tuple(sorted((b, u) for b, u in self._overloaded.items() if u > now)),
                     local_share=self.falling_back)

    def overloaded_until(self, budget: str) -> float:
        until = self._overloaded.get(budget, 0.0)
        return until if until > self.clock.now() else 0.0

    def scopes(self, wanted: str) -> frozenset[str] | None:
        if not wanted:
            return None
        known = {k.scope for k in self._mirror.buckets}
        aliases = {s: c.alias for s, c in self._config.scopes.items()}
        known.update(aliases)
        return resolve_scope(wanted, known, aliases)

    def buckets(self, scopes: frozenset[str] | None = None, model: str = "",
                after: BucketKey | None = None, limit: int | None = None) -> list[BucketView]:
        keys = sorted(k for k in self._mirror.buckets
                      if (scopes is None or k.scope in scopes)
                      and (not model or self._spends(k, model))
                      and (after is None or k > after))
        if limit is not None:
            keys = keys[:limit]
        return [self._mirror.buckets[k] for k in keys]

    def leases(self, scopes: frozenset[str] | None = None, model: str = "",
               after: tuple[float, str] | None = None,
               limit: int | None = None) -> list[Reservation]:
        found = sorted((r for r in self._mirror.leases
                        if (scopes is None or r.scope in scopes)
                        and (not model or r.model == model)
                        and (after is None or lease_order(r) > after)), key=lease_order)
        return found if limit is None else found[:limit]

    async def reset_buckets(
        self, scopes: frozenset[str] | None, model: str, user: str = ""
    ) -> list[BucketView]:
        """Refill the matching buckets to full, forgiving their debt (an operator's reset),
        in Redis: every sidecar sees it."""
        await self.refresh()
        keys = [k for k in self._mirror.buckets
                if (scopes is None or k.scope in scopes) and self._spends(k, model)
                and k.user == user]
        for k in keys:
            base = self.keys.base(k.scope, self._mirror.tags[k])
            await self._run(self.scripts.reset, base,
                            [user_bucket(k.budget, k.user) if k.user else ""])
        await self.refresh()
        return [self._mirror.buckets[k] for k in sorted(keys) if k in self._mirror.buckets]

    def _spends(self, key: BucketKey, model: str) -> bool:
        """A filter names a budget, or a model id that draws on it."""
        if key.budget == model:
            return True
        budget = self._config.budget_for(key.scope, model, bool(key.user))
        return budget is not None and budget.name == key.budget

    async def refresh(self) -> None:
        """Read every tag's buckets and open leases from Redis (for Admin reads and metrics).
        Raises PersistenceFailing when Redis is away."""
        try:
            self._mirror = mirror = await _read_mirror(self.client, self.keys)
        except UNREACHABLE as exc:
            self._unhealthy(exc)
            raise PersistenceFailing(
                f"the shared ledger on Redis is unreachable ({exc}); try again shortly"
            ) from None
        for budget, until in mirror.overloaded.items():
            self._mark(budget, repr(until) if until else None)
        self._learned = dict(mirror.learned)

    # ---- calls -------------------------------------------------------------------------------

    async def acquire(
        self,
        req: AcquireRequest,
        max_wait_s: float,
        on_status: StatusCallback | None = None,
    ) -> Granted | Rejected:
        local = self._local
        if local is not None and not self._healthy:
            return await local.acquire(req, max_wait_s, on_status)
        try:
            result = await self._acquire_shared(req, max_wait_s, on_status)
        except PersistenceFailing:
            if local is None:
                raise
            return await local.acquire(req, max_wait_s, on_status)
        if isinstance(result, Granted) and not result.replayed:
            self._mine[result.reservation.id] = result.reservation
            if len(self._mine) > REMEMBERED:
                self._mine.popitem(last=False)
        return result

    async def report(
        self,
        reservation_id: str,
        actual_input: int,
        actual_output: int,
        outcome: Outcome,
        retry_after_s: float,
        provider: ProviderLimits | None = None,
    ) -> tuple[Reservation, bool]:
        if self._local is not None and self._local.ledger.get(reservation_id) is not None:
            return await self._local.report(reservation_id, actual_input, actual_output,
                                            outcome, retry_after_s, provider)
        try:
            return await self._report_shared(reservation_id, actual_input, actual_output,
                                             outcome, retry_after_s, provider)
        except PersistenceFailing:
            return self._keep("report", reservation_id,
                              (actual_input, actual_output, outcome.value, retry_after_s))

    async def release(self, reservation_id: str) -> tuple[Reservation, bool]:
        if self._local is not None and self._local.ledger.get(reservation_id) is not None:
            return await self._local.release(reservation_id)
        try:
            return await self._release_shared(reservation_id)
        except PersistenceFailing:
            return self._keep("release", reservation_id, ())

    async def keep_alive(self, reservation_id: str, lease_s: float | None) -> Reservation:
        if self._local is not None and self._local.ledger.get(reservation_id) is not None:
            return await self._local.keep_alive(reservation_id, lease_s)
        lease = lease_s if lease_s is not None else self._config.settings.default_lease_s
        try:
            return await self._keep_alive_shared(reservation_id, lease)
        except PersistenceFailing:
            return self._keep("keepalive", reservation_id, (lease,))[0]

    async def mark_sent(self, reservation_id: str) -> None:
        """The caller sends now: the script ends a hold the reservation may end. While Redis
        is away this fails (UNAVAILABLE) and the hold ends at the holder's settlement."""
        if self._local is not None and self._local.ledger.get(reservation_id) is not None:
            return await self._local.mark_sent(reservation_id)
        await self._settle(reservation_id, "mark")

    def _keep(self, op: str, reservation_id: str, args: tuple[Any, ...]) -> tuple[
            Reservation, bool]:
        """Redis is away: answer a settlement of a shared reservation this sidecar granted
        from what it knows, and keep it for delivery (local_share only; else re-raise)."""
        unreachable = PersistenceFailing("the shared ledger on Redis is unreachable; try "
                                         "again shortly")
        if self._local is None:
            raise unreachable
        done = self._outbox.settled(reservation_id)
        if done is not None:
            if op == "keepalive" or done.state is not {"report": State.REPORTED,
                                                       "release": State.RELEASED}[op]:
                raise AlreadySettled(done, op)
            return done, True
        r = self._mine.get(reservation_id)
        if r is None or self._outbox.full():
            raise unreachable
        answer = settle_locally(r, op, args, self.clock.now())
        self._outbox.add(reservation_id, Pending(op, args, answer))
        if answer.settlement is None:
            self._mine[reservation_id] = answer
        else:
            self._mine.pop(reservation_id, None)
            self._emit([ReservationSettled(answer.id, answer.settlement)])
        return answer, False

    async def _deliver(self) -> None:
        """Redis answers again: send what was kept, in order. What Redis refuses (the lease
        lapsed meanwhile, the data was lost) is logged and dropped."""
        for rid, p in self._outbox.take():
            try:
                if p.op == "report":
                    await self._report_shared(rid, p.args[0], p.args[1], Outcome(p.args[2]),
                                              p.args[3], None)
                elif p.op == "release":
                    await self._release_shared(rid)
                else:
                    await self._keep_alive_shared(rid, p.args[0])
            except LedgerError as exc:
                log.warning("a %s kept while Redis was away was refused: %s", p.op, exc)

    async def _acquire_shared(
        self,
        req: AcquireRequest,
        max_wait_s: float,
        on_status: StatusCallback | None = None,
    ) -> Granted | Rejected:
        settings = self._config.settings
        now = self.clock.now()
        w = _Wait(req, self._plan(req), os.urandom(16).hex(),
                  req.lease_s if req.lease_s is not None else settings.default_lease_s,
                  now + max_wait_s, max_wait_s <= 0,
                  # A stream that breaks keeps its place for the grace (lua/acquire.lua).
                  on_status is not None and bool(req.request_id))
        self._waiting += 1
        try:
            return await self._wait(w, on_status)
        except asyncio.CancelledError:
            if not w.calling:  # else the call's undo hears of it, with its reply
                self._gone(w)
            raise
        except Superseded:
            raise  # the place is the newer call's now
        except BaseException:
            if w.ticket:
                self._background(self._leave(w))
            raise
        finally:
            self._waiting -= 1

    async def _wait(self, w: _Wait, on_status: StatusCallback | None) -> Granted | Rejected:
        """Try until granted, refused or past the deadline; wait in the tag's queue between
        tries. Raises Superseded when a re-attach by the same request_id took the place."""
        plan = w.plan
        wake = asyncio.Event()
        self._wakes.setdefault(plan.base, set()).add(wake)
        last_status: tuple[int, int] | None = None
        last_sent = -math.inf
        interval = self._config.settings.stream_update_interval_s
        try:
            while True:
                args = self._acquire_args(w, w.ticket)
                make_args = functools.partial(self._acquire_args, w, 0)
                wake.clear()
                w.calling = True
                reply = await self._shielded(
                    self._first_acquire(plan, w.rid, w.lease_s, make_args) if w.ticket == 0
                    else self._try_acquire(plan, [], args),
                    lambda r: self._undo(r, w),
                )
                w.calling = False
                kind = text(reply[0])
                if kind == "G":
                    w.ticket = 0
                    r = reservation_from(reply)
                    self._remember(r.id, plan.base)
                    replayed = text(reply[1]) == "1"
                    if not replayed:
                        self._emit([ReservationOpened(r)])
                    return Granted(r, replayed, len(reply) > 22 and text(reply[22]) == "1")
                if kind == "S":
                    w.ticket = 0
                    raise Superseded("a newer Acquire with this request_id took over")
                if kind == "R":
                    return Rejected(float(text(reply[1])))
                if kind == "E":
                    why = text(reply[1])
                    if why == "request_id":
                        raise InvalidRequest("request_id", text(reply[2]))
                    raise QueueFull(int(text(reply[2])), float(text(reply[3])))
                w.ticket = int(text(reply[1]))
                refill_s, eta_s = float(text(reply[3])), float(text(reply[4]))
                position, depth = int(text(reply[5])), int(text(reply[6]))
                now = self.clock.now()
                if on_status is not None:
                    key = (position, round(eta_s))
                    if key != last_status or now - last_sent >= interval:
                        overloaded = self.overloaded_until(plan.budget) > 0
                        # Waited since the place was taken (before a re-attach, too), by
                        # Redis' clock alone: every sidecar reads the same one, so a stream
                        # re-attached elsewhere never hears it waited less than it had.
                        waited = float(text(reply[7]))
                        await on_status(WaitStatus(position, eta_s, depth, waited, overloaded))
                        last_status, last_sent = key, now
                # Try again when woken, when the refill is due, or to renew the entry.
                at = min(w.deadline, now + self.shared.queue_entry_ttl_s / 3)
                if refill_s > 0:
                    at = min(at, now + refill_s)
                if on_status is not None:
                    at = min(at, last_sent + interval)
                if self._draining is None:
                    await self._sleep(wake, at)
                if self._draining is not None:  # leaves the queue (the caller's except)
                    raise ShuttingDown(self._draining.retry_after_s)
                if self.clock.now() >= w.deadline:  # never granted late
                    await self._leave(w)
                    w.ticket = 0
                    return Rejected(eta_s)
        finally:
            waiters = self._wakes.get(plan.base)
            if waiters is not None:
                waiters.discard(wake)
                if not waiters:
                    del self._wakes[plan.base]

    def _gone(self, w: _Wait) -> None:
        """The caller went away while waiting. A stream with a request_id keeps its place for
        the re-attach grace (waited on here, detached, so it is granted in its turn); any
        other caller leaves the queue."""
        if not w.ticket or self._stopping:
            return  # stopping: its entry expires as a dead sidecar's would
        if w.detachable and self._draining is None:
            grace = self._config.settings.reattach_grace_s
            w.deadline = min(w.deadline, self.clock.now() + grace)
            self._background(self._detached(w))
        else:
            self._background(self._leave(w))

    async def _detached(self, w: _Wait) -> None:
        """Wait on for a caller whose stream broke, until its grace ends. A grant made now is
        kept in Redis under its request_id: the re-attach replays it (on any sidecar), or it
        lapses by its lease like any other. A re-attach takes the place over (Superseded)."""
        w.detachable = False  # once: a cancel now (the daemon stops) ends it
        try:
            result = await self._wait(w, None)
        except (Superseded, asyncio.CancelledError):
            return  # cancelled: the daemon stops; its entry expires like a dead sidecar's
        except (ShuttingDown, LedgerError, PersistenceFailing):
            if w.ticket:
                await self._leave(w)
            return
        if isinstance(result, Granted) and not result.replayed:
            self._mine[result.reservation.id] = result.reservation
    async def _report_shared(
        self,
        reservation_id: str,
        actual_input: int,
        actual_output: int,
        outcome: Outcome,
        retry_after_s: float,
        provider: ProviderLimits | None = None,
    ) -> tuple[Reservation, bool]:
        told = provider or ProviderLimits((None, None, None), (None, None, None))
        remaining = ["" if n is None else str(n) for n in told.remaining]
        limits = ["" if n is None else str(n) for n in told.limits]
        s = self._config.settings
        r, replayed, reply = await self._settle(
            reservation_id, "report", actual_input, actual_output, outcome.value,
            retry_after_s, *remaining, s.sync_tolerance_tokens, *limits,
            int(s.learn_limits), LEARNED_KEPT_S)
        if not replayed:
            changes: list[Change] = [ReservationSettled(r.id, r.settlement)]  # type: ignore[arg-type]
            if outcome is Outcome.RATE_LIMITED and retry_after_s > 0:
                changes.append(PauseSet(r.scope, r.buckets[0].budget,
                                        r.settlement.settled_at  # type: ignore[union-attr]
                                        + retry_after_s))
            elif outcome is Outcome.OVERLOADED:
                await self._note_overloaded(r)
            self._emit(changes)
            if len(reply) > 22 and text(reply[22]):
                log.info("provider sync: lowered %s for %s (dimension:was:now)",
                         text(reply[22]), r.model)
            if len(reply) > 23 and text(reply[23]):
                log.info("provider sync: learned %s for %s from the provider (field:was:now)",
                         text(reply[23]), r.buckets[0].budget)
                self._learn(r.buckets[0], text(reply[23]))
        return r, replayed

    async def _release_shared(self, reservation_id: str) -> tuple[Reservation, bool]:
        r, replayed, _ = await self._settle(reservation_id, "release")
        if not replayed:
            self._emit([ReservationSettled(r.id, r.settlement)])  # type: ignore[arg-type]
        return r, replayed

    async def _keep_alive_shared(self, reservation_id: str, lease: float) -> Reservation:
        r, _, _ = await self._settle(reservation_id, "keepalive", lease)
        return r

    # ---- planning ----------------------------------------------------------------------------

    def _plan(self, req: AcquireRequest) -> _Plan:
        """The buckets a request draws on (its model's budget, and its user's under it), as
        the local ledger plans them; requests that could never fit fail here."""
        check_model_name(req.model)
        config = self._config
        budget = config.budget_for(req.scope, req.model)
        if budget is None:
            raise InvalidRequest(
                "model", f"no limits are configured for model {req.model!r} (and no default)"
            )
        per_user = config.budget_for(req.scope, req.model, user=True) if req.user else None
        amounts = (1, req.input_tokens, req.max_output_tokens)
        key = BucketKey(req.scope, budget.name)
        learned = self._learned.get(key)  # a request that fits a learned capacity may wait
        checks = [(key, budget.limits if learned is None else budget.limits.merged(learned))]
        if per_user is not None:
            checks.append((BucketKey(req.scope, per_user.name, req.user), per_user.limits))
        for key, lim in checks:
            for name, cap, amount in zip(RATE_DIMS, capacities(lim), amounts, strict=True):
                if cap is not None and amount > cap:
                    raise NeverFits(key, name, cap, amount)
        return _Plan(
            self.keys.base(req.scope, budget.name), budget.name, budget.limits,
            user_bucket(per_user.name, req.user) if per_user is not None else "",
            per_user.limits if per_user is not None else None,
        )

    def _acquire_args(self, w: _Wait, ticket: int) -> list[Any]:
        s = self._config.settings
        req, plan = w.req, w.plan
        user_caps = _caps(plan.user_limits) if plan.user_limits is not None else [""] * 4
        return [
            w.rid, req.request_id, req.scope, req.model, req.user, req.input_tokens,
            req.max_output_tokens, repr(w.lease_s), ticket, int(w.try_once),
            repr(self.shared.queue_entry_ttl_s), s.max_waiters_per_queue,
            int(plan.base in self._known or self.clock.now() < self._safe_until),
            *_caps(plan.limits),
            plan.user_bucket, *user_caps, plan.budget,
            repr(s.refill_allowance_s), int(req.marks_sent),  # issue 15 (ledger.buckets)
        ]

    # ---- Redis -------------------------------------------------------------------------------

    def _common(self) -> list[Any]:
        s = self._config.settings
        return [self.keys.channel, repr(s.settlement_retention_s), repr(self.shared.idle_ttl_s)]

    async def _run(self, script: Any, base: str, args: Sequence[Any]) -> list[Any]:
        [reply] = await self._send([("EVALSHA", script.sha, 1, self.keys.bucket(base),
                                     *self._common(), *args)])
        if isinstance(reply, Exception):
            raise reply  # a bug in a script, not Redis being away: INTERNAL
        self._ran(base)
        return list(reply)

    def _ran(self, base: str) -> None:
        """A script answered for `base`: Redis is there, and this sidecar knows the bucket."""
        self._healthy_again()
        self._known[base] = None
        if len(self._known) > REMEMBERED:
            self._known.popitem(last=False)

    async def _first_acquire(self, plan: _Plan, rid: str, lease_s: float,
                             args: Callable[[], Sequence[Any]]) -> list[Any]:
        """The first try also indexes the reservation id (any sidecar may settle it) and, at
        most once a second, the tag (any sidecar may sweep it): plain keys outside the tag's
        slot, sent in the same round trip as the script. Every EPOCH_CHECK_S the epoch is read
        first, so a Redis that lost its data is noticed before a script decides whether a
        missing bucket starts full."""
        now = self.clock.now()
        if now - self._epoch_checked_at >= EPOCH_CHECK_S:
            self._epoch_checked_at = now
            replies = await self._send([
                ("SET", self.keys.epoch, os.urandom(8).hex(), "NX"),
                ("GET", self.keys.epoch),
                ("PTTL", self.keys.lost_mark),
            ])
            for r in replies:
                if isinstance(r, Exception):
                    raise r
            await self._note_epoch(text(replies[1]), int(replies[2]))
        retention = self._config.settings.settlement_retention_s
        base = plan.base
        commands: list[tuple[Any, ...]] = [
            ("SET", self.keys.reservation_index(rid), base,
             "PX", math.ceil((lease_s + retention) * 1000)),
        ]
        if now - self._indexed.get(base, -math.inf) >= 1.0:
            self._indexed[base] = now
            if len(self._indexed) > REMEMBERED:
                self._indexed.clear()
            commands.append(("ZADD", self.keys.sweep_index, "LT", now + lease_s, base))
        return await self._try_acquire(plan, commands, args())

    async def _try_acquire(self, plan: _Plan, before: list[tuple[Any, ...]],
                           args: Sequence[Any]) -> list[Any]:
        """The acquire script, after `before`, in one round trip that also reads the budget's
        overload mark (another slot: a plain GET), so Acquire's answer and the wait status
        show the mark whichever sidecar set it."""
        script = self.scripts.acquire
        replies = await self._send([
            *before,
            ("GET", self.keys.overload_mark(plan.budget)),
            ("EVALSHA", script.sha, 1, self.keys.bucket(plan.base), *self._common(), *args),
        ])
        mark, reply = replies[-2], replies[-1]
        if isinstance(reply, Exception):
            raise reply
        if not isinstance(mark, Exception):
            self._mark(plan.budget, mark)
        self._ran(plan.base)
        return list(reply)

    def _mark(self, budget: str, raw: Any) -> None:
        """What Redis holds of `budget`'s overload mark (None or '': not marked)."""
        if raw is None or text(raw) == "":
            self._overloaded.pop(budget, None)
        else:
            self._overloaded[budget] = float(text(raw))

    async def _note_overloaded(self, r: Reservation) -> None:
        """An OVERLOADED Report: counted in Redis for the budget (lua/overload.lua), so the
        mark it may set is every sidecar's. Not counted if Redis went away just now."""
        s = self._config.settings
        budget = r.buckets[0].budget
        try:
            [mark] = await self._run(self.scripts.overload, self.keys.overload_base(budget), [
                r.id, repr(s.overload_window_s), s.overload_threshold,
                repr(s.overload_cooldown_s)])
        except PersistenceFailing:
            return
        self._mark(budget, mark)

    def _learn(self, key: BucketKey, raised: str) -> None:
        """Capacities the provider's headers raised ("cf:was:now,..."), for planning here."""
        found = {}
        for item in raised.split(","):
            cf, _, now = item.split(":")
            found[LIMIT_FIELDS[_CAP_FIELDS.index(cf)]] = int(float(now))
        self._learned[key] = self._learned.get(key, Limits()).merged(Limits(**found))

    async def _send(self, commands: list[tuple[Any, ...]]) -> list[Any]:
        """Through the batcher; PersistenceFailing when Redis cannot be reached."""
        try:
            return await self._batch.run(commands)
        except UNREACHABLE as exc:
            self._unhealthy(exc)
            raise PersistenceFailing(
                f"the shared ledger on Redis is unreachable ({exc}); try again shortly"
            ) from None

    async def _settle(self, reservation_id: str, op: str, *args: Any) -> tuple[
            Reservation, bool, list[Any]]:
        base = self._where.get(reservation_id)
        if base is None:
            try:
                found = await self.client.get(self.keys.reservation_index(reservation_id))
            except UNREACHABLE as exc:
                self._unhealthy(exc)
                raise PersistenceFailing(
                    f"the shared ledger on Redis is unreachable ({exc}); try again shortly"
                ) from None
            if found is None:
                raise NotFound(reservation_id)
            base = text(found)
        reply = await self._run(self.scripts.settle, base,
                                [op, reservation_id, *(repr(a) if isinstance(a, float) else a
                                                       for a in args)])
        if text(reply[0]) == "E":
            raise NotFound(reservation_id)
        if text(reply[0]) == "X":
            raise AlreadySettled(reservation_from(reply), {"report": "report", "release": "release",
                                     "keepalive": "keep alive"}[op])
        self._remember(reservation_id, base)
        return reservation_from(reply), text(reply[1]) == "1", reply

    async def _leave(self, w: _Wait) -> None:
        """Give up the place `w` holds (not one a re-attach took over)."""
        with contextlib.suppress(PersistenceFailing):
            await self._run(self.scripts.leave, w.plan.base,
                            [w.ticket, w.plan.user_bucket, w.rid, w.req.request_id])

    async def _shielded(self, call: Coroutine[Any, Any, list[Any]],
                        undo: Callable[[list[Any]], Coroutine[Any, Any, None]]) -> list[Any]:
        """Run a script call to its end even if the caller goes away meanwhile; then `undo`
        what it did for nobody (a grant no one can claim, a queue entry no one renews)."""
        task = asyncio.ensure_future(call)
        self._calls.add(task)
        task.add_done_callback(self._calls.discard)
        try:
            return await asyncio.shield(task)
        except asyncio.CancelledError:
            def done(t: asyncio.Future[list[Any]]) -> None:
                if not t.cancelled() and t.exception() is None:
                    self._background(undo(t.result()))
            task.add_done_callback(done)
            raise

    async def _undo(self, reply: list[Any], w: _Wait) -> None:
        kind = text(reply[0])
        if kind == "G" and text(reply[1]) == "0" and not w.req.request_id:
            with contextlib.suppress(LedgerError, PersistenceFailing):
                await self.release(text(reply[2]))
        elif kind == "W":
            w.ticket = int(text(reply[1]))
            self._gone(w)

    def _background(self, coro: Coroutine[Any, Any, Any]) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.append(task)
        task.add_done_callback(lambda t: self._tasks.remove(t) if t in self._tasks else None)

    def _remember(self, reservation_id: str, base: str) -> None:
        self._where[reservation_id] = base
        self._where.move_to_end(reservation_id)
        if len(self._where) > REMEMBERED:
            self._where.popitem(last=False)

    async def _sleep(self, wake: asyncio.Event, at: float) -> None:
        timer = self.clock.call_at(at, wake.set)
        try:
            await wake.wait()
        finally:
            timer.cancel()

    # ---- background: wakes and sweeps ----------------------------------------------------

    async def _listen(self) -> None:
        """Wake this sidecar's waiters of a tag when a script says its queue may move.

        Reads with a timeout rather than pubsub.listen(): redis-py (8.1) can swallow the
        cancel of a blocking read just after subscribing, and stop() then waited forever."""
        while not self._stopping:
            pubsub = self.client.pubsub(ignore_subscribe_messages=True)
            try:
                await pubsub.subscribe(self.keys.channel)
                self._wake_all()  # anything published while not subscribed was missed
                while not self._stopping:
                    message = await pubsub.get_message(timeout=LISTEN_POLL_S)
                    if message is None:
                        continue
                    base = text(message["data"])
                    for wake in self._wakes.get(base, ()):
                        wake.set()
            except UNREACHABLE:
                await asyncio.sleep(RESUBSCRIBE_S)
            finally:
                with contextlib.suppress(Exception):
                    await pubsub.aclose()

    def _wake_all(self) -> None:
        for wakes in self._wakes.values():
            for wake in wakes:
                wake.set()

    async def _sweep_loop(self) -> None:
        last_refresh = -math.inf
        while not self._stopping:
            try:
                await self.check_epoch()
            except UNREACHABLE as exc:
                self._unhealthy(exc)  # noticed even when no call comes in
                await asyncio.sleep(self.shared.sweep_interval_s)
                continue
            with contextlib.suppress(*UNREACHABLE, PersistenceFailing):
                self._healthy_again()  # Redis answers: back to the shared ledger
                await self.sweep()
                if self.clock.now() - last_refresh >= MIRROR_REFRESH_S:  # metrics' gauges
                    await self.refresh()
                    last_refresh = self.clock.now()
            await asyncio.sleep(self.shared.sweep_interval_s)

    async def check_epoch(self) -> bool:
        """Notice that Redis lost its data (a restart without persistence, a failover to an
        empty replica): the epoch key this sidecar saw is gone or different. Then, for one
        refill period, every bucket that has to be created starts empty rather than full,
        on every sidecar (they read the mark), so the key never gets a fresh budget at once.
        Returns whether a loss was noticed now."""
        async with self.client.pipeline(transaction=False) as pipe:
            pipe.set(self.keys.epoch, os.urandom(8).hex(), nx=True)
            pipe.get(self.keys.epoch)
            pipe.pttl(self.keys.lost_mark)
            _, epoch, left_ms = await pipe.execute()
        return await self._note_epoch(text(epoch), int(left_ms))

    async def _note_epoch(self, epoch: str, lost_mark_left_ms: int) -> bool:
        lost = self._epoch is not None and epoch != self._epoch
        self._epoch = epoch
        if lost:
            log.warning("the shared ledger's Redis lost its data: buckets start empty for %d s",
                        LOST_DATA_SAFE_S)
            await self.client.set(self.keys.lost_mark, "1", nx=True,
                                  px=int(LOST_DATA_SAFE_S * 1000))
            lost_mark_left_ms = int(LOST_DATA_SAFE_S * 1000)
        if lost_mark_left_ms > 0:
            self._safe_until = max(self._safe_until,
                                   self.clock.now() + lost_mark_left_ms / 1000)
        return lost

    async def sweep(self) -> int:
        """Settle lapsed leases and drop dead queue entries of every tag that is due. Any
        sidecar may run it, at any time; running it twice changes nothing. Returns how many
        tags it swept."""
        seconds, micros = await self.client.time()
        now = seconds + micros / 1e6
        due = await self.client.zrangebyscore(self.keys.sweep_index, "-inf", now, 0, 500)
        for raw in due:
            base = text(raw)
            reply = await self._run(self.scripts.sweep, base, [])
            nxt, alive = text(reply[0]), int(reply[1])
            if nxt:
                await self.client.zadd(self.keys.sweep_index, {base: float(nxt)})
            elif alive:
                await self.client.zadd(self.keys.sweep_index,
                                       {base: now + self.shared.queue_entry_ttl_s})
            else:
                await self.client.zrem(self.keys.sweep_index, base)
        return len(due)

    # ---- health ------------------------------------------------------------------------------

    def _unhealthy(self, exc: BaseException) -> None:
        if self._healthy:
            if self._local is not None:
                log.error("the shared ledger on Redis is unreachable: granting from a local "
                          "ledger at %.3g of the limits until it answers: %s",
                          self.shared.local_share, exc)
            else:
                log.error("the shared ledger on Redis is unreachable, refusing grants until "
                          "it answers (fail_closed): %s", exc)
        self._healthy = False

    def _healthy_again(self) -> None:
        if not self._healthy:
            log.warning("the shared ledger on Redis answers again%s",
                        f"; delivering {len(self._outbox)} kept settlements" if self._outbox
                        else "")
            self._healthy = True
            self._wake_all()
            if self._outbox:
                self._background(self._deliver())
        self._healthy = True

    @property
    def falling_back(self) -> bool:
        """Granting from the local share while Redis is away (metric and health detail)."""
        return self._local is not None and not self._healthy

    def _emit(self, changes: list[Change]) -> None:
        for listener in self._listeners:
            listener(changes)


@dataclass(frozen=True, slots=True)
class _Mirror:
    buckets: Mapping[BucketKey, BucketView] = field(default_factory=dict)
    leases: tuple[Reservation, ...] = ()
    tags: Mapping[BucketKey, str] = field(default_factory=dict)  # key -> its tag's budget
    overloaded: Mapping[str, float] = field(default_factory=dict)  # budget -> until (0: not)
    learned: Mapping[BucketKey, Limits] = field(default_factory=dict)


MAX_TAGS_READ = 10_000


async def _read_mirror(client: Redis, keys: Keys) -> _Mirror:
    """One read of the shared state: the buckets and open leases of every tag in the sweep
    index, levels brought forward to Redis' clock; their budgets' overload marks and the
    capacities learned from the provider."""
    seconds, micros = await client.time()
    now = seconds + micros / 1e6
    bases = [text(b) for b in await client.zrange(keys.sweep_index, 0, MAX_TAGS_READ - 1)]
    async with client.pipeline(transaction=False) as pipe:
        for base in bases:
            pipe.hgetall(base + "b")
            pipe.smembers(base + "users")
            pipe.zrange(base + "l", 0, -1)
            pipe.zcard(base + "q")
            pipe.get(base + "pause")
            pipe.hgetall(base + "ln")
        per_tag = await pipe.execute()
    budgets = sorted({where[1] for b in bases if (where := keys.parse(b)) is not None})
    second: list[tuple[str, str, str]] = []  # (base, kind, name)
    async with client.pipeline(transaction=False) as pipe:
        for i, base in enumerate(bases):
            _, users, lease_ids, _, _, _ = per_tag[6 * i:6 * i + 6]
            for u in users:
                second.append((base, "u", text(u)))
                pipe.hgetall(f"{base}u:{text(u)}")
                pipe.zcard(f"{base}uq:{text(u)}")
            for rid in lease_ids:
                second.append((base, "r", text(rid)))
                pipe.hgetall(f"{base}r:{text(rid)}")
                pipe.exists(f"{base}r:{text(rid)}")
        for budget in budgets:
            pipe.get(keys.overload_mark(budget))
        more = await pipe.execute()
    marks = more[2 * len(second):]
    overloaded = {b: float(text(m)) if m else 0.0 for b, m in zip(budgets, marks, strict=True)}
    learned: dict[BucketKey, Limits] = {}
    buckets: dict[BucketKey, BucketView] = {}
    tags: dict[BucketKey, str] = {}
    open_per: dict[BucketKey, int] = {}
    leases: list[Reservation] = []
    for j, (_, kind, name) in enumerate(second):
        if kind != "r" or not more[2 * j]:
            continue
        r = _reservation_from_hash(name, more[2 * j])
        if r is not None and r.settlement is None:
            leases.append(r)
            for k in r.buckets:
                open_per[k] = open_per.get(k, 0) + 1
    for i, base in enumerate(bases):
        where = keys.parse(base)
        if where is None:
            continue
        scope, model = where
        h, _, _, depth, pause, ln = per_tag[6 * i:6 * i + 6]
        key = BucketKey(scope, model)
        paused = float(text(pause)) if pause else 0.0
        raised = {text(k): int(float(text(v))) for k, v in ln.items()}
        if raised:
            learned[key] = Limits(**{LIMIT_FIELDS[_CAP_FIELDS.index(cf)]: v
                                     for cf, v in raised.items() if cf in _CAP_FIELDS})
        if h:
            tags[key] = model
            mark = overloaded.get(model, 0.0)
            buckets[key] = _bucket_view(key, h, int(depth), paused if paused > now else 0.0,
                                        mark if mark > now else 0.0, open_per.get(key, 0), now,
                                        frozenset(RATE_DIMS[_CAP_FIELDS.index(cf)]
                                                  for cf in raised if cf in _CAP_FIELDS))
    for j, (base, kind, name) in enumerate(second):
        where = keys.parse(base)
        if kind != "u" or where is None or not more[2 * j]:
            continue
        key = BucketKey(where[0], *parse_user_bucket(name))
        tags[key] = where[1]
        buckets[key] = _bucket_view(key, more[2 * j], int(more[2 * j + 1]), 0.0, 0.0,
                                    open_per.get(key, 0), now)
    return _Mirror(buckets, tuple(leases), tags, overloaded, learned)


def _bucket_view(key: BucketKey, raw: Mapping[Any, Any], depth: int, paused: float,
                 overloaded: float, open_count: int, now: float,
                 learned: frozenset[str] = frozenset()) -> BucketView:
    h = {text(k): text(v) for k, v in raw.items()}
    elapsed = max(0.0, now - float(h.get("t", now)))
    held = h.get("hd", "000") if "h" in h else "000"  # lua/common.lua take: no refill yet
    levels = [0.0, 0.0, 0.0]
    caps: list[int | None] = [None, None, None]
    for i, (lv, cf) in enumerate(zip(("r", "i", "o"), ("cr", "ci", "co"), strict=True)):
        if cf in h:
            cap = caps[i] = int(h[cf])
            refilled = 0.0 if held[i] == "1" else cap * elapsed / 60.0
            levels[i] = min(float(cap), float(h.get(lv, 0.0)) + refilled)
    mc = int(h["cm"]) if "cm" in h else None
    return BucketView(key, (levels[0], levels[1], levels[2]), (caps[0], caps[1], caps[2]),
                      mc, int(h.get("n", 0)), depth, open_count, paused, overloaded, learned)

_RES_FIELDS = ("s", "m", "u", "q", "ri", "ro", "g", "e", "w", "st", "sa",
               "fr", "fi", "fo", "oi", "oo", "oc", "bu", "bn")


def _reservation_from_hash(rid: str, raw: Mapping[Any, Any]) -> Reservation | None:
    h = {text(k): text(v) for k, v in raw.items()}
    if "st" not in h:
        return None
    return reservation_from(["", "0", rid, *(h.get(f, "") for f in _RES_FIELDS)])
