"""The refill hold of a caller that marks when it sends (issue 15; ledger/buckets.py).

A burst from a full bucket by a caller that promised marks_sent holds the bucket's refill
until the mark: the provider starts refilling when the request arrives, however long after
the grant that is. The fake clock is `now`, passed to every call.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest

from limiterd.clock import FakeClock
from limiterd.config.model import Config, Limits, ModelRule, Settings
from limiterd.engine import Engine
from limiterd.ledger.errors import NotFound
from limiterd.ledger.ledger import Granted, Ledger, Waiter
from limiterd.ledger.model import AcquireRequest, BucketKey, Outcome
from limiterd.storage.sqlite import SqliteJournal
from tests.test_ledger import FoldedJournal

T0 = 1_700_000_000.0
KEY = BucketKey("s", "m")
ALLOWANCE = 0.1
# 300 output tokens per minute: 5 per second, so 10 tokens take 2 s to refill.
CONFIG = Config(settings=Settings(refill_allowance_s=ALLOWANCE),
                models=(ModelRule("m", Limits(None, None, 300)),),
                user_models=(ModelRule("m", Limits(None, None, 300)),))


def req(out: int, marks: bool = True, user: str = "") -> AcquireRequest:
    return AcquireRequest("s", "m", user, 0, out, marks_sent=marks)


def granted(led: Ledger, r: AcquireRequest, now: float) -> Granted:
    result = led.acquire(r, now, now)
    assert isinstance(result, Granted), result
    return result


def waiter(led: Ledger, now: float) -> Waiter:
    """An exact-refill waiter: 10 output tokens, 2 s of refill from empty."""
    w = led.acquire(req(10, marks=False), now, now + 600)
    assert isinstance(w, Waiter), w
    return w


def granted_at(led: Ledger, w: Waiter, upto: float) -> float:
    """Step the clock by 1 ms until `w` is granted (at most until `upto`); the grant time."""
    t = w.enqueued_at
    while w.result is None and t < upto:
        t = round(t + 0.001, 6)
        led.advance(t)
    assert isinstance(w.result, Granted), f"not granted by {upto - T0:.3f}"
    return w.result.reservation.granted_at


def level(led: Ledger, now: float) -> float:
    return led.bucket(KEY, now).levels[2]


def test_a_burst_refills_from_the_mark_plus_the_allowance() -> None:
    led = Ledger(CONFIG, T0)
    first = granted(led, req(200), T0)
    assert first.mark_sent  # it took the bucket down from full: the hold wants its mark
    second = granted(led, req(100), T0 + 0.05)
    assert second.mark_sent  # granted during the hold: its mark may end it too
    w = waiter(led, T0 + 0.1)
    assert level(led, T0 + 0.29) == pytest.approx(0.0, abs=1e-9)  # held: no refill at all
    assert led.wait_status(w, T0 + 0.29)[1] == pytest.approx(ALLOWANCE + 2.0)
    led.advance(T0 + 0.3)
    led.mark_sent(first.reservation.id, T0 + 0.3)  # sent 300 ms after its grant
    assert granted_at(led, w, T0 + 10) - T0 == pytest.approx(0.3 + ALLOWANCE + 2.0, abs=1e-3)


def test_any_mark_from_the_hold_ends_it_and_later_marks_change_nothing() -> None:
    led = Ledger(CONFIG, T0)
    first = granted(led, req(200), T0)
    second = granted(led, req(100), T0 + 0.01)
    w = waiter(led, T0 + 0.02)
    led.mark_sent(second.reservation.id, T0 + 0.2)  # the second caller sent first
    led.mark_sent(first.reservation.id, T0 + 0.5)  # the hold is over: no later resume
    led.mark_sent(first.reservation.id, T0 + 0.6)  # again: idempotent
    assert granted_at(led, w, T0 + 10) - T0 == pytest.approx(0.2 + ALLOWANCE + 2.0, abs=1e-3)


def test_a_mark_from_a_reservation_granted_before_the_hold_does_not_end_it() -> None:
    led = Ledger(CONFIG, T0)
    before = granted(led, req(0), T0)  # takes nothing: the bucket stays full, no hold
    assert not before.mark_sent
    holder = granted(led, req(300), T0 + 0.01)
    w = waiter(led, T0 + 0.02)
    led.mark_sent(before.reservation.id, T0 + 0.05)
    assert level(led, T0 + 1.0) == pytest.approx(0.0, abs=1e-9)  # still held
    led.mark_sent(holder.reservation.id, T0 + 1.0)
    assert granted_at(led, w, T0 + 10) - T0 == pytest.approx(1.0 + ALLOWANCE + 2.0, abs=1e-3)


@pytest.mark.parametrize("end", ["release", "report", "lapse"])
def test_the_holders_settlement_ends_a_hold_no_mark_ended(end: str) -> None:
    """Release: the call never went out (its tokens come back, the provider counted nothing);
    Report or a lapsed lease: it is over. Either way the refill resumes then."""
    led = Ledger(CONFIG, T0)
    holder = granted(led, replace(req(300), lease_s=1.0), T0).reservation
    other = granted(led, req(0), T0 + 0.01).reservation  # keeps the bucket from being dropped
    assert other.reserved.output_tokens == 0
    w = waiter(led, T0 + 0.02)
    if end == "release":
        led.release(holder.id, T0 + 0.5)  # 300 back: the waiter is granted at once
        assert isinstance(w.result, Granted) and w.result.reservation.granted_at == T0 + 0.5
        return
    if end == "report":
        led.report(holder.id, 0, 300, Outcome.OK, 0.0, T0 + 0.5)
        settled = 0.5
    else:
        settled = 1.0  # the lease
    assert level(led, T0 + settled - 0.001) == pytest.approx(0.0, abs=1e-9)
    assert granted_at(led, w, T0 + 10) - T0 == pytest.approx(settled + 2.0, abs=1e-3)


def test_a_caller_that_does_not_mark_keeps_the_fixed_allowance() -> None:
    led = Ledger(CONFIG, T0)
    g = granted(led, req(300, marks=False), T0)
    assert not g.mark_sent
    w = waiter(led, T0)
    assert granted_at(led, w, T0 + 10) - T0 == pytest.approx(ALLOWANCE + 2.0, abs=1e-3)


def test_a_mark_for_an_unknown_reservation_is_not_found_and_after_settling_is_ignored() -> None:
    led = Ledger(CONFIG, T0)
    with pytest.raises(NotFound):
        led.mark_sent("0" * 32, T0)
    g = granted(led, req(300), T0).reservation
    led.release(g.id, T0 + 0.1)
    led.mark_sent(g.id, T0 + 0.2)  # late: nothing to end, no error
    assert level(led, T0 + 0.2) == pytest.approx(300.0)


def test_a_users_bucket_is_held_and_released_with_the_scope_bucket() -> None:
    led = Ledger(CONFIG, T0)
    g = granted(led, req(300, user="u"), T0)
    assert g.mark_sent
    user_key = BucketKey("s", "m", "u")
    assert led.bucket(user_key, T0 + 1).levels[2] == pytest.approx(0.0, abs=1e-9)
    led.mark_sent(g.reservation.id, T0 + 1)
    assert led.bucket(KEY, T0 + 1 + ALLOWANCE + 2).levels[2] == pytest.approx(10.0)
    assert led.bucket(user_key, T0 + 1 + ALLOWANCE + 2).levels[2] == pytest.approx(10.0)


def test_a_restart_during_a_hold_ends_it_charged() -> None:
    """Nobody's mark can end a hold after a restart: the held dimension is journaled with the
    allowance charged (0.5 tokens) and refills from the time it was journaled."""
    led, journal = Ledger(CONFIG, T0), FoldedJournal()
    granted(led, req(300), T0)
    assert level(led, T0 + 5) == pytest.approx(0.0, abs=1e-9)  # held: no refill as of T0 + 5
    journal.write(led.take_changes())
    again = Ledger(CONFIG, T0 + 5)
    again.restore(journal.snapshot(), T0 + 5)
    assert again.bucket(KEY, T0 + 7).levels[2] == pytest.approx(2 * 5.0 - 0.5)


def test_wait_estimates_count_a_held_refill_as_resuming_one_allowance_from_now() -> None:
    led = Ledger(replace(CONFIG, settings=replace(CONFIG.settings, idle_sweep_interval_s=600)),
                 T0)
    granted(led, req(300), T0)
    w = waiter(led, T0 + 30)  # 30 s into the hold: never "infinite", never counted as refill
    assert led.wait_status(w, T0 + 30)[1] == pytest.approx(ALLOWANCE + 2.0)
    at = led.next_wakeup()
    assert at is not None and at - T0 == pytest.approx(30 + ALLOWANCE + 2.0)  # its retry
    led.advance(at)
    assert w.result is None  # still held: looked at again one allowance + refill later
    again = led.next_wakeup()
    assert again is not None and again - at == pytest.approx(ALLOWANCE + 2.0)



async def test_a_held_bucket_survives_the_journal_and_a_restart_ends_the_hold(
    tmp_path: Path,
) -> None:
    """SQLite on a real file: the held dimension is written with the allowance charged,
    read back, and refills from the time it was written."""
    clock = FakeClock(T0)
    engine = Engine(CONFIG, SqliteJournal(tmp_path / "j.sqlite3"), clock)
    await engine.start()
    g = await engine.acquire(req(300), 0)
    assert isinstance(g, Granted) and g.mark_sent
    assert await engine.flush()
    clock.advance(5)
    assert engine.ledger.bucket(KEY, clock.now()).levels[2] == pytest.approx(0.0, abs=1e-9)
    await engine.stop()
    again = Engine(CONFIG, SqliteJournal(tmp_path / "j.sqlite3"), clock)
    await again.start()
    try:
        clock.advance(2)
        assert again.ledger.bucket(KEY, clock.now()).levels[2] == pytest.approx(7 * 5.0 - 0.5)
        await again.mark_sent(g.reservation.id)  # the hold is gone: changes nothing
    finally:
        await again.stop()


def test_only_the_dimension_taken_from_full_is_held() -> None:
    """A grant that finds its requests dimension full but its tokens below capacity holds
    the requests refill only: the tokens were refilling on the provider's side already."""
    cfg = Config(settings=CONFIG.settings, models=(ModelRule("m", Limits(60, None, 300)),))
    led = Ledger(cfg, T0)
    first = granted(led, req(300), T0).reservation  # both dimensions from full: both held
    led.mark_sent(first.id, T0)  # ends it: each charged 0.1 s of its refill
    assert led.bucket(KEY, T0 + 30).levels == pytest.approx([60.0, 0.0, 150.0 - 0.5])
    second = granted(led, req(100), T0 + 30)  # requests from full, output from 149.5
    assert second.mark_sent
    assert led.bucket(KEY, T0 + 31).levels == pytest.approx([59.0, 0.0, 49.5 + 5.0])
    led.mark_sent(second.reservation.id, T0 + 31)  # requests refill again, charged 0.1
    assert led.bucket(KEY, T0 + 31.5).levels[0] == pytest.approx(59.0 - 0.1 + 0.5)
