"""Acknowledged means kept, even while the journal is failing.

A real daemon process journals to a real SQLite file on a tiny tmpfs; the disk is filled
until writes fail. Every Report, Release and KeepAlive answered OK must survive SIGKILL;
the ones refused with UNAVAILABLE are retried after the restart, as a client would.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import grpc
import pytest

from limiterd_client.proto.limiter.v1 import limiter_pb2 as pb
from limiterd_client.proto.limiter.v1 import limiter_pb2_grpc as pb_grpc
from tests.test_process import serve
from tests.test_sqlite_journal import tmpfs

CONFIG = """
[daemon]
default_lease_ms = 600000
max_lease_ms = 3600000

[models."m"]
requests_per_minute = 100000
input_tokens_per_minute = 10000000
output_tokens_per_minute = 10000000
"""


def open_leases(admin: pb_grpc.AdminStub) -> dict[str, pb.Lease]:
    page = admin.ListLeases(pb.ListLeasesRequest(page_size=1000))
    assert not page.next_page_token
    return {lease.reservation_id: lease for lease in page.leases}


def fill(disk: Path) -> Path:
    filler = disk / "filler"
    subprocess.run(["dd", "if=/dev/zero", f"of={filler}", "bs=4k"], capture_output=True)
    return filler


def test_no_answered_change_is_lost_when_the_journal_fails(tmp_path: Path) -> None:
    config = tmp_path / "limiterd.toml"
    config.write_text(CONFIG)
    with tmpfs(tmp_path / "fs", "4m") as disk:
        db = disk / "limiterd.sqlite3"
        proc, target = serve("--config", str(config), "--db", str(db))
        try:
            with grpc.insecure_channel(target) as ch:
                stub = pb_grpc.LimiterStub(ch)
                grants = [stub.Acquire(pb.AcquireRequest(
                    scope="s", model="m", input_tokens=10, max_output_tokens=10,
                    request_id=f"held-{i}")).reservation_id for i in range(60)]
                filler = fill(disk)
                # New grants need room the disk no longer has: the journal starts failing.
                for i in range(5000):
                    try:
                        stub.Acquire(pb.AcquireRequest(scope=f"new{i}", model="m",
                                                       input_tokens=1, request_id=f"n{i}"))
                    except grpc.RpcError as exc:
                        assert exc.code() == grpc.StatusCode.UNAVAILABLE, exc
                        break
                else:
                    pytest.fail("the journal never failed on a full disk")

                answered: dict[str, str] = {}  # reservation id -> what it was told OK
                refused: list[tuple[str, str]] = []
                for n, rid in enumerate(grants):
                    kind = ("report", "release", "keepalive")[n % 3]
                    try:
                        if kind == "report":
                            stub.Report(pb.ReportRequest(
                                reservation_id=rid, actual_input_tokens=5,
                                actual_output_tokens=5, outcome=pb.OK))
                        elif kind == "release":
                            stub.Release(pb.ReleaseRequest(reservation_id=rid))
                        else:
                            stub.KeepAlive(pb.KeepAliveRequest(reservation_id=rid,
                                                               lease_ms=3_000_000))
                    except grpc.RpcError as exc:
                        assert exc.code() == grpc.StatusCode.UNAVAILABLE, exc
                        assert "journal" in (exc.details() or "")
                        refused.append((rid, kind))
                    else:
                        answered[rid] = kind
        finally:
            proc.kill()  # SIGKILL: no flush, no goodbye
            proc.communicate()

        filler.unlink()
        proc, target = serve("--config", str(config), "--db", str(db))
        try:
            with grpc.insecure_channel(target) as ch:
                stub, admin = pb_grpc.LimiterStub(ch), pb_grpc.AdminStub(ch)
                leases = open_leases(admin)
                for rid, kind in answered.items():
                    if kind == "keepalive":
                        lease = leases[rid]
                        granted = lease.granted_at_ms
                        assert lease.lease_expires_at_ms >= granted + 3_000_000 - 60_000, (
                            f"the acknowledged KeepAlive of {rid} was lost")
                    else:
                        assert rid not in leases, f"the acknowledged {kind} of {rid} was lost"
                # The refused calls, retried as a client would, now succeed.
                for rid, kind in refused:
                    if kind == "report":
                        stub.Report(pb.ReportRequest(reservation_id=rid, actual_input_tokens=5,
                                                     actual_output_tokens=5, outcome=pb.OK))
                    elif kind == "release":
                        stub.Release(pb.ReleaseRequest(reservation_id=rid))
                    else:
                        stub.KeepAlive(pb.KeepAliveRequest(reservation_id=rid))
                assert set(open_leases(admin)) == {
                    rid for rid, kind in [*answered.items(), *refused] if kind == "keepalive"
                }
        finally:
            proc.kill()
            proc.communicate()
        # Every call came while the journal was failing: none could be answered OK honestly.
        assert refused and not answered
