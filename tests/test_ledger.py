"""Example-based tests of the pure ledger (limiterd/ledger/ledger.py).

The ledger takes `now` from its caller, so the tests are the clock: they pass increasing
`now` values. T0 is a realistic unix time on purpose: float rounding at 1.7e9 s is what
production sees (an ulp is ~2.4e-7 s there), and some bugs only show at that scale.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

import pytest

from limiterd.config.model import Config, Limits, ModelRule, Settings
from limiterd.ledger.errors import AlreadySettled, InvalidRequest, NeverFits, NotFound, QueueFull
from limiterd.ledger.ledger import CONCURRENCY_RETRY_S, Granted, Ledger, Rejected, Waiter
from limiterd.ledger.model import (
    AcquireRequest,
    Amounts,
    BucketDropped,
    BucketKey,
    BucketLevels,
    Change,
    LeaseExtended,
    Outcome,
    PauseSet,
    Reservation,
    ReservationOpened,
    ReservationSettled,
    SettlementsForgotten,
    Snapshot,
    State,
)

T0 = 1_700_000_000.0
SHARED = BucketKey("s", "m")

# 60 requests, 600 input, 300 output per minute: 1 request, 10 and 5 tokens per second.
M = Limits(60, 600, 300)


def config(
    models: dict[str, Limits] | None = None,
    users: dict[str, Limits] | None = None,
    **settings: Any,
) -> Config:
    # Exact refill arithmetic here; the refill allowance has its own tests (0 unless given).
    return Config(
        settings=Settings(**{"refill_allowance_s": 0.0, **settings}),
        models=tuple(ModelRule(k, v) for k, v in (models or {"m": M}).items()),
        user_models=tuple(ModelRule(k, v) for k, v in (users or {}).items()),
    )


def req(
    inp: int = 0,
    out: int = 0,
    *,
    model: str = "m",
    user: str = "",
    scope: str = "s",
    rid: str = "",
    lease: float | None = None,
) -> AcquireRequest:
    return AcquireRequest(scope, model, user, inp, out, request_id=rid, lease_s=lease)


def grant(led: Ledger, r: AcquireRequest, now: float) -> Reservation:
    result = led.acquire(r, now, now)
    assert isinstance(result, Granted), result
    return result.reservation


def wait(led: Ledger, r: AcquireRequest, now: float, deadline: float) -> Waiter:
    result = led.acquire(r, now, deadline)
    assert isinstance(result, Waiter), result
    return result


def levels(led: Ledger, key: BucketKey, now: float) -> tuple[float, ...]:
    for b in led.buckets(now):
        if b.key == key:
            return tuple(b.levels)
    raise AssertionError(f"no bucket {key}")


def bucket(led: Ledger, key: BucketKey, now: float) -> Any:
    return next(b for b in led.buckets(now) if b.key == key)


def wake(led: Ledger, until: float) -> float:
    """Run the ledger's timers as the engine would, up to `until`; returns the last time."""
    now = T0
    while (at := led.next_wakeup()) is not None and at <= until:
        now = at
        led.advance(now)
    return now


# ---- grants and refill ----------------------------------------------------------------------


def test_grant_takes_every_dimension_and_a_concurrency_slot() -> None:
    led = Ledger(config({"m": Limits(60, 600, 300, 2)}), T0)
    r = grant(led, req(100, 50, lease=30.0), T0)
    assert r.reserved == Amounts(1, 100, 50)
    assert r.buckets == (SHARED,)
    assert (r.granted_at, r.expires_at, r.waited_s) == (T0, T0 + 30.0, 0.0)
    assert levels(led, SHARED, T0) == (59.0, 500.0, 250.0)
    assert bucket(led, SHARED, T0).in_flight == 1
    assert led.open_count == 1 and led.get(r.id) == r


@pytest.mark.parametrize(
    ("limits", "first", "second"),
    [
        (Limits(2, 600, 300), [req(), req()], req()),  # requests
        (Limits(60, 600, 300), [req(590)], req(20)),  # input tokens
        (Limits(60, 600, 300), [req(0, 295)], req(0, 10)),  # output tokens
        (Limits(60, 600, 300, 1), [req()], req()),  # concurrency
    ],
    ids=["requests", "input", "output", "concurrency"],
)
def test_grant_is_all_or_nothing(
    limits: Limits, first: list[AcquireRequest], second: AcquireRequest
) -> None:
    led = Ledger(config({"m": limits}), T0)
    for r in first:
        grant(led, r, T0)
    before = levels(led, SHARED, T0)
    in_flight = bucket(led, SHARED, T0).in_flight
    led.take_changes()
    result = led.acquire(replace(second, input_tokens=second.input_tokens), T0, T0)
    assert isinstance(result, Rejected) and result.retry_after_s > 0
    assert levels(led, SHARED, T0) == before  # no dimension was touched
    assert bucket(led, SHARED, T0).in_flight == in_flight
    assert led.take_changes() == [] and led.waiting_count == 0


def test_refill_is_continuous_and_never_above_capacity() -> None:
    led = Ledger(config(), T0)
    grant(led, req(), T0)  # creates the bucket
    led.release(next(led.open_reservations()).id, T0)
    for _ in range(60):
        grant(led, req(10, 5), T0)
    assert levels(led, SHARED, T0) == pytest.approx((0.0, 0.0, 0.0), abs=1e-9)
    assert levels(led, SHARED, T0 + 30) == pytest.approx((30.0, 300.0, 150.0))
    assert levels(led, SHARED, T0 + 45) == pytest.approx((45.0, 450.0, 225.0))
    assert levels(led, SHARED, T0 + 60) == pytest.approx((60.0, 600.0, 300.0))
    assert levels(led, SHARED, T0 + 3600) == (60.0, 600.0, 300.0)  # capped, exactly


def test_a_burst_from_full_refills_only_after_the_allowance() -> None:
    """Issue 15: the provider starts refilling when a request arrives, after the grant. A
    burst takes a full bucket (300 output/min, 5 per s) down; a caller waiting for the exact
    refill of 10 tokens is granted 2 s + the allowance after it, never sooner."""
    led = Ledger(config(refill_allowance_s=0.1), T0)
    grant(led, req(0, 200), T0)  # from full: output is charged 0.1 s of refill (0.5)
    grant(led, req(0, 100), T0 + 0.1)  # already below capacity: no new charge
    assert levels(led, SHARED, T0 + 0.1)[2] == pytest.approx(0.0, abs=1e-5)  # T0 + 0.1 rounds
    w = wait(led, req(0, 10), T0 + 0.1, T0 + 60)
    at = led.next_wakeup()
    assert at is not None and at - T0 == pytest.approx(2.1)
    assert led.wait_status(w, T0 + 0.1)[1] == pytest.approx(2.0)
    led.advance(T0 + 2.09)
    assert w.result is None and levels(led, SHARED, T0 + 2.09)[2] == pytest.approx(9.95)
    led.advance(T0 + 2.1)
    assert isinstance(w.result, Granted) and w.result.reservation.granted_at == T0 + 2.1


def test_a_restart_inside_the_allowance_keeps_it() -> None:
    """The allowance is charged to the level taken from full, which is journaled: a restart
    within 100 ms of a burst keeps it (the waiter is granted 2 s + 0.1 s after the burst)."""
    cfg = config(refill_allowance_s=0.1)
    led, journal = Ledger(cfg, T0), FoldedJournal()
    grant(led, req(0, 300), T0)
    journal.write(led.take_changes())
    again = Ledger(cfg, T0 + 0.05)
    again.restore(journal.snapshot(), T0 + 0.05)
    wait(again, req(0, 10), T0 + 0.05, T0 + 60)
    at = again.next_wakeup()
    assert at is not None and at - T0 == pytest.approx(2.1)


def test_the_allowance_holds_back_only_the_dimension_taken_from_full() -> None:
    """A grant that finds its requests dimension full (the usual case when requests are not
    the scarce limit) charges the allowance to requests only: the tokens, already below
    capacity and refilling on the provider's side too, keep refilling. Holding the whole
    bucket back lost 0.1 s of token refill per grant."""
    led = Ledger(config(refill_allowance_s=0.1), T0)
    grant(led, req(0, 300), T0)  # output from full: output is charged 0.1 s (0.5 tokens)
    led.advance(T0 + 30)  # requests refill to full again; output is at 150 - 0.5
    assert levels(led, SHARED, T0 + 30)[2] == pytest.approx(149.5)
    grant(led, req(0, 100), T0 + 30)  # requests from full, output from 149.5
    assert levels(led, SHARED, T0 + 31)[2] == pytest.approx(49.5 + 5.0)  # output refilled


def test_no_allowance_when_it_is_off() -> None:
    led = Ledger(config(refill_allowance_s=0.0), T0)
    grant(led, req(0, 300), T0)
    w = wait(led, req(0, 10), T0, T0 + 60)
    at = led.next_wakeup()
    assert at is not None and at - T0 == pytest.approx(2.0)
    led.advance(T0 + 2)
    assert isinstance(w.result, Granted)


def test_unlimited_dimensions_are_not_checked() -> None:
    led = Ledger(config({"m": Limits(None, 100, None)}), T0)
    grant(led, req(100, 10**9), T0)
    assert isinstance(led.acquire(req(1), T0, T0), Rejected)
    grant(led, req(0, 10**9), T0)


# ---- FIFO -----------------------------------------------------------------------------------


def test_waiter_is_granted_exactly_when_refill_allows() -> None:
    led = Ledger(config(), T0)
    grant(led, req(600), T0)  # input empty; refills 10 tokens per second
    w = wait(led, req(100), T0 + 2, T0 + 60)
    assert led.next_wakeup() == pytest.approx(T0 + 10)
    led.advance(T0 + 9.9)
    assert w.result is None
    at = led.next_wakeup()
    assert at is not None and at == pytest.approx(T0 + 10)
    led.advance(at)
    assert isinstance(w.result, Granted)
    r = w.result.reservation
    assert r.granted_at == at and r.waited_s == pytest.approx(8.0)
    assert led.take_ended() == [w]
    assert levels(led, SHARED, at)[1] == pytest.approx(0.0, abs=1e-6)


def test_big_head_is_not_starved_by_later_small_requests() -> None:
    led = Ledger(config(), T0)
    grant(led, req(600), T0)
    big = wait(led, req(500), T0, T0 + 300)
    small = [wait(led, req(10), T0 + 1 + i, T0 + 300) for i in range(5)]
    # At T0+6, 60 tokens are back: every small one would fit, but the big head comes first.
    led.advance(T0 + 6)
    assert big.result is None and all(s.result is None for s in small)
    wake(led, T0 + 50)
    assert isinstance(big.result, Granted)
    assert big.result.reservation.granted_at == pytest.approx(T0 + 50)
    assert all(s.result is None for s in small)
    # The small ones follow, in order, as the refill allows: one per second.
    wake(led, T0 + 55 + 1e-6)
    granted = [s.result.reservation.granted_at for s in small if isinstance(s.result, Granted)]
    assert granted == pytest.approx([T0 + 51 + i for i in range(5)])


def test_newcomer_waits_behind_a_queue_even_if_it_fits() -> None:
    led = Ledger(config(), T0)
    grant(led, req(600), T0)
    head = wait(led, req(300), T0, T0 + 300)
    led.advance(T0 + 20)  # 200 back: the newcomer's 100 fits, but the head was first
    assert isinstance(led.acquire(req(100), T0 + 20, T0 + 20), Rejected)
    late = wait(led, req(100), T0 + 20, T0 + 300)
    wake(led, T0 + 40)
    assert isinstance(head.result, Granted) and isinstance(late.result, Granted)
    assert head.result.reservation.granted_at < late.result.reservation.granted_at


def test_waiter_is_granted_on_time_at_realistic_unix_times() -> None:
    led = Ledger(config({"m": Limits(None, 60_000, None)}), T0)
    grant(led, req(60_000), T0)  # 1000 tokens per second
    w = wait(led, req(50_001), T0, T0 + 120)
    wake(led, T0 + 51)  # capacity is back at T0 + 50.001
    assert isinstance(w.result, Granted)


# ---- user limits ----------------------------------------------------------------------------


USERS = config({"m": Limits(60, 600, 300)}, {"m": Limits(10, 200, 100)})


def test_user_request_takes_the_shared_and_its_own_user_bucket() -> None:
    led = Ledger(USERS, T0)
    r = grant(led, req(50, 20, user="alice"), T0)
    alice = BucketKey("s", "m", "alice")
    assert r.buckets == (SHARED, alice)
    assert levels(led, SHARED, T0) == (59.0, 550.0, 280.0)
    assert levels(led, alice, T0) == (9.0, 150.0, 80.0)
    # No user given: only the shared bucket.
    assert grant(led, req(10), T0).buckets == (SHARED,)
    # Users are not limited for a model without user_models: only the shared bucket.
    led2 = Ledger(config({"m": M, "n": M}, {"m": Limits(10)}), T0)
    assert grant(led2, req(model="n", user="alice"), T0).buckets == (BucketKey("s", "n"),)


def test_user_bucket_caps_a_user_below_the_shared_limit() -> None:
    led = Ledger(USERS, T0)
    grant(led, req(200, user="alice"), T0)
    rejected = led.acquire(req(50, user="alice"), T0, T0)
    assert isinstance(rejected, Rejected)
    assert rejected.retry_after_s == pytest.approx(50 / (200 / 60))
    grant(led, req(200, user="bob"), T0)


def test_one_exhausted_user_does_not_block_another_user() -> None:
    led = Ledger(USERS, T0)
    grant(led, req(200, user="alice"), T0)  # alice's input is empty; shared has 400
    alice = wait(led, req(100, user="alice"), T0, T0 + 120)
    bob = led.acquire(req(150, user="bob"), T0 + 1, T0 + 1)
    assert isinstance(bob, Granted), "bob waits on nothing he lacks"
    carol = led.acquire(req(10, user="carol"), T0 + 1, T0 + 60)
    assert isinstance(carol, Granted)
    wake(led, T0 + 30)
    assert isinstance(alice.result, Granted)
    assert alice.result.reservation.granted_at == pytest.approx(T0 + 30)


def test_shared_bucket_is_first_come_first_served_across_users() -> None:
    led = Ledger(USERS, T0)
    for u in ("u1", "u2", "u3"):
        grant(led, req(200, user=u), T0)  # shared input is now empty
    alice = wait(led, req(150, user="alice"), T0, T0 + 120)  # lacks only the shared bucket
    bob = led.acquire(req(10, user="bob"), T0 + 2, T0 + 120)  # 20 back: bob would fit
    assert isinstance(bob, Waiter), "bob must not jump ahead of alice on the shared bucket"
    wake(led, T0 + 15.5)
    assert isinstance(alice.result, Granted) and bob.result is None
    assert alice.result.reservation.granted_at == pytest.approx(T0 + 15)
    wake(led, T0 + 17)
    assert isinstance(bob.result, Granted)
    assert bob.result.reservation.granted_at == pytest.approx(T0 + 16)


def test_user_concurrency_limit() -> None:
    led = Ledger(config({"m": M}, {"m": Limits(max_concurrent=1)}), T0)
    first = grant(led, req(user="alice"), T0)
    w = wait(led, req(user="alice"), T0, T0 + 60)
    grant(led, req(user="bob"), T0)
    led.release(first.id, T0 + 1)
    assert isinstance(w.result, Granted) and w.result.reservation.waited_s == 1.0


# ---- deadlines ----------------------------------------------------------------------------------


def test_waiter_times_out_at_its_deadline_with_a_retry_estimate() -> None:
    led = Ledger(config(), T0)
    grant(led, req(600), T0)
    w = wait(led, req(300), T0, T0 + 10)  # needs 30 s; may wait only 10
    assert led.next_wakeup() == T0 + 10
    led.advance(T0 + 10)
    assert isinstance(w.result, Rejected)
    assert w.result.retry_after_s == pytest.approx(20.0)
    assert led.take_ended() == [w] and led.waiting_count == 0
    first = w.result
    wake(led, T0 + 60)
    assert w.result is first and led.take_ended() == []  # ended once; never granted later
    assert led.open_count == 1


def test_capacity_freed_after_the_deadline_never_grants_the_waiter() -> None:
    led = Ledger(config(), T0)
    first = grant(led, req(600), T0)
    w = wait(led, req(300), T0, T0 + 5)
    # The engine's timer is late: no advance() ran, and a release at T0+7 frees everything.
    led.release(first.id, T0 + 7)
    assert isinstance(w.result, Rejected) and w.result.retry_after_s >= 0
    assert led.open_count == 0
    assert levels(led, SHARED, T0 + 7) == (60.0, 600.0, 300.0)


def test_advance_past_deadline_and_refill_time_rejects_not_grants() -> None:
    """A coarse advance: the deadline passed before the capacity came back."""
    led = Ledger(config(), T0)
    grant(led, req(600), T0)
    w = wait(led, req(300), T0, T0 + 20)  # capacity at T0+30, deadline T0+20
    led.advance(T0 + 25)
    assert isinstance(w.result, Rejected) and w.result.retry_after_s == pytest.approx(5.0)


def test_repeat_with_a_new_deadline_moves_the_wait() -> None:
    led = Ledger(config(), T0)
    grant(led, req(600), T0)
    w = wait(led, req(300, rid="r1"), T0, T0 + 10)
    again = led.acquire(req(300, rid="r1"), T0 + 5, T0 + 60)
    assert again is w and w.deadline == T0 + 60
    led.advance(T0 + 10)  # the first caller's deadline no longer applies
    assert w.result is None
    wake(led, T0 + 31)
    assert isinstance(w.result, Granted) and w.result.reservation.waited_s == pytest.approx(30)



def test_repeat_with_try_once_at_enqueue_time_is_never_granted_late() -> None:
    led = Ledger(config(), T0)
    first = grant(led, req(600), T0)
    w = wait(led, req(300, rid="x"), T0, T0 + 60)
    again = led.acquire(req(300, rid="x"), T0, T0)  # the same caller retries: try once
    assert isinstance(again, Rejected) and w.result is again
    led.release(first.id, T0 + 5)  # the engine's timer for T0 has not fired yet
    assert not isinstance(w.result, Granted), "granted at T0+5, deadline was T0"


def test_repeat_that_will_not_wait_ends_the_waiter_at_once() -> None:
    """The case hypothesis found (test_ledger_properties): 'k1' waits up to 1.5 s; then in one
    burst a try-once and 'k1' again with wait 0. The repeat moved the deadline to now and left
    the waiter queued past it, for a timer to reject later. It is answered at once instead,
    and the earlier caller hears the same answer through take_ended()."""
    led = Ledger(config(), T0)
    grant(led, req(600), T0)
    w = wait(led, req(100, rid="k1"), T0, T0 + 1.5)
    assert isinstance(led.acquire(req(50), T0, T0), Rejected)
    again = led.acquire(req(100, rid="k1"), T0, T0)
    assert isinstance(again, Rejected) and again.retry_after_s == pytest.approx(10)
    assert w.result is again and led.take_ended() == [w]
    assert led.waiting_count == 0
    w2 = led.acquire(req(100, rid="k1"), T0, T0 + 60)  # the request_id is free again
    assert isinstance(w2, Waiter) and w2 is not w


def test_repeat_that_will_not_wait_is_granted_when_it_fits() -> None:
    """The engine's timer is late: the waiter fits by now, so the try-once repeat gets it."""
    led = Ledger(config(), T0)
    grant(led, req(600), T0)
    w = wait(led, req(100, rid="k1"), T0, T0 + 60)
    again = led.acquire(req(100, rid="k1"), T0 + 10, T0 + 10)
    assert isinstance(again, Granted) and not again.replayed and w.result is again
    assert again.reservation.waited_s == pytest.approx(10)
    assert led.take_ended() == [w] and led.waiting_count == 0

# ---- try once ------------------------------------------------------------------------------------


def test_try_once_retry_after_is_deficit_over_rate() -> None:
    led = Ledger(config(), T0)
    grant(led, req(500, 250), T0)  # input 100 left (10/s), output 50 left (5/s)
    r = led.acquire(req(400, 40), T0, T0)
    assert isinstance(r, Rejected)
    assert r.retry_after_s == pytest.approx((400 - 100) / (600 / 60))  # 30 s
    r = led.acquire(req(50, 200), T0, T0)
    assert isinstance(r, Rejected)
    assert r.retry_after_s == pytest.approx((200 - 50) / (300 / 60))  # 30 s, output-bound
    r = led.acquire(req(250, 200), T0 + 10, T0 + 10)  # input 200, output 100 by now
    assert isinstance(r, Rejected) and r.retry_after_s == pytest.approx(20.0)
    # Try-once leaves nothing behind.
    assert led.waiting_count == 0 and led.take_ended() == []
    # And the estimate is honest: at that time it is granted.
    grant(led, req(250, 200), T0 + 30)


def test_try_once_counts_the_demand_queued_ahead() -> None:
    led = Ledger(config(), T0)
    grant(led, req(600), T0)
    wait(led, req(300), T0, T0 + 120)
    wait(led, req(100), T0, T0 + 120)
    r = led.acquire(req(50), T0, T0)
    assert isinstance(r, Rejected)
    assert r.retry_after_s == pytest.approx((300 + 100 + 50) / 10)


def test_try_once_for_a_concurrency_slot_gets_the_short_retry() -> None:
    led = Ledger(config({"m": Limits(60, 600, 300, 1)}), T0)
    grant(led, req(), T0)
    r = led.acquire(req(), T0, T0)
    assert r == Rejected(CONCURRENCY_RETRY_S)


def test_cancel_frees_the_queue_slot_and_lets_the_next_waiter_in() -> None:
    led = Ledger(config(max_waiters_per_queue=2), T0)
    grant(led, req(550), T0)  # 50 left
    big = wait(led, req(500), T0, T0 + 120)
    small = wait(led, req(40), T0, T0 + 120)  # would fit, but queued behind big
    with pytest.raises(QueueFull):
        led.acquire(req(1), T0, T0 + 120)
    led.cancel_wait(big, T0 + 1)
    assert big.result == Rejected(0.0)
    assert isinstance(small.result, Granted), "the next waiter moves up at once"
    assert small.result.reservation.granted_at == T0 + 1
    assert led.take_ended() == [small]  # the cancelled one is the caller's own business
    assert isinstance(led.acquire(req(1), T0 + 1, T0 + 120), Granted | Waiter)
    led.cancel_wait(big, T0 + 2)  # twice: no effect
    assert big.result == Rejected(0.0)


def test_cancel_of_a_granted_waiter_changes_nothing() -> None:
    led = Ledger(config(), T0)
    first = grant(led, req(600), T0)
    w = wait(led, req(100), T0, T0 + 60)
    led.release(first.id, T0 + 1)
    assert isinstance(w.result, Granted)
    led.cancel_wait(w, T0 + 1)
    assert isinstance(w.result, Granted)
    assert led.get(w.result.reservation.id) is not None and led.open_count == 1


# ---- refusals ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("r", "dimension", "capacity"),
    [(req(601), "input_tokens", 600), (req(0, 301), "output_tokens", 300)],
)
def test_never_fits_names_the_dimension_and_capacity(
    r: AcquireRequest, dimension: str, capacity: int
) -> None:
    led = Ledger(config(), T0)
    with pytest.raises(NeverFits) as e:
        led.acquire(r, T0, T0 + 60)
    assert e.value.dimension == dimension and e.value.capacity == capacity
    assert dimension in str(e.value) and str(capacity) in str(e.value)
    assert led.waiting_count == 0 and led.open_count == 0


def test_never_fits_on_a_user_bucket_names_the_user() -> None:
    led = Ledger(USERS, T0)
    with pytest.raises(NeverFits) as e:
        led.acquire(req(201, user="alice"), T0, T0 + 60)
    assert e.value.bucket == BucketKey("s", "m", "alice")
    assert "alice" in str(e.value) and "200" in str(e.value)


def test_unknown_model_is_invalid_and_changes_nothing() -> None:
    led = Ledger(config(), T0)
    with pytest.raises(InvalidRequest) as e:
        led.acquire(req(model="nope"), T0, T0 + 60)
    assert e.value.field == "model" and "nope" in str(e.value)
    assert led.take_changes() == [] and led.next_wakeup() is None


def test_queue_full_over_max_waiters_with_an_estimate() -> None:
    led = Ledger(config(max_waiters_per_queue=3), T0)
    grant(led, req(600), T0)
    for _ in range(3):
        wait(led, req(100), T0, T0 + 300)
    with pytest.raises(QueueFull) as e:
        led.acquire(req(100), T0, T0 + 300)
    assert e.value.retry_after_s == pytest.approx(40.0)  # three ahead plus its own
    assert led.waiting_count == 3
    # Another queue (a user's) is not full.
    led2 = Ledger(config({"m": M}, {"m": Limits(60)}, max_waiters_per_queue=1), T0)
    grant(led2, req(600), T0)
    wait(led2, req(1, user="a"), T0, T0 + 60)
    wait(led2, req(1, user="b"), T0, T0 + 60)


# ---- report and release -------------------------------------------------------------------------


def test_report_refunds_unused_tokens_but_not_the_request() -> None:
    led = Ledger(config(), T0)
    r = grant(led, req(100, 50), T0)
    settled, replayed = led.report(r.id, 30, 20, Outcome.OK, 0.0, T0)
    assert not replayed and settled.state is State.REPORTED
    s = settled.settlement
    assert s is not None and s.outcome is Outcome.OK and s.settled_at == T0
    assert s.refunded == Amounts(0, 70, 30) and s.overrun == Amounts()
    assert levels(led, SHARED, T0) == (59.0, 570.0, 280.0)
    assert bucket(led, SHARED, T0).in_flight == 0 and led.open_count == 0


def test_refund_never_fills_past_capacity() -> None:
    led = Ledger(config(), T0)
    r = grant(led, req(100, 50), T0)
    led.report(r.id, 0, 0, Outcome.ERROR, 0.0, T0 + 20)  # refilled to the top already
    assert levels(led, SHARED, T0 + 20) == (60.0, 600.0, 300.0)


def test_overrun_is_debt_that_delays_later_grants_by_its_refill_time() -> None:
    led = Ledger(config(), T0)
    r = grant(led, req(600), T0)
    settled, _ = led.report(r.id, 900, 0, Outcome.OK, 0.0, T0)
    assert settled.settlement is not None
    assert settled.settlement.overrun == Amounts(0, 300, 0)
    assert levels(led, SHARED, T0)[1] == -300.0
    rejected = led.acquire(req(100), T0, T0)
    assert isinstance(rejected, Rejected) and rejected.retry_after_s == pytest.approx(40.0)
    w = wait(led, req(100), T0, T0 + 120)
    led.advance(T0 + 39.9)
    assert w.result is None
    wake(led, T0 + 40)
    assert isinstance(w.result, Granted)
    assert w.result.reservation.granted_at == pytest.approx(T0 + 40)


def test_mixed_refund_and_overrun() -> None:
    led = Ledger(config(), T0)
    r = grant(led, req(100, 100), T0)
    settled, _ = led.report(r.id, 150, 10, Outcome.OK, 0.0, T0)
    s = settled.settlement
    assert s is not None
    assert (s.refunded, s.overrun) == (Amounts(0, 0, 90), Amounts(0, 50, 0))
    assert levels(led, SHARED, T0) == (59.0, 450.0, 290.0)


def test_release_refunds_everything_including_the_request() -> None:
    led = Ledger(config({"m": Limits(60, 600, 300, 1)}), T0)
    r = grant(led, req(100, 50), T0)
    settled, replayed = led.release(r.id, T0)
    assert not replayed and settled.state is State.RELEASED
    assert settled.settlement is not None and settled.settlement.refunded == Amounts(1, 100, 50)
    assert levels(led, SHARED, T0) == (60.0, 600.0, 300.0)
    grant(led, req(), T0)  # the concurrency slot is free again


def test_rate_limited_pauses_only_that_scope_and_model_until_the_pause_ends() -> None:
    led = Ledger(config({"m": M, "n": M}), T0)
    r = grant(led, req(10), T0)
    led.take_changes()
    led.report(r.id, 10, 0, Outcome.RATE_LIMITED, 30.0, T0 + 1)
    assert PauseSet("s", "m", T0 + 31) in led.take_changes()
    assert led.paused_until("s", "m", T0 + 1) == T0 + 31
    paused = led.acquire(req(1), T0 + 2, T0 + 2)
    assert isinstance(paused, Rejected) and paused.retry_after_s == pytest.approx(29.0)
    assert isinstance(led.acquire(req(1, model="n"), T0 + 2, T0 + 2), Granted)
    assert isinstance(led.acquire(req(1, scope="other"), T0 + 2, T0 + 2), Granted)
    w = wait(led, req(1, user="u"), T0 + 2, T0 + 60)  # users of the model wait too
    led.advance(T0 + 30)
    assert w.result is None
    wake(led, T0 + 31)
    assert isinstance(w.result, Granted) and w.result.reservation.granted_at == T0 + 31
    grant(led, req(1), T0 + 31)


def test_rate_limited_without_retry_after_does_not_pause() -> None:
    led = Ledger(config(), T0)
    r = grant(led, req(10), T0)
    led.report(r.id, 10, 0, Outcome.RATE_LIMITED, 0.0, T0)
    assert led.paused_until("s", "m", T0) == 0.0
    assert not any(isinstance(c, PauseSet) for c in led.take_changes())
    grant(led, req(1), T0)


def test_a_shorter_pause_does_not_shorten_a_longer_one() -> None:
    led = Ledger(config(), T0)
    a, b = grant(led, req(), T0), grant(led, req(), T0)
    led.report(a.id, 0, 0, Outcome.RATE_LIMITED, 60.0, T0)
    led.report(b.id, 0, 0, Outcome.RATE_LIMITED, 5.0, T0 + 1)
    assert led.paused_until("s", "m", T0 + 10) == T0 + 60


# ---- idempotency --------------------------------------------------------------------------------


def test_repeated_request_id_replays_the_grant_without_taking_again() -> None:
    led = Ledger(config(), T0)
    r = grant(led, req(100, rid="abc"), T0)
    before = levels(led, SHARED, T0)
    led.take_changes()
    again = led.acquire(req(100, rid="abc"), T0 + 1, T0 + 1)
    assert again == Granted(r, replayed=True)
    assert levels(led, SHARED, T0) == before and led.open_count == 1
    assert led.take_changes() == []
    # The same request id in another scope is another request.
    other = led.acquire(req(100, rid="abc", scope="s2"), T0 + 1, T0 + 1)
    assert isinstance(other, Granted) and not other.replayed


def test_replay_after_settlement_returns_the_settled_reservation() -> None:
    led = Ledger(config(), T0)
    r = grant(led, req(100, rid="abc"), T0)
    settled, _ = led.report(r.id, 10, 0, Outcome.OK, 0.0, T0)
    again = led.acquire(req(100, rid="abc"), T0 + 1, T0 + 1)
    assert again == Granted(settled, replayed=True)
    assert led.open_count == 0


@pytest.mark.parametrize(
    "changed",
    [req(101, rid="abc"), req(100, 1, rid="abc"), req(100, rid="abc", user="u"),
     req(100, rid="abc", model="n")],
    ids=["input", "output", "user", "model"],
)
def test_request_id_reused_for_a_different_request_is_invalid(changed: AcquireRequest) -> None:
    led = Ledger(config({"m": M, "n": M}), T0)
    grant(led, req(100, rid="abc"), T0)
    with pytest.raises(InvalidRequest) as e:
        led.acquire(changed, T0, T0)
    assert e.value.field == "request_id"
    # A waiting request is protected the same way.
    led2 = Ledger(config({"m": M, "n": M}), T0)
    grant(led2, req(600), T0)
    w = wait(led2, req(100, rid="abc"), T0, T0 + 60)
    with pytest.raises(InvalidRequest):
        led2.acquire(changed, T0, T0 + 60)
    assert w.result is None and led2.waiting_count == 1


def test_repeated_request_id_while_waiting_returns_the_same_waiter() -> None:
    led = Ledger(config(), T0)
    grant(led, req(600), T0)
    w = wait(led, req(100, rid="x"), T0, T0 + 60)
    assert led.acquire(req(100, rid="x", lease=5.0), T0 + 1, T0 + 60) is w
    assert led.waiting_count == 1
    wake(led, T0 + 10)
    assert isinstance(w.result, Granted)
    assert led.acquire(req(100, rid="x"), T0 + 11, T0 + 11) == Granted(
        w.result.reservation, replayed=True
    )


def test_a_timed_out_request_id_may_try_again() -> None:
    led = Ledger(config(), T0)
    grant(led, req(600), T0)
    w = wait(led, req(300, rid="x"), T0, T0 + 5)
    led.advance(T0 + 5)
    assert isinstance(w.result, Rejected)
    w2 = led.acquire(req(300, rid="x"), T0 + 6, T0 + 60)
    assert isinstance(w2, Waiter) and w2 is not w


def test_report_twice_is_replayed_and_changes_nothing() -> None:
    led = Ledger(config(), T0)
    r = grant(led, req(100, 50), T0)
    first, replayed = led.report(r.id, 30, 20, Outcome.OK, 0.0, T0)
    assert not replayed
    led.take_changes()
    before = levels(led, SHARED, T0)
    second, replayed = led.report(r.id, 30, 20, Outcome.OK, 0.0, T0 + 1)
    assert replayed and second == first
    assert levels(led, SHARED, T0) == before
    assert led.take_changes() == []


def test_a_different_report_is_refused_but_its_pause_is_applied() -> None:
    """Issue 10, item 10: a duplicate with other figures and a 429 was answered OK with the
    first settlement, dropping the pause. It is refused now, and the pause holds."""
    led = Ledger(config(), T0)
    r = grant(led, req(100, 50), T0)
    led.report(r.id, 30, 20, Outcome.OK, 0.0, T0)
    led.take_changes()
    before = levels(led, SHARED, T0)
    with pytest.raises(AlreadySettled) as e:
        led.report(r.id, 0, 0, Outcome.RATE_LIMITED, 60.0, T0 + 1)
    assert str(e.value) == (
        f"reservation_id: {r.id} is already reported; cannot report it (it was reported as "
        "30 input and 20 output tokens, OK, and this Report differs; its 60 s provider pause "
        "is applied)")
    assert levels(led, SHARED, T0) == before  # the settlement stands
    assert led.paused_until("s", "m", T0 + 1) == T0 + 61
    assert led.take_changes() == [PauseSet("s", "m", T0 + 61)]
    with pytest.raises(AlreadySettled, match=r"this Report differs\)$"):
        led.report(r.id, 30, 21, Outcome.OK, 0.0, T0 + 2)  # no pause: nothing else done
    assert led.take_changes() == []
    released = grant(led, req(1, scope="s2"), T0 + 2)
    led.release(released.id, T0 + 2)
    with pytest.raises(AlreadySettled, match=r"already released; cannot report it \(its 5 s"):
        led.report(released.id, 1, 0, Outcome.RATE_LIMITED, 5.0, T0 + 3)


def test_release_twice_is_replayed_and_changes_nothing() -> None:
    led = Ledger(config(), T0)
    r = grant(led, req(100, 50), T0)
    first, _ = led.release(r.id, T0)
    grant(led, req(100), T0)
    led.take_changes()
    before = levels(led, SHARED, T0)
    second, replayed = led.release(r.id, T0 + 1)
    assert replayed and second == first
    assert levels(led, SHARED, T0) == before and led.take_changes() == []


def test_settling_twice_differently_is_already_settled() -> None:
    led = Ledger(config(), T0)
    a, b = grant(led, req(10), T0), grant(led, req(10), T0)
    led.release(a.id, T0)
    led.report(b.id, 1, 1, Outcome.OK, 0.0, T0)
    with pytest.raises(AlreadySettled, match="released"):
        led.report(a.id, 1, 1, Outcome.OK, 0.0, T0)
    with pytest.raises(AlreadySettled, match="reported"):
        led.release(b.id, T0)
    with pytest.raises(AlreadySettled):
        led.keep_alive(a.id, 60.0, T0)


def test_unknown_reservation_is_not_found() -> None:
    led = Ledger(config(), T0)
    with pytest.raises(NotFound, match="reservation_id"):
        led.report("nope", 0, 0, Outcome.OK, 0.0, T0)
    with pytest.raises(NotFound):
        led.release("nope", T0)
    with pytest.raises(NotFound):
        led.keep_alive("nope", 60.0, T0)
    assert led.take_changes() == []


# ---- leases -------------------------------------------------------------------------------------


def test_keep_alive_extends_the_lease() -> None:
    led = Ledger(config(), T0)
    r = grant(led, req(100, lease=10.0), T0)
    led.take_changes()
    extended = led.keep_alive(r.id, 30.0, T0 + 5)
    assert extended.expires_at == T0 + 35
    assert led.take_changes() == [LeaseExtended(r.id, T0 + 35)]
    led.advance(T0 + 10)  # the old expiry
    assert led.get(r.id) is not None and led.get(r.id).state is State.OPEN  # type: ignore[union-attr]
    assert led.next_wakeup() is not None and led.next_wakeup() <= T0 + 35  # type: ignore[operator]
    led.advance(T0 + 35)
    assert led.get(r.id).state is State.EXPIRED  # type: ignore[union-attr]
    # The default lease applies when none is given.
    r2 = grant(led, req(1), T0 + 40)
    assert led.keep_alive(r2.id, None, T0 + 41).expires_at == T0 + 41 + 600.0


def test_an_expired_lease_is_an_orphan_settled_with_no_refund() -> None:
    led = Ledger(config({"m": Limits(60, 600, 300, 1)}), T0)
    r = grant(led, req(600, 100, lease=20.0), T0)
    w = wait(led, req(10), T0 + 1, T0 + 60)  # needs the concurrency slot (and input)
    led.take_changes()
    assert led.next_wakeup() == pytest.approx(T0 + 1 + 1)  # input refill for 10 tokens
    wake(led, T0 + 19.99)
    assert w.result is None  # the slot is still held
    led.advance(T0 + 20)
    settled = led.get(r.id)
    assert settled is not None and settled.state is State.EXPIRED
    assert settled.settlement is not None
    assert settled.settlement.refunded == Amounts() and settled.settlement.overrun == Amounts()
    assert isinstance(w.result, Granted) and w.result.reservation.granted_at == T0 + 20
    # No refund: the input bucket holds only the refill since T0, less the waiter's 10.
    assert levels(led, SHARED, T0 + 20)[1] == pytest.approx(20 * 10 - 10)
    changes = led.take_changes()
    assert ReservationSettled(r.id, settled.settlement) in changes
    with pytest.raises(AlreadySettled):
        led.report(r.id, 0, 0, Outcome.OK, 0.0, T0 + 21)


def test_many_leases_expire_each_at_its_own_time() -> None:
    led = Ledger(config({"m": Limits(None, None, None, 100)}), T0)
    leases = [(i * 37) % 50 + 1.0 for i in range(50)]
    rs = [grant(led, req(lease=lease), T0) for lease in leases]
    for r in rs[::5]:
        led.keep_alive(r.id, 100.0, T0 + 0.5)
    expired: dict[str, float] = {}
    now = T0
    while (at := led.next_wakeup()) is not None and at <= T0 + 200:
        now = at
        led.advance(now)
        for c in led.take_changes():
            if isinstance(c, ReservationSettled):
                assert c.settlement.state is State.EXPIRED
                expired[c.reservation_id] = c.settlement.settled_at
    for i, r in enumerate(rs):
        due = T0 + 100.5 if i % 5 == 0 else r.expires_at
        assert expired[r.id] == pytest.approx(due), i
    assert led.open_count == 0


# ---- forgetting and sweeping --------------------------------------------------------------------


def test_settlements_are_forgotten_after_retention() -> None:
    led = Ledger(config(settlement_retention_s=100.0), T0)
    r = grant(led, req(10, rid="k"), T0)
    led.release(r.id, T0 + 1)
    led.take_changes()
    assert led.next_wakeup() is not None and led.next_wakeup() <= T0 + 101  # type: ignore[operator]
    led.advance(T0 + 100)
    assert led.get(r.id) is not None
    led.advance(T0 + 101)
    assert led.get(r.id) is None
    assert SettlementsForgotten(T0 + 1, (r.id,)) in led.take_changes()
    with pytest.raises(NotFound):
        led.release(r.id, T0 + 102)
    # The request id is free again: a new acquire is a new reservation.
    again = led.acquire(req(10, rid="k"), T0 + 102, T0 + 102)
    assert isinstance(again, Granted) and not again.replayed and again.reservation.id != r.id


def test_settlements_over_the_maximum_are_forgotten_oldest_first() -> None:
    led = Ledger(config(max_settlements=3), T0)
    ids = []
    for i in range(5):
        r = grant(led, req(1), T0 + i)
        led.release(r.id, T0 + i)
        ids.append(r.id)
    led.take_changes()
    led.advance(T0 + 5)
    forgotten = [c for c in led.take_changes() if isinstance(c, SettlementsForgotten)]
    assert forgotten == [SettlementsForgotten(T0 + 1, (ids[0], ids[1]))]
    assert [led.get(i) is not None for i in ids] == [False, False, True, True, True]


def test_idle_full_buckets_are_dropped_but_busy_ones_are_kept() -> None:
    led = Ledger(config({"m": M, "n": M}, idle_sweep_interval_s=10.0), T0)
    held = grant(led, req(10, model="n", lease=1000.0), T0)
    r = grant(led, req(10), T0)
    led.release(r.id, T0)  # full again at once
    grant(led, req(600, model="m", scope="s2", lease=1.0), T0)  # expires; refills by T0+60
    led.take_changes()
    assert led.next_wakeup() is not None and led.next_wakeup() <= T0 + 1  # type: ignore[operator]
    wake(led, T0 + 10)
    changes = led.take_changes()
    assert BucketDropped(SHARED) in changes
    assert BucketDropped(BucketKey("s", "n")) not in changes  # in flight
    assert BucketDropped(BucketKey("s2", "m")) not in changes  # not full yet
    assert {b.key for b in led.buckets(T0 + 10)} == {BucketKey("s", "n"), BucketKey("s2", "m")}
    wake(led, T0 + 70)
    assert BucketDropped(BucketKey("s2", "m")) in led.take_changes()
    assert {b.key for b in led.buckets(T0 + 70)} == {BucketKey("s", "n")}
    led.release(held.id, T0 + 70)
    wake(led, T0 + 80)
    assert BucketDropped(BucketKey("s", "n")) in led.take_changes()
    assert list(led.buckets(T0 + 80)) == []
    assert led.next_wakeup() is None or led.next_wakeup() > T0 + 80  # type: ignore[operator]


def test_a_bucket_with_waiters_is_not_dropped() -> None:
    led = Ledger(config({"m": Limits(None, None, None, 1)}, idle_sweep_interval_s=1.0), T0)
    r = grant(led, req(lease=1000.0), T0)
    w = wait(led, req(), T0, T0 + 500)
    wake(led, T0 + 100)
    assert not any(isinstance(c, BucketDropped) for c in led.take_changes())
    led.release(r.id, T0 + 100)
    assert isinstance(w.result, Granted)


# ---- the changes outbox -------------------------------------------------------------------------


def test_every_state_change_is_in_the_outbox_and_levels_are_deduplicated() -> None:
    led = Ledger(config(), T0)
    a = grant(led, req(100, 50), T0)
    b = grant(led, req(100, 50), T0)
    changes = led.take_changes()
    assert changes[:2] == [ReservationOpened(a), ReservationOpened(b)]
    assert changes[2:] == [BucketLevels(SHARED, 58.0, 400.0, 200.0, T0)]  # once, latest
    assert led.take_changes() == []

    led.keep_alive(a.id, 60.0, T0 + 1)
    settled, _ = led.report(a.id, 100, 50, Outcome.RATE_LIMITED, 10.0, T0 + 2)
    assert settled.settlement is not None
    changes = led.take_changes()
    assert changes[:3] == [
        LeaseExtended(a.id, T0 + 61),
        PauseSet("s", "m", T0 + 12),
        ReservationSettled(a.id, settled.settlement),
    ]
    assert changes[3:] == [BucketLevels(SHARED, 60.0, 420.0, 210.0, T0 + 2)]

    released, _ = led.release(b.id, T0 + 3)
    assert released.settlement is not None
    assert led.take_changes() == [
        ReservationSettled(b.id, released.settlement),
        BucketLevels(SHARED, 60.0, 530.0, 265.0, T0 + 3),
    ]


# ---- restart: restore from a journal ------------------------------------------------------------


@dataclass
class FoldedJournal:
    """What a journal keeps: the changes folded into current state, as a Snapshot."""

    reservations: dict[str, Reservation] = field(default_factory=dict)
    buckets: dict[BucketKey, BucketLevels] = field(default_factory=dict)
    pauses: dict[tuple[str, str], PauseSet] = field(default_factory=dict)

    def write(self, changes: list[Change]) -> None:
        for c in changes:
            if isinstance(c, ReservationOpened):
                assert c.reservation.id not in self.reservations
                self.reservations[c.reservation.id] = c.reservation
            elif isinstance(c, LeaseExtended):
                r = self.reservations[c.reservation_id]
                assert r.settlement is None, "lease extended on a settled reservation"
                self.reservations[c.reservation_id] = replace(r, expires_at=c.expires_at)
            elif isinstance(c, ReservationSettled):
                r = self.reservations[c.reservation_id]
                assert r.settlement is None, "settled twice"
                self.reservations[c.reservation_id] = replace(r, settlement=c.settlement)
            elif isinstance(c, PauseSet):
                self.pauses[(c.scope, c.budget)] = c
            elif isinstance(c, BucketLevels):
                self.buckets[c.key] = c
            elif isinstance(c, BucketDropped):
                self.buckets.pop(c.key, None)  # may never have been written
            elif isinstance(c, SettlementsForgotten):
                for rid in c.ids:
                    assert self.reservations.pop(rid).settlement is not None
            else:  # pragma: no cover - a new Change type this fold does not know
                raise AssertionError(f"unknown change {c!r}")

    def snapshot(self) -> Snapshot:
        return Snapshot(
            tuple(self.reservations.values()), tuple(self.buckets.values()),
            tuple(self.pauses.values()),
        )


CONC = config({"m": Limits(60, 600, 300, 3), "n": M}, {"m": Limits(20, 300, 200)})


def _history(led: Ledger, journal: FoldedJournal) -> dict[str, Reservation]:
    """Some traffic up to T0+10, journaled. Returns the reservations by name."""
    out = {}
    out["orphan"] = grant(led, req(200, 100, user="a", lease=15.0), T0)
    out["kept"] = grant(led, req(100, 50, user="b", lease=15.0), T0 + 1)
    out["done"] = grant(led, req(250, 100, user="c", rid="done"), T0 + 2)
    led.keep_alive(out["kept"].id, 500.0, T0 + 3)
    led.report(out["done"].id, 300, 20, Outcome.RATE_LIMITED, 30.0, T0 + 4)
    out["n"] = grant(led, req(500, 0, model="n", lease=1000.0), T0 + 5)
    led.advance(T0 + 10)
    journal.write(led.take_changes())
    return out


def test_restore_rebuilds_levels_leases_and_pauses() -> None:
    original, journal = Ledger(CONC, T0), FoldedJournal()
    rs = _history(original, journal)
    down_until = T0 + 20  # the daemon was down from T0+10 to T0+20
    restored = Ledger(CONC, down_until)
    restored.restore(journal.snapshot(), down_until)
    # Levels are brought forward by the refill over the downtime, never above capacity.
    for key in (SHARED, BucketKey("s", "m", "a"), BucketKey("s", "n")):
        assert levels(restored, key, down_until) == pytest.approx(
            levels(original, key, down_until)
        )
        b = bucket(restored, key, down_until)
        assert all(c is None or lv <= c for c, lv in zip(b.caps, b.levels, strict=True))
    assert levels(restored, SHARED, T0 + 1000) == (60.0, 600.0, 300.0)
    # Concurrency is rebuilt from the open reservations (3 are open: the cap).
    assert bucket(restored, SHARED, down_until).in_flight == 2  # orphan, kept
    # The lease that lapsed during the downtime expires at the first advance, unrefunded.
    assert restored.get(rs["orphan"].id).state is State.OPEN  # type: ignore[union-attr]
    restored.advance(down_until)
    orphan = restored.get(rs["orphan"].id)
    assert orphan is not None and orphan.state is State.EXPIRED
    assert restored.get(rs["kept"].id).state is State.OPEN  # type: ignore[union-attr]
    assert bucket(restored, SHARED, down_until).in_flight == 1
    # The pause survives; settled reservations and request ids are remembered.
    assert restored.paused_until("s", "m", down_until) == T0 + 34
    assert restored.acquire(req(250, 100, user="c", rid="done"), down_until, down_until) == (
        Granted(original.get(rs["done"].id), replayed=True)  # type: ignore[arg-type]
    )
    with pytest.raises(AlreadySettled):
        restored.release(rs["done"].id, down_until)
    restored.release(rs["kept"].id, down_until)


def test_restored_levels_are_clamped_to_capacity() -> None:
    led = Ledger(config(), T0)
    bogus = BucketLevels(SHARED, 1e6, 1e6, -30.0, T0)  # e.g. written under higher limits
    led.restore(Snapshot((), (bogus,), ()), T0 + 3)
    assert levels(led, SHARED, T0 + 3) == (60.0, 600.0, -15.0)


def test_a_restored_ledger_grants_no_more_than_the_original() -> None:
    original, journal = Ledger(CONC, T0), FoldedJournal()
    rs = _history(original, journal)
    down_until = T0 + 40
    restored = Ledger(CONC, down_until)
    restored.restore(journal.snapshot(), down_until)
    original.advance(down_until)  # the original kept running; it expires the orphan too
    restored.advance(down_until)
    ids: dict[str, tuple[str, str]] = {}  # name -> (original id, restored id)
    script: list[tuple[float, str, Any]] = [
        (T0 + 40, "acquire", ("x1", req(300, 150, user="a"))),
        (T0 + 40, "acquire", ("x2", req(100, 100, user="b"))),
        (T0 + 41, "acquire", ("x3", req(100, 100, user="c"))),
        (T0 + 41, "report", ("x1", 400, 10)),
        (T0 + 45, "acquire", ("x4", req(50, 50))),
        (T0 + 46, "acquire", ("x5", req(200, 0, model="n"))),
        (T0 + 47, "release", "x2"),
        (T0 + 47, "release", "kept"),
        (T0 + 48, "acquire", ("x6", req(290, 190, user="b"))),
        (T0 + 49, "acquire", ("x7", req(300, 50, user="b"))),
        (T0 + 60, "acquire", ("x8", req(300, 50, user="b"))),
        (T0 + 80, "acquire", ("x9", req(600, 300))),
    ]
    ids["kept"] = (rs["kept"].id, rs["kept"].id)
    outcomes: dict[str, list[tuple[Any, ...]]] = {"original": [], "restored": []}
    for now, op, arg in script:
        for which, led in (("original", original), ("restored", restored)):
            led.advance(now)
            idx = 0 if which == "original" else 1
            if op == "acquire":
                name, r = arg
                result = led.acquire(r, now, now)
                if isinstance(result, Granted):
                    prev = ids.get(name, ("", ""))
                    ids[name] = (
                        (result.reservation.id, prev[1]) if idx == 0
                        else (prev[0], result.reservation.id)
                    )
                    outcomes[which].append(("granted", name))
                else:
                    assert isinstance(result, Rejected)
                    outcomes[which].append(("rejected", name, round(result.retry_after_s, 6)))
            elif op == "report":
                name, used_in, used_out = arg
                led.report(ids[name][idx], used_in, used_out, Outcome.OK, 0.0, now)
            else:
                led.release(ids[arg][idx], now)
            outcomes[which].append(tuple(round(x, 6) for x in levels(led, SHARED, now)))
    assert outcomes["restored"] == outcomes["original"]
    granted = [o for o in outcomes["original"] if o[0] == "granted"]
    rejected = [o for o in outcomes["original"] if o[0] == "rejected"]
    assert granted and rejected  # the script exercises both sides
