"""The engine's read API: frozen views of buckets, leases and stats, paged in a stable order,
and the scopes an operator means by a hash, an alias or a prefix."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from limiterd.clock import FakeClock
from limiterd.engine import Engine
from limiterd.ledger.ledger import Granted
from limiterd.ledger.model import AcquireRequest, BucketKey, Outcome
from limiterd.storage import Journal
from limiterd.views import AmbiguousScope, BucketView, lease_order
from tests.conftest import TEAM_A, make_test_config


@pytest.fixture
async def engine(any_journal: Journal) -> AsyncIterator[Engine]:
    e = Engine(make_test_config(), any_journal, FakeClock())
    await e.start()
    yield e
    await e.stop()


async def grant(e: Engine, scope: str, model: str = "tiny", tokens: int = 100,
                user: str = "") -> Granted:
    g = await e.acquire(AcquireRequest(scope, model, user, tokens, 50), 0)
    assert isinstance(g, Granted)
    return g


async def test_bucket_views_are_frozen_and_carry_what_get_buckets_shows(engine: Engine) -> None:
    await grant(engine, TEAM_A, "conc", tokens=400)
    [view] = engine.buckets()
    assert isinstance(view, BucketView)
    assert view.key == BucketKey(TEAM_A, "conc")
    dims = {d.name: d for d in view.dimensions}
    assert dims["input_tokens"].level == pytest.approx(1_000_000 - 400)
    assert dims["input_tokens"].refill_per_s == pytest.approx(1_000_000 / 60)
    assert (dims["concurrent"].level, dims["concurrent"].capacity) == (1, 2)
    assert view.open_reservations == 1 and view.queue_depth == 0
    with pytest.raises(AttributeError):  # read-only
        view.queue_depth = 5  # type: ignore[misc]


async def test_bucket_pages_follow_key_order_without_gaps_or_repeats(engine: Engine) -> None:
    for i in range(25):
        await grant(engine, f"scope-{i:02d}", tokens=1)
    whole = [v.key for v in engine.buckets()]
    assert whole == sorted(whole) and len(whole) == 25
    seen: list[BucketKey] = []
    after = None
    while True:
        page = engine.buckets(after=after, limit=7)
        seen += [v.key for v in page]
        if len(page) < 7:
            break
        after = page[-1].key
    assert seen == whole


async def test_lease_pages_follow_expiry_order(engine: Engine) -> None:
    for i in range(10):
        await grant(engine, f"s{i}", tokens=1)
    whole = engine.leases()
    assert whole == sorted(whole, key=lease_order)
    first = engine.leases(limit=4)
    rest = engine.leases(after=lease_order(first[-1]))
    assert [r.id for r in first + rest] == [r.id for r in whole]
    assert [r.scope for r in engine.leases(frozenset({"s3"}))] == ["s3"]


async def test_scope_by_hash_alias_or_unique_prefix(engine: Engine) -> None:
    await grant(engine, "085e42dbe676aaaa")
    await grant(engine, "085e42dbe676bbbb")
    await grant(engine, "f00dcafe1234cccc")
    assert engine.scopes("") is None  # every scope
    assert engine.scopes("f00dcafe1234") == {"f00dcafe1234cccc"}
    assert engine.scopes("085e42dbe676aaaa") == {"085e42dbe676aaaa"}
    assert engine.scopes("team-a") == {TEAM_A}  # the configured alias
    assert engine.scopes("0123456789ab") == frozenset()
    assert engine.scopes("f0") == frozenset()  # too short to be meant as a prefix
    with pytest.raises(AmbiguousScope, match="start of 2 scopes"):
        engine.scopes("085e42dbe676")


async def test_stats_count_pauses_and_overloads(engine: Engine) -> None:
    g = await grant(engine, "s")
    await engine.report(g.reservation.id, 1, 1, Outcome.RATE_LIMITED, 30.0)
    stats = engine.stats()
    assert stats.active_pauses == 1 and stats.open_reservations == 0
    assert engine.buckets()[0].paused_until > engine.now()
