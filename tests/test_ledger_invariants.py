"""Property tests of the ledger's invariants (hypothesis stateful testing).

Random sequences of acquire / report / release / keep-alive / cancel / time steps over two
scopes, two models and per-user limits. After every step:
- a bucket never holds more than its capacity, and its in-flight count equals its open
  reservations;
- tokens are never created: for every bucket and dimension, what was granted is covered by
  the capacity at the start, the refill since, and what was refunded;
- every reservation ends exactly once (reported, released or expired), and every waiter gets
  exactly one result, never a grant after its deadline.
"""

from __future__ import annotations

from collections import defaultdict

from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from limiterd.config.model import Config, Limits, ModelRule, Settings
from limiterd.ledger.buckets import EPS
from limiterd.ledger.errors import LedgerError
from limiterd.ledger.ledger import Granted, Ledger, Rejected, Waiter
from limiterd.ledger.model import AcquireRequest, Outcome, State

CONFIG = Config(
    settings=Settings(default_lease_s=30.0, max_waiters_per_queue=5, max_settlements=50,
                      settlement_retention_s=120.0, idle_sweep_interval_s=5.0),
    models=(ModelRule("a", Limits(6, 600, 300, 3)), ModelRule("b", Limits(60, 300, 200))),
    user_models=(ModelRule("a", Limits(3, 400, None)),),
)
CAPS = {"a": (6, 600, 300), "b": (60, 300, 200)}
USER_CAPS = (3, 400, None)


class LedgerMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.now = 1000.0
        self.start = self.now
        self.ledger = Ledger(CONFIG, self.now)
        self.open: dict[str, tuple[AcquireRequest, object]] = {}
        self.ended: dict[str, State] = {}
        self.waiters: list[Waiter] = []
        self.results: dict[int, object] = {}
        # per bucket key and dimension: tokens taken, tokens given back
        self.taken: dict[tuple[object, int], float] = defaultdict(float)
        self.given: dict[tuple[object, int], float] = defaultdict(float)

    # ---- helpers

    def _granted(self, r: object) -> None:
        from limiterd.ledger.model import Reservation

        assert isinstance(r, Reservation)
        assert r.id not in self.open and r.id not in self.ended, "granted twice"
        self.open[r.id] = (AcquireRequest(r.scope, r.model, r.user, r.reserved.input_tokens,
                                          r.reserved.output_tokens), r)
        for key in r.buckets:
            for i, amount in enumerate((1, r.reserved.input_tokens, r.reserved.output_tokens)):
                self.taken[(key, i)] += amount

    def _collect(self) -> None:
        for w in self.ledger.take_ended():
            assert w.seq not in self.results, "a waiter ended twice"
            self.results[w.seq] = w.result
            if isinstance(w.result, Granted):
                assert w.result.reservation.granted_at <= w.deadline + 1e-9, "granted late"
                self._granted(w.result.reservation)
        self.ledger.take_changes()
        for rid in list(self.open):
            r = self.ledger.get(rid)
            if r is not None and r.state is State.EXPIRED:
                self._ended(rid, State.EXPIRED, (0.0, 0.0, 0.0))

    def _ended(self, rid: str, state: State, refund: tuple[float, float, float]) -> None:
        assert rid not in self.ended, "settled twice"
        _, r = self.open.pop(rid)
        self.ended[rid] = state
        for key in r.buckets:  # type: ignore[attr-defined]
            for i in range(3):
                # Refunds only: an overrun is debt, which only makes the bound tighter.
                self.given[(key, i)] += max(0.0, refund[i])

    # ---- rules

    @rule(scope=st.sampled_from(["s1", "s2"]), model=st.sampled_from(["a", "b"]),
          user=st.sampled_from(["", "u1", "u2"]), tin=st.integers(0, 350),
          tout=st.integers(0, 250), wait=st.sampled_from([0.0, 2.0, 20.0, 20.0]))
    def acquire(self, scope: str, model: str, user: str, tin: int, tout: int, wait: float) -> None:
        req = AcquireRequest(scope, model, user, tin, tout)
        try:
            result = self.ledger.acquire(req, self.now, self.now + wait)
        except LedgerError:
            self._collect()
            return
        if isinstance(result, Granted):
            self._granted(result.reservation)
        elif isinstance(result, Waiter):
            self.waiters.append(result)
        else:
            assert isinstance(result, Rejected) and result.retry_after_s >= 0
        self._collect()

    @precondition(lambda self: self.open)
    @rule(data=st.data(), outcome=st.sampled_from(list(Outcome)),
          used_in=st.integers(0, 400), used_out=st.integers(0, 300),
          retry=st.sampled_from([0.0, 3.0]))
    def report(self, data: st.DataObject, outcome: Outcome, used_in: int, used_out: int,
               retry: float) -> None:
        rid = data.draw(st.sampled_from(list(self.open)))
        _, r = self.open[rid]
        settled, replayed = self.ledger.report(rid, used_in, used_out, outcome, retry, self.now)
        assert not replayed and settled.state is State.REPORTED
        d_in = r.reserved.input_tokens - used_in  # type: ignore[attr-defined]
        d_out = r.reserved.output_tokens - used_out  # type: ignore[attr-defined]
        self._ended(rid, State.REPORTED, (0.0, float(d_in), float(d_out)))
        again, replayed = self.ledger.report(rid, used_in, used_out, outcome, retry, self.now)
        assert replayed and again.settlement == settled.settlement
        self._collect()

    @precondition(lambda self: self.open)
    @rule(data=st.data())
    def release(self, data: st.DataObject) -> None:
        rid = data.draw(st.sampled_from(list(self.open)))
        _, r = self.open[rid]
        self.ledger.release(rid, self.now)
        res = r.reserved  # type: ignore[attr-defined]
        self._ended(rid, State.RELEASED,
                    (float(res.requests), float(res.input_tokens), float(res.output_tokens)))
        self._collect()

    @precondition(lambda self: self.open)
    @rule(data=st.data(), lease=st.sampled_from([1.0, 10.0, 60.0]))
    def keep_alive(self, data: st.DataObject, lease: float) -> None:
        rid = data.draw(st.sampled_from(list(self.open)))
        r = self.ledger.keep_alive(rid, lease, self.now)
        assert r.expires_at == self.now + lease
        self._collect()

    @precondition(lambda self: any(w.result is None for w in self.waiters))
    @rule(data=st.data())
    def cancel(self, data: st.DataObject) -> None:
        w = data.draw(st.sampled_from([w for w in self.waiters if w.result is None]))
        self.ledger.cancel_wait(w, self.now)
        assert w.result is not None
        self.results[w.seq] = w.result
        self._collect()

    @rule(dt=st.sampled_from([0.001, 0.5, 1.0, 3.0, 7.0, 31.0]))
    def tick(self, dt: float) -> None:
        self.now += dt
        self.ledger.advance(self.now)
        self._collect()

    @rule(dt=st.sampled_from([0.5, 3.0, 25.0]))
    def late_timer(self, dt: float) -> None:
        """Time passes but the engine's timer has not fired yet: the next call must still
        never grant a waiter whose deadline has passed."""
        self.now += dt

    @rule()
    def wake_on_time(self) -> None:
        """Jump to the ledger's own next wakeup, as the engine's timer would."""
        at = self.ledger.next_wakeup()
        if at is not None and at > self.now:
            self.now = min(at, self.now + 120)
        self.ledger.advance(self.now)
        self._collect()

    # ---- invariants

    @invariant()
    def buckets_within_capacity_and_in_flight_matches(self) -> None:
        in_flight: dict[object, int] = defaultdict(int)
        for _, r in self.open.values():
            for key in r.buckets:  # type: ignore[attr-defined]
                in_flight[key] += 1
        for b in self.ledger.buckets(self.now):
            for cap, level in zip(b.caps, b.levels, strict=True):
                if cap is not None:
                    assert level <= cap + EPS, f"{b.key} above capacity: {level} > {cap}"
            assert b.in_flight == in_flight.get(b.key, 0), f"{b.key} in-flight drifted"

    @invariant()
    def tokens_are_never_created(self) -> None:
        elapsed = self.now - self.start
        for (key, i), taken in self.taken.items():
            caps = USER_CAPS if key.user else CAPS[key.budget]
            cap = caps[i]
            if cap is None:
                continue
            budget = cap + cap * elapsed / 60.0 + self.given[(key, i)]
            assert taken <= budget + EPS, f"{key} dim {i}: took {taken} > {budget}"

    @invariant()
    def every_reservation_ends_once(self) -> None:
        assert not (set(self.open) & set(self.ended))
        for w in self.waiters:
            if w.result is not None:
                assert w.seq in self.results


TestLedgerInvariants = LedgerMachine.TestCase


def test_a_late_timer_never_lets_a_waiter_be_granted_after_its_deadline() -> None:
    ledger = Ledger(CONFIG, 0.0)
    first = ledger.acquire(AcquireRequest("s", "b", "", 300, 0), 0.0, 0.0)
    assert isinstance(first, Granted)
    w = ledger.acquire(AcquireRequest("s", "b", "", 100, 0), 0.0, 2.0)
    assert isinstance(w, Waiter)
    # At t=3 the deadline (2) has passed but no advance() ran yet; a release frees capacity.
    ledger.release(first.reservation.id, 3.0)
    assert isinstance(w.result, Rejected)
    assert [r for r in ledger.open_reservations()] == []
