"""The settle outbox's bookkeeping on a stepped clock: backoff, the lease as the end, the bound.
(Delivery against a real daemon that is killed and restarted: test_client_daemon_restart.)"""

from __future__ import annotations

import logging

import pytest

from limiterd_client import Counters
from limiterd_client.outbox import Outbox


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def outbox(clock: Clock, **kw: int) -> tuple[Outbox, Counters]:
    counters = Counters()
    # wall time: the same clock (the lease expiry is in ms of it)
    return Outbox(counters, clock, clock, **kw), counters


def test_retries_back_off_until_the_settlement_lands() -> None:
    clock = Clock()
    box, counters = outbox(clock)
    assert box.add("Report", object(), "r1", lease_expires_at_ms=int((clock.t + 60) * 1000))
    p, wait = box.next()
    assert p is not None and wait == 0
    delays = []
    for _ in range(8):
        box.retry_later(p)
        _, wait = box.next()
        delays.append(wait)
    assert delays == pytest.approx([0.1, 0.2, 0.4, 0.8, 1.6, 3.2, 5.0, 5.0])  # doubling, capped
    box.landed(p)
    assert box.next() == (None, 0.0) and len(box) == 0
    assert (counters.settles_deferred, counters.settles_delivered) == (1, 1)


def test_a_settlement_is_given_up_when_its_lease_is_over(caplog: pytest.LogCaptureFixture
                                                         ) -> None:
    clock = Clock()
    box, counters = outbox(clock)
    box.add("Release", object(), "r1", lease_expires_at_ms=int((clock.t + 30) * 1000))
    clock.t += 29
    assert box.next()[0] is not None
    clock.t += 2
    with caplog.at_level(logging.WARNING, "limiterd_client"):
        assert box.next() == (None, 0.0)
    assert counters.settles_dropped == 1 and "lease is over" in caplog.text


def test_the_outbox_is_bounded_and_starts_one_driver(caplog: pytest.LogCaptureFixture) -> None:
    clock = Clock()
    box, counters = outbox(clock, limit=2)
    lease = int((clock.t + 60) * 1000)
    with caplog.at_level(logging.WARNING, "limiterd_client"):
        starts = [box.add("Report", object(), f"r{i}", lease) for i in range(3)]
    assert starts == [True, False, False]  # one driver while it runs
    assert len(box) == 2 and counters.settles_dropped == 1  # the oldest went
    unreachable = [r for r in caplog.records if "unreachable" in r.getMessage()]
    assert len(unreachable) == 1  # logged once per outage, not per call
    while (p := box.next()[0]) is not None:
        box.landed(p)
    assert box.add("Report", object(), "r9", lease)  # the driver stopped: a new one starts
