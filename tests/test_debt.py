"""Overrun debt is bounded, survives a restart as bounded, and an operator can forgive it
(issue 10, item 2): a Report of 10^12 tokens once locked a scope out for ~317 years."""

from __future__ import annotations

import signal
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import grpc
import pytest

from limiterd.config.model import Config, Limits, ModelRule
from limiterd.ledger.ledger import Granted, Ledger, Rejected
from limiterd.ledger.model import AcquireRequest, BucketKey, BucketLevels, Outcome, Snapshot
from limiterd_client.proto.limiter.v1 import limiter_pb2 as pb
from limiterd_client.proto.limiter.v1 import limiter_pb2_grpc as pb_grpc
from tests.conftest import TEST_CONFIG_TOML
from tests.test_operating import cli
from tests.test_process import serve

T0 = 1_700_000_000.0
CONFIG = Config(models=(ModelRule("m", Limits(60, 600, 300)),))
KEY = BucketKey("s", "m")


def one_token(ledger: Ledger, now: float) -> Granted | Rejected:
    result = ledger.acquire(AcquireRequest("s", "m", "", 1, 0), now, now)
    assert isinstance(result, Granted | Rejected)
    return result


def test_a_huge_overrun_costs_at_most_one_capacity_of_debt() -> None:
    led = Ledger(CONFIG, T0)
    g = one_token(led, T0)
    assert isinstance(g, Granted)
    settled, _ = led.report(g.reservation.id, 10**12, 10**12, Outcome.OK, 0, T0)
    assert settled.settlement is not None
    assert settled.settlement.overrun.input_tokens == 10**12 - 1  # what the caller said
    b = led.bucket(KEY, T0)
    assert (b.levels[1], b.levels[2]) == (-600.0, -300.0)  # what it may cost: one capacity
    refused = one_token(led, T0)
    assert isinstance(refused, Rejected)
    assert 60.0 < refused.retry_after_s <= 120.0  # refills from -600 to 1 in ~60.1 s
    assert isinstance(one_token(led, T0 + 61), Granted)


def test_debt_from_an_older_state_is_bounded_at_restart() -> None:
    led = Ledger(CONFIG, T0)
    led.restore(Snapshot((), (BucketLevels(KEY, 5.0, -999_999_993_999.0, 1e15, T0),), ()), T0)
    b = led.bucket(KEY, T0)
    assert b.levels == [5.0, -600.0, 300.0]


def test_reset_forgives_debt_and_wakes_waiters() -> None:
    led = Ledger(CONFIG, T0)
    g = one_token(led, T0)
    assert isinstance(g, Granted)
    led.report(g.reservation.id, 10**12, 0, Outcome.OK, 0, T0)
    w = led.acquire(AcquireRequest("s", "m", "", 500, 0), T0, T0 + 30)
    assert not isinstance(w, Granted | Rejected)
    led.take_changes()
    assert led.reset_bucket(KEY, T0 + 1)
    assert isinstance(w.result, Granted)  # granted at once, not after two minutes
    # Full after the reset, less the waiter's 500 and the refill allowance charged to a take
    # from full (0.1 s of 600 a minute: 1)
    assert led.bucket(KEY, T0 + 1).levels[1] == 99.0
    journaled = [c for c in led.take_changes() if isinstance(c, BucketLevels)]
    assert journaled and journaled[-1].input_tokens == 99.0
    assert not led.reset_bucket(BucketKey("s", "nothing"), T0 + 1)


# ---- end to end: a daemon process on a SQLite file, restarted, and the CLI


@contextmanager
def daemon(config: Path, db: Path) -> Iterator[pb_grpc.LimiterStub]:
    proc, target = serve("--config", str(config), "--db", str(db))
    try:
        with grpc.insecure_channel(target) as ch:
            stub = pb_grpc.LimiterStub(ch)
            stub.target = target  # type: ignore[attr-defined]
            yield stub
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=20)


def retry_after_ms(stub: pb_grpc.LimiterStub, tokens: int) -> int:
    with pytest.raises(grpc.RpcError) as e:
        stub.Acquire(pb.AcquireRequest(scope="s", model="tiny", input_tokens=tokens))
    assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    return int(dict(e.value.trailing_metadata())["retry-after-ms"])


def reset(stub: pb_grpc.LimiterStub, *args: str) -> subprocess.CompletedProcess[str]:
    return cli("reset", "--target", stub.target, *args)  # type: ignore[attr-defined]


def test_report_of_10_to_the_12_then_restart_then_reset(tmp_path: Path) -> None:
    config, db = tmp_path / "limiterd.toml", tmp_path / "db.sqlite3"
    config.write_text(TEST_CONFIG_TOML)  # tiny: 1000 input tokens a minute
    with daemon(config, db) as stub:
        g = stub.Acquire(pb.AcquireRequest(scope="s", model="tiny", input_tokens=1))
        stub.Report(pb.ReportRequest(reservation_id=g.reservation_id,
                                     actual_input_tokens=10**12, outcome=pb.OK))
        # -1000 at most: one token is ~60 s of refill away, not 317 years.
        assert 55_000 <= retry_after_ms(stub, 1) <= 61_000
        reported = time.monotonic()
    with daemon(config, db) as stub:
        # Still owed, still bounded (less what refilled while the daemon restarted).
        since_ms = (time.monotonic() - reported) * 1000
        assert 60_000 - since_ms - 1000 <= retry_after_ms(stub, 1) <= 61_000
        out = reset(stub, "--scope", "s", "--model", "tiny")
        assert out.returncode == 0, out.stderr
        assert out.stdout.startswith("reset 1 bucket:") and "1,000/1,000" in out.stdout
    with daemon(config, db) as stub:  # the reset was journaled
        assert stub.Acquire(pb.AcquireRequest(scope="s", model="tiny", input_tokens=1000))
        missing = reset(stub, "--scope", "s", "--model", "claude-x")
        assert missing.returncode != 0
        assert "NOT_FOUND" in missing.stderr and "nothing to reset" in missing.stderr
        bad = reset(stub, "--model", "tiny")
        assert bad.returncode == 2 and "--scope" in bad.stderr
