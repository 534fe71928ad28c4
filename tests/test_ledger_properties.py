"""Property tests of the ledger against an independent model (hypothesis stateful testing).

Random acquire (with and without request ids, try-once and waiting), repeat, report, release,
keep-alive, cancel, time steps with and without the engine's timers, and restarts from a
journal folded out of take_changes(). The test keeps its own model of every bucket (capacity,
continuous refill, takes, refunds, debt) and of every reservation and waiter, and checks:
- each bucket's level equals the model's (so tokens are never created nor lost), never above
  capacity, and what was consumed fits in capacity + refill over the elapsed time;
- in-flight counts equal the open reservations per bucket;
- every reservation ends exactly once (reported, released or expired, the latter learned from
  the changes outbox); every waiter gets exactly one result, never a grant after its deadline;
- liveness (engine timers on time): after advance(now) no waiter is past its deadline, and no
  waiter that is first in line on all its buckets, unpaused and fitting, is left waiting;
- a restored ledger carries on from the journal exactly (levels, leases, pauses, ids).
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from limiterd.config.model import Config, Limits, ModelRule, Settings
from limiterd.ledger.buckets import capacities
from limiterd.ledger.errors import InvalidRequest, LedgerError, NeverFits, QueueFull
from limiterd.ledger.ledger import Granted, Ledger, Rejected, Waiter
from limiterd.ledger.model import (
    AcquireRequest,
    BucketKey,
    Outcome,
    Reservation,
    ReservationOpened,
    ReservationSettled,
    SettlementsForgotten,
    State,
)
from tests.test_ledger import FoldedJournal

CONFIG = Config(
    settings=Settings(
        default_lease_s=30.0, max_waiters_per_queue=4, max_settlements=40,
        settlement_retention_s=90.0, idle_sweep_interval_s=5.0,
        # The model refills exactly; the allowance (and how a restart cuts it short) is
        # tested in test_ledger.py, and test_ledger_invariants runs with it on.
        refill_allowance_s=0.0,
    ),
    models=(ModelRule("a", Limits(30, 600, 300, 3)), ModelRule("b", Limits(60, 300, 200))),
    user_models=(ModelRule("a", Limits(12, 400, None, 2)),),
)
# Sizes that exhaust buckets in a few grants, and some that never fit (> 300, > 400).
REQUESTS = st.tuples(
    st.builds(
        AcquireRequest,
        scope=st.sampled_from(["s1", "s1", "s2"]),
        model=st.sampled_from(["a", "a", "a", "b", "b", "zz"]),
        user=st.sampled_from(["", "u1", "u2"]),
        input_tokens=st.sampled_from([0, 60, 150, 250, 290, 350, 420]),
        max_output_tokens=st.sampled_from([0, 50, 120, 190, 250]),
        request_id=st.sampled_from(["", "", "", "", "", "k1", "k2", "k3"]),
        lease_s=st.sampled_from([None, 4.0, 20.0]),
    ),
    st.sampled_from([0.0, 1.5, 10.0, 40.0, 40.0]),  # how long the caller may wait
)
TOL = 1e-5  # float slack: the ledger's own EPS (1e-6) per grant, over a few dozen steps


def keys_for(scope: str, model: str, user: str) -> tuple[BucketKey, ...]:
    """Buckets are keyed by the budget a model draws on (the matched rule), not the model."""
    budget = CONFIG.budget_for(scope, model)
    assert budget is not None
    per_user = CONFIG.budget_for(scope, model, user=True)
    if user and per_user is not None:
        return BucketKey(scope, budget.name), BucketKey(scope, per_user.name, user)
    return (BucketKey(scope, budget.name),)


def limits_of(key: BucketKey) -> Limits:
    lim = CONFIG.budget_limits(key.scope, key.budget, user=bool(key.user))
    assert lim is not None
    return lim


@dataclass
class ModelBucket:
    """The test's own bucket: what the level must be, computed independently."""

    caps: tuple[int | None, int | None, int | None]
    levels: list[float]
    as_of: float
    first_seen: float
    granted: list[float]  # takes less refunds, since first_seen (debt is usage, not a grant)

    def refill(self, now: float) -> None:
        dt = max(0.0, now - self.as_of)
        self.as_of = max(self.as_of, now)
        for i, cap in enumerate(self.caps):
            if cap is not None:
                self.levels[i] = min(float(cap), self.levels[i] + cap * dt / 60.0)

    def add(self, amounts: tuple[float, float, float], take: bool = False) -> None:
        for i, cap in enumerate(self.caps):
            if cap is not None and amounts[i]:
                self.levels[i] = min(float(cap), self.levels[i] + amounts[i])
                if not take:  # a Report's debt goes no deeper than one capacity
                    self.levels[i] = max(-float(cap), self.levels[i])
            if take or amounts[i] > 0:
                self.granted[i] -= amounts[i]


class LedgerMachine(RuleBasedStateMachine):
    START = 1000.0

    def __init__(self) -> None:
        super().__init__()
        self.now = self.START
        self.ledger = Ledger(CONFIG, self.now)
        self.journal = FoldedJournal()
        self.model: dict[BucketKey, ModelBucket] = {}
        self.open: dict[str, Reservation] = {}
        self.ended: dict[str, State] = {}
        self.pending: list[Waiter] = []  # still waiting (seq restarts with a new ledger)
        self.results: dict[Waiter, object] = {}
        self.rids: dict[tuple[str, str], tuple[AcquireRequest, str | Waiter]] = {}
        self.pauses: dict[tuple[str, str], float] = {}
        self.timers_on_time = True
        self.probed: Waiter | None = None  # repeated with wait 0: answered at its deadline

    # ---- the model

    def _bucket(self, key: BucketKey) -> ModelBucket:
        b = self.model.get(key)
        if b is None:
            caps = capacities(limits_of(key))
            b = self.model[key] = ModelBucket(
                caps, [float(c or 0) for c in caps], self.now, self.now, [0.0, 0.0, 0.0]
            )
        b.refill(self.now)
        return b

    def _take(self, r: Reservation) -> None:
        assert r.id not in self.open and r.id not in self.ended, "granted twice"
        assert r.granted_at == self.now
        self.open[r.id] = r
        for key in r.buckets:
            self._bucket(key).add(
                (-r.reserved.requests, -r.reserved.input_tokens, -r.reserved.output_tokens),
                take=True,
            )

    def _settled(self, rid: str, state: State, give: tuple[float, float, float]) -> None:
        assert rid in self.open and rid not in self.ended, f"{rid} settled twice or unknown"
        r = self.open.pop(rid)
        self.ended[rid] = state
        for key in r.buckets:
            self._bucket(key).add(give)

    def _after(self, direct: Reservation | None = None) -> None:
        """Fold what the ledger says happened during the last call into the model."""
        changes = self.ledger.take_changes()
        self.journal.write(changes)
        opened = {c.reservation.id for c in changes if isinstance(c, ReservationOpened)}
        for c in changes:
            if isinstance(c, ReservationSettled) and c.settlement.state is State.EXPIRED:
                r = self.open[c.reservation_id]
                assert c.settlement.settled_at >= r.expires_at
                assert c.settlement.refunded.input_tokens == 0
                self._settled(c.reservation_id, State.EXPIRED, (0.0, 0.0, 0.0))
            elif isinstance(c, SettlementsForgotten):
                for rid in c.ids:
                    assert rid in self.ended
                for k, (_, held) in list(self.rids.items()):
                    if isinstance(held, str) and held in c.ids:
                        del self.rids[k]
        granted = [direct] if direct is not None else []
        for w in self.ledger.take_ended():
            assert w in self.pending and w not in self.results, "a waiter ended twice"
            assert w.result is not None
            self.pending.remove(w)
            self.results[w] = w.result
            key = (w.request.scope, w.request.request_id)
            if isinstance(w.result, Granted):
                r = w.result.reservation
                assert r.granted_at < w.deadline or (
                    w is self.probed and r.granted_at == w.deadline
                ), "granted at or after its deadline"
                assert r.waited_s == r.granted_at - w.enqueued_at
                granted.append(r)
                if w.request.request_id:
                    self.rids[key] = (w.request, r.id)
            else:
                assert w.result.retry_after_s >= 0
                assert self.now >= w.deadline, "rejected before its deadline"
                if w.request.request_id and self.rids.get(key, (None, None))[1] is w:
                    del self.rids[key]
        assert opened == {r.id for r in granted}, "the outbox and the grants disagree"
        for r in granted:
            self._take(r)
        self.probed = None

    # ---- rules

    @rule(burst=st.lists(REQUESTS, min_size=1, max_size=4))
    def acquire(self, burst: list[tuple[AcquireRequest, float]]) -> None:
        """A few callers at the same moment: enough to exhaust buckets and build queues."""
        for req, wait in burst:
            self._acquire(req, wait)

    @precondition(lambda self: self.rids)
    @rule(data=st.data(), wait=st.sampled_from([0.5, 10.0, 40.0]))
    def repeat(self, data: st.DataObject, wait: float) -> None:
        """The same request again (a client retry after a lost answer)."""
        req, _ = self.rids[data.draw(st.sampled_from(sorted(self.rids)))]
        self._acquire(req, wait)

    def _acquire(self, req: AcquireRequest, wait: float) -> None:
        prior = self.rids.get((req.scope, req.request_id)) if req.request_id else None
        if req.model != "zz":
            for key in keys_for(req.scope, req.model, req.user):
                self._bucket(key)
        try:
            result = self.ledger.acquire(req, self.now, self.now + wait)
        except InvalidRequest as e:
            assert (e.field == "model") == (req.model == "zz" and prior is None)
            if e.field == "request_id":
                assert prior is not None and prior[0] != req
            self._after()
            return
        except (NeverFits, QueueFull):
            assert prior is None
            self._after()
            return
        assert req.model != "zz" or prior is not None
        if prior is not None:
            preq, held = prior
            assert (preq.scope, preq.model, preq.user, preq.input_tokens,
                    preq.max_output_tokens) == (req.scope, req.model, req.user,
                                                req.input_tokens, req.max_output_tokens)
            if isinstance(held, Waiter):
                assert held.deadline == self.now + wait
                if wait > 0:
                    assert result is held
                else:  # will not wait: answered now, and the waiter ends with that answer
                    assert result is held.result
                    self.probed = held
            else:
                assert isinstance(result, Granted) and result.replayed
                assert result.reservation.id == held
            self._after()
            return
        if isinstance(result, Granted):
            assert not result.replayed
            if req.request_id:
                self.rids[(req.scope, req.request_id)] = (req, result.reservation.id)
            self._after(result.reservation)
        elif isinstance(result, Waiter):
            assert wait > 0 and result.result is None
            self.pending.append(result)
            if req.request_id:
                self.rids[(req.scope, req.request_id)] = (req, result)
            self._after()
        else:
            assert isinstance(result, Rejected) and wait == 0.0 and result.retry_after_s > 0
            self._after()

    @precondition(lambda self: self.open)
    @rule(data=st.data(), outcome=st.sampled_from(list(Outcome)),
          used_in=st.integers(0, 500), used_out=st.integers(0, 300),
          retry=st.sampled_from([0.0, 0.0, 4.0]))
    def report(self, data: st.DataObject, outcome: Outcome, used_in: int, used_out: int,
               retry: float) -> None:
        rid = data.draw(st.sampled_from(list(self.open)))
        r = self.open[rid]
        settled, replayed = self.ledger.report(rid, used_in, used_out, outcome, retry, self.now)
        assert not replayed and settled.state is State.REPORTED
        if outcome is Outcome.RATE_LIMITED and retry > 0:
            k = (r.scope, r.buckets[0].budget)
            self.pauses[k] = max(self.pauses.get(k, 0.0), self.now + retry)
        self._settled(rid, State.REPORTED, (0.0, float(r.reserved.input_tokens - used_in),
                                            float(r.reserved.output_tokens - used_out)))
        self._after()
        # The same Report again is answered as the first; a different one is refused.
        again, replayed = self.ledger.report(rid, used_in, used_out, outcome, retry, self.now)
        assert replayed and again == settled
        if (used_in, used_out, outcome) != (used_in + 1, used_out, Outcome.OK):
            try:
                self.ledger.report(rid, used_in + 1, used_out, Outcome.OK, 0.0, self.now)
                raise AssertionError("a Report with other figures must be refused")
            except LedgerError:
                pass
        assert self.ledger.take_changes() == [] and self.ledger.take_ended() == []

    @precondition(lambda self: self.open)
    @rule(data=st.data())
    def release(self, data: st.DataObject) -> None:
        rid = data.draw(st.sampled_from(list(self.open)))
        r = self.open[rid]
        settled, replayed = self.ledger.release(rid, self.now)
        assert not replayed and settled.state is State.RELEASED
        res = r.reserved
        self._settled(rid, State.RELEASED,
                      (float(res.requests), float(res.input_tokens), float(res.output_tokens)))
        self._after()
        try:
            self.ledger.report(rid, 0, 0, Outcome.OK, 0.0, self.now)
            raise AssertionError("report after release must be refused")
        except LedgerError:
            pass

    @precondition(lambda self: self.open)
    @rule(data=st.data(), lease=st.sampled_from([None, 2.0, 15.0, 60.0]))
    def keep_alive(self, data: st.DataObject, lease: float | None) -> None:
        rid = data.draw(st.sampled_from(list(self.open)))
        r = self.ledger.keep_alive(rid, lease, self.now)
        expected = self.now + (lease if lease is not None else CONFIG.settings.default_lease_s)
        assert r.expires_at == expected
        self.open[rid] = r
        self._after()

    @precondition(lambda self: self.pending)
    @rule(data=st.data())
    def cancel(self, data: st.DataObject) -> None:
        w = data.draw(st.sampled_from(self.pending))
        self.pending.remove(w)
        self.ledger.cancel_wait(w, self.now)
        assert w.result == Rejected(0.0)
        self.results[w] = w.result
        key = (w.request.scope, w.request.request_id)
        if w.request.request_id and self.rids.get(key, (None, None))[1] is w:
            del self.rids[key]
        self._after()

    @rule(dt=st.sampled_from([0.001, 0.5, 1.0, 3.0, 7.0, 31.0]))
    def tick(self, dt: float) -> None:
        self.now += dt
        self.ledger.advance(self.now)
        self.timers_on_time = True
        self._after()

    @rule()
    def wake_on_time(self) -> None:
        """Jump to the ledger's own next wakeup, as the engine's timer would."""
        at = self.ledger.next_wakeup()
        if at is not None and at > self.now:
            self.now = min(at, self.now + 100.0)
        self.ledger.advance(self.now)
        self.timers_on_time = True
        self._after()

    @rule(dt=st.sampled_from([0.5, 3.0, 25.0]))
    def late_timer(self, dt: float) -> None:
        """Time passes, the engine's timer has not fired: the next call must still be honest."""
        self.now += dt
        self.timers_on_time = False

    @rule(down=st.sampled_from([0.0, 5.0, 45.0]))
    def restart(self, down: float) -> None:
        """Crash and restart from the journal (waiters are lost with their connections)."""
        self.journal.write(self.ledger.take_changes())
        self.ledger.take_ended()
        for w in self.pending:
            self.results[w] = "lost"
            key = (w.request.scope, w.request.request_id)
            if w.request.request_id and self.rids.get(key, (None, None))[1] is w:
                del self.rids[key]
        self.pending = []
        self.now += down
        self.ledger = Ledger(CONFIG, self.now)
        self.ledger.restore(self.journal.snapshot(), self.now)
        for (scope, budget), until in self.pauses.items():
            assert self.ledger.paused_until(scope, budget, self.now) == (
                until if until > self.now else 0.0
            )
        self.ledger.advance(self.now)
        self.timers_on_time = True
        self._after()

    # ---- invariants

    @invariant()
    def levels_match_the_model_and_capacity(self) -> None:
        seen = set()
        for b in self.ledger.buckets(self.now):
            seen.add(b.key)
            m = self._bucket(b.key)
            assert b.caps == m.caps
            for i, cap in enumerate(b.caps):
                if cap is None:
                    continue
                assert b.levels[i] <= cap, f"{b.key} above capacity"
                assert abs(b.levels[i] - m.levels[i]) <= TOL * max(1, cap), (
                    f"{b.key} dim {i}: ledger {b.levels[i]} != model {m.levels[i]}"
                )
        for key, m in self.model.items():
            m.refill(self.now)
            if key not in seen:  # dropped: only ever when full
                for cap, level in zip(m.caps, m.levels, strict=True):
                    assert cap is None or level >= cap - TOL * cap, f"{key} dropped not full"
            budget_time = self.now - m.first_seen
            for i, cap in enumerate(m.caps):
                if cap is not None:
                    assert m.granted[i] <= cap + cap * budget_time / 60.0 + TOL * cap, (
                        f"{key} dim {i}: tokens created"
                    )

    @invariant()
    def in_flight_equals_open_reservations(self) -> None:
        in_flight: dict[BucketKey, int] = defaultdict(int)
        for r in self.open.values():
            for key in r.buckets:
                in_flight[key] += 1
        for b in self.ledger.buckets(self.now):
            assert b.in_flight == in_flight.get(b.key, 0), f"{b.key} in-flight drifted"
        assert self.ledger.open_count == len(self.open)
        assert {r.id for r in self.ledger.open_reservations()} == set(self.open)
        for rid, state in self.ended.items():
            known = self.ledger.get(rid)
            assert known is None or known.state is state
        assert self.ledger.waiting_count == len(self.pending)

    @invariant()
    def waiters_move_when_they_can(self) -> None:
        if not self.timers_on_time:
            return
        levels = {b.key: b for b in self.ledger.buckets(self.now)}
        for w in self.pending:
            assert w.deadline > self.now, "a waiter outlived its deadline"
            if any(o.seq < w.seq and set(o.queue) & set(w.queue) for o in self.pending):
                continue  # someone older is first in line on a bucket it needs
            if self.ledger.paused_until(w.queue[0].scope, w.queue[0].budget, self.now):
                continue
            fits = True
            for key in w.queue:
                b = levels[key]
                for i, cap in enumerate(b.caps):
                    if cap is not None and b.levels[i] < w.amounts[i] + 1e-4:
                        fits = False
                mc = b.limits.max_concurrent
                if mc is not None and b.in_flight >= mc:
                    fits = False
            assert not fits, f"waiter {w.request} fits at {self.now} but still waits"


TestLedgerModel = LedgerMachine.TestCase


class UnixTimeLedgerMachine(LedgerMachine):
    """The same at realistic unix times, where a float second has only ~2.4e-7 s of
    resolution (see test_waiter_is_granted_on_time_at_realistic_unix_times)."""

    START = 1_700_000_000.0


UnixTimeLedgerMachine.TestCase.settings = settings(max_examples=settings().max_examples // 2)
TestLedgerModelAtUnixTime = UnixTimeLedgerMachine.TestCase
