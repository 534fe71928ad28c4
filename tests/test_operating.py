"""Operating the sidecar: metrics scraped over HTTP, the operator CLI against a real daemon
process, reload (RPC, SIGHUP, a ConfigMap-style symlink swap), TLS, mTLS and the admin token."""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from limiterd.server import Security, running_server
from limiterd_client.proto.limiter.v1 import limiter_pb2 as pb
from limiterd_client.proto.limiter.v1 import limiter_pb2_grpc as pb_grpc
from tests.conftest import TEAM_A, TEST_CONFIG_TOML, make_test_config
from tests.metrics_scrape import calls_counted, scrape, scrape_once
from tests.test_process import ROOT, refused_port, serve, wait_for


async def test_metrics_move_as_calls_are_made() -> None:
    async with running_server(config=make_test_config(), metrics_listen="127.0.0.1:0") as d:
        port = d.metrics_target
        before = await asyncio.to_thread(scrape, port)
        assert before[("limiterd_open_reservations", ())] == 0
        async with grpc.aio.insecure_channel(d.target) as ch:
            stub = pb_grpc.LimiterStub(ch)
            g = await stub.Acquire(pb.AcquireRequest(scope=TEAM_A, model="tiny",
                                                     input_tokens=300, max_output_tokens=200))
            mid = await scrape_once(port, calls_counted("Acquire", 1))
            assert mid[("limiterd_open_reservations", ())] == 1
            assert mid[("limiterd_acquires_total", (("result", "granted"),))] == 1
            level = ("limiterd_bucket_level",
                     (("dimension", "input_tokens"), ("model", "tiny"), ("scope", "team-a")))
            assert 700 <= mid[level] < 710
            await stub.Report(pb.ReportRequest(
                reservation_id=g.reservation_id, actual_input_tokens=250,
                actual_output_tokens=50, outcome=pb.RATE_LIMITED, retry_after_ms=5000,
                provider=pb.ProviderInfo(http_status=429)))
            with pytest.raises(grpc.aio.AioRpcError):
                await stub.Acquire(pb.AcquireRequest(scope="unconfigured", model="tiny",
                                                     input_tokens=5000))
            await stub.Acquire(pb.AcquireRequest(scope="unconfigured", model="tiny",
                                                 input_tokens=1, user="alice"))
        after = await scrape_once(port, calls_counted("Acquire", 3))
    assert after[("limiterd_reports_total", (("outcome", "RATE_LIMITED"),))] == 1
    tokens = "limiterd_tokens_total"
    assert after[(tokens, (("dimension", "input_tokens"), ("kind", "refunded")))] == 50
    assert after[(tokens, (("dimension", "output_tokens"), ("kind", "refunded")))] == 150
    assert after[("limiterd_rate_limit_pauses_total", ())] == 1
    assert after[("limiterd_active_pauses", ())] == 1
    assert after[("limiterd_acquires_total", (("result", "rejected"),))] == 1
    failures = "limiterd_provider_failures_total"
    assert after[(failures, (("model", "tiny"), ("status_class", "429")))] == 1
    rpc = "limiterd_rpc_duration_seconds_bucket"
    assert (rpc, (("le", "0.0005"), ("method", "Acquire"))) in after  # sub-millisecond buckets
    labels = {dict(k[1]).get("scope") for k in after}
    assert "other" in labels and "unconfigured" not in labels  # raw scopes never become labels
    assert not any("alice" in str(k) for k in after)  # nor do user ids


@pytest.fixture
def daemon_with_config(tmp_path: Path) -> Iterator[tuple[subprocess.Popen[str], str, Path]]:
    """A daemon process whose config is a ConfigMap-style mount: file -> ..data/file."""
    mount = tmp_path / "configmap"
    (mount / "..v1").mkdir(parents=True)
    (mount / "..v1" / "limiterd.toml").write_text(TEST_CONFIG_TOML)
    os.symlink("..v1", mount / "..data")
    os.symlink("..data/limiterd.toml", mount / "limiterd.toml")
    proc, target = serve("--config", str(mount / "limiterd.toml"),
                         "--db", str(tmp_path / "db.sqlite3"), "--watch-config", "0.2")
    try:
        yield proc, target, mount
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=20)


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, PYTHONPATH=f"{ROOT}:{ROOT / 'client' / 'src'}")
    return subprocess.run([sys.executable, "-m", "limiterd", *args], capture_output=True,
                          text=True, env=env, timeout=60)


def tiny_capacity(target: str) -> int:
    out = cli("buckets", "--target", target, "--model", "tiny", "--json")
    assert out.returncode == 0, out.stderr
    dims = json.loads(out.stdout)["buckets"][0]["dimensions"]
    return int(next(d["capacity"] for d in dims if d["name"] == "input_tokens"))


def swap_config(mount: Path, version: str, text: str) -> None:
    """What the kubelet does: a new folder, then an atomic rename of the ..data symlink."""
    (mount / version).mkdir()
    (mount / version / "limiterd.toml").write_text(text)
    os.symlink(version, mount / "..data_tmp")
    os.replace(mount / "..data_tmp", mount / "..data")


def test_cli_against_a_running_daemon(
    daemon_with_config: tuple[subprocess.Popen[str], str, Path],
) -> None:
    _, target, _ = daemon_with_config
    with grpc.insecure_channel(target) as ch:
        stub = pb_grpc.LimiterStub(ch)
        a = stub.Acquire(pb.AcquireRequest(scope=TEAM_A, model="tiny", input_tokens=500,
                                           lease_ms=50_000))
        stub.Acquire(pb.AcquireRequest(scope="other", model="claude-x", input_tokens=7,
                                       lease_ms=20_000))
    out = cli("leases", "--target", target)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0].split()[:3] == ["RESERVATION_ID", "SCOPE", "MODEL"]
    assert "claude-x" in lines[1] and "team-a" in lines[2]  # soonest expiry first
    js = json.loads(cli("leases", "--target", target, "--scope", "team-a", "--json").stdout)
    assert [r["reservation_id"] for r in js] == [a.reservation_id]
    out = cli("buckets", "--target", target)
    assert out.returncode == 0
    # 500 of 1,000 input tokens taken; the CLI's start-up lets some refill (16.7 a second).
    row = r"team-a\s+tiny\s+\d+/10\s+[5-9]\d\d/1,000\s+1,000/1,000"
    assert re.search(row, out.stdout), out.stdout
    out = cli("watch", "--target", target, "--iterations", "1")
    assert out.returncode == 0 and "recent grants:" in out.stdout and "team-a" in out.stdout
    out = cli("release", "--target", target, a.reservation_id)
    assert out.returncode == 0 and "refunded 1 request, 500 input" in out.stdout
    out = cli("release", "--target", target, "f" * 32)
    assert out.returncode == 1 and out.stderr.startswith("limiterd: NOT_FOUND")
    out = cli("release", "--target", target, "nope")
    assert out.returncode == 1 and "INVALID_ARGUMENT" in out.stderr
    with refused_port() as port:
        out = cli("leases", "--target", f"127.0.0.1:{port}")
    assert out.returncode == 3
    assert out.stderr.count("\n") == 1 and "cannot reach the daemon" in out.stderr
    assert "Traceback" not in out.stderr


# The watcher looks every 0.2 s; the bound only turns a watcher that never sees the change into
# a failure (5 s was missed once on a loaded machine).
RELOAD_BOUND_S = 60


def test_reload_keeps_reservations_and_rejects_bad_configs(
    daemon_with_config: tuple[subprocess.Popen[str], str, Path],
) -> None:
    proc, target, mount = daemon_with_config
    with grpc.insecure_channel(target) as ch:
        grant = pb_grpc.LimiterStub(ch).Acquire(pb.AcquireRequest(
            scope="s", model="tiny", input_tokens=400))
    assert tiny_capacity(target) == 1000
    # A ConfigMap update: the watcher follows the symlink swap.
    swap_config(mount, "..v2", TEST_CONFIG_TOML.replace(
        "input_tokens_per_minute = 1000\n", "input_tokens_per_minute = 2000\n", 1))
    wait_for(lambda: tiny_capacity(target) == 2000, timeout=RELOAD_BOUND_S)
    leases = json.loads(cli("leases", "--target", target, "--json").stdout)
    assert [r["reservation_id"] for r in leases] == [grant.reservation_id]
    # An invalid config is rejected; the running one stays in force.
    swap_config(mount, "..v3", '[models."tiny"]\nrequests_per_minute = -1\n')
    out = cli("reload", "--target", target)
    assert out.returncode == 1 and "requests_per_minute" in out.stderr
    assert tiny_capacity(target) == 2000
    # SIGHUP applies a good one.
    swap_config(mount, "..v4", TEST_CONFIG_TOML)
    proc.send_signal(signal.SIGHUP)
    wait_for(lambda: tiny_capacity(target) == 1000, timeout=RELOAD_BOUND_S)


def make_certs(d: Path) -> dict[str, Path]:
    """A CA, a server cert for 127.0.0.1 and a client cert, with the openssl CLI."""
    def run(*args: str) -> None:
        subprocess.run(["openssl", *args], check=True, capture_output=True, cwd=d)

    run("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out", "ca.pem",
        "-days", "2", "-subj", "/CN=limiterd test CA")
    (d / "san.ext").write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n")
    for name in ("server", "client"):
        run("req", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{name}.key", "-out",
            f"{name}.csr", "-subj", f"/CN={name}")
        run("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca.key",
            "-CAcreateserial", "-out", f"{name}.pem", "-days", "2", "-extfile", "san.ext")
    return {n: d / n for n in ("ca.pem", "server.pem", "server.key", "client.pem", "client.key")}


@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl command")
async def test_tls_and_mutual_tls(tmp_path: Path) -> None:
    c = make_certs(tmp_path)
    req = pb.AcquireRequest(scope="s", model="tiny", input_tokens=1)
    tls = Security(tls_cert=str(c["server.pem"]), tls_key=str(c["server.key"]))
    async with running_server(config=make_test_config(), security=tls) as d:
        creds = grpc.ssl_channel_credentials(root_certificates=c["ca.pem"].read_bytes())
        async with grpc.aio.secure_channel(d.target, creds) as ch:
            assert (await pb_grpc.LimiterStub(ch).Acquire(req)).reserved_input_tokens == 1
        async with grpc.aio.insecure_channel(d.target) as ch:
            with pytest.raises(grpc.aio.AioRpcError):
                await pb_grpc.LimiterStub(ch).Acquire(req, timeout=2)
    mtls = Security(tls_cert=str(c["server.pem"]), tls_key=str(c["server.key"]),
                    tls_client_ca=str(c["ca.pem"]))
    async with running_server(config=make_test_config(), security=mtls) as d:
        no_cert = grpc.ssl_channel_credentials(root_certificates=c["ca.pem"].read_bytes())
        async with grpc.aio.secure_channel(d.target, no_cert) as ch:
            with pytest.raises(grpc.aio.AioRpcError):
                await pb_grpc.LimiterStub(ch).Acquire(req, timeout=2)
        with_cert = grpc.ssl_channel_credentials(
            root_certificates=c["ca.pem"].read_bytes(),
            private_key=c["client.key"].read_bytes(),
            certificate_chain=c["client.pem"].read_bytes())
        async with grpc.aio.secure_channel(d.target, with_cert) as ch:
            assert (await pb_grpc.LimiterStub(ch).Acquire(req)).reserved_input_tokens == 1


async def test_admin_token_guards_admin_calls_only() -> None:
    async with running_server(config=make_test_config(),
                              security=Security(admin_token="s3cret")) as d:
        async with grpc.aio.insecure_channel(d.target) as ch:
            limiter, admin = pb_grpc.LimiterStub(ch), pb_grpc.AdminStub(ch)
            await limiter.Acquire(pb.AcquireRequest(scope="s", model="tiny", input_tokens=1))
            for token in ((), (("x-limiterd-admin-token", "wrong"),)):
                with pytest.raises(grpc.aio.AioRpcError) as err:
                    await admin.ListLeases(pb.ListLeasesRequest(), metadata=token)
                assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
            ok = await admin.ListLeases(pb.ListLeasesRequest(),
                                        metadata=(("x-limiterd-admin-token", "s3cret"),))
            assert len(ok.leases) == 1


async def test_admin_on_a_separate_listener() -> None:
    async with running_server(config=make_test_config(), admin_listen="127.0.0.1:0") as d:
        assert d.admin_target.startswith("127.0.0.1:") and d.admin_target != d.target
        async with grpc.aio.insecure_channel(d.target) as ch:
            await pb_grpc.LimiterStub(ch).Acquire(pb.AcquireRequest(
                scope="s", model="tiny", input_tokens=1))
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await pb_grpc.AdminStub(ch).ListLeases(pb.ListLeasesRequest())
            assert err.value.code() == grpc.StatusCode.UNIMPLEMENTED
        async with grpc.aio.insecure_channel(d.admin_target) as ch:
            leases = await pb_grpc.AdminStub(ch).ListLeases(pb.ListLeasesRequest())
            assert len(leases.leases) == 1


def test_error_log_survives_a_restart_and_filters(tmp_path: Path) -> None:
    config = tmp_path / "limiterd.toml"
    config.write_text(TEST_CONFIG_TOML)
    db = tmp_path / "db.sqlite3"

    def start() -> tuple[subprocess.Popen[str], str]:
        return serve("--config", str(config), "--db", str(db))

    proc, target = start()
    try:
        with grpc.insecure_channel(target) as ch:
            stub = pb_grpc.LimiterStub(ch)
            for model, outcome, status, kind in (
                ("claude-a", pb.RATE_LIMITED, 429, "rate_limit_error"),
                ("claude-b", pb.OVERLOADED, 529, "overloaded_error"),
                ("claude-a", pb.OK, 200, ""),
            ):
                g = stub.Acquire(pb.AcquireRequest(scope=TEAM_A, model=model,
                                                   input_tokens=1))
                stub.Report(pb.ReportRequest(
                    reservation_id=g.reservation_id, outcome=outcome,
                    provider=pb.ProviderInfo(http_status=status, error_type=kind,
                                             request_id=f"req_{status}", fell_back=status == 529)))
    finally:
        proc.send_signal(signal.SIGTERM)  # a clean stop writes what the log holds
        proc.communicate(timeout=20)
    proc, target = start()
    try:
        out = cli("errors", "--target", target, "--json")
        assert out.returncode == 0, out.stderr
        rows = json.loads(out.stdout)
        assert [(r["model"], r["status"], r["outcome"]) for r in rows] == [
            ("claude-b", 529, "OVERLOADED"), ("claude-a", 429, "RATE_LIMITED")]
        assert rows[0]["scope"] == "team-a" and rows[0]["fell_back"] == "yes"
        assert rows[1]["request_id"] == "req_429"
        only = json.loads(cli("errors", "--target", target, "--status", "429", "--json").stdout)
        assert [r["model"] for r in only] == ["claude-a"]
        assert json.loads(cli("errors", "--target", target, "--model", "claude-x",
                              "--json").stdout) == []
        table_out = cli("errors", "--target", target, "--since", "1h")
        assert table_out.returncode == 0 and "overloaded_error" in table_out.stdout
        bad = cli("errors", "--target", target, "--since", "yesterday-ish")
        assert bad.returncode == 2 and "--since" in bad.stderr
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=20)


async def test_logs_carry_no_scope_user_or_request_text(caplog: pytest.LogCaptureFixture) -> None:
    """The daemon never receives raw keys or prompts; it also keeps what it does receive
    (scope hashes, user ids, request ids) out of its logs, even at debug level."""
    caplog.set_level("DEBUG")
    secrets = ("scope-hash-0123456789abcdef", "alice@example.com", "request-id-secret")
    async with running_server(config=make_test_config()) as d:
        async with grpc.aio.insecure_channel(d.target) as ch:
            stub = pb_grpc.LimiterStub(ch)
            g = await stub.Acquire(pb.AcquireRequest(
                scope=secrets[0], model="tiny", user=secrets[1], input_tokens=5,
                request_id=secrets[2]))
            await stub.Report(pb.ReportRequest(reservation_id=g.reservation_id, outcome=pb.ERROR,
                                               provider=pb.ProviderInfo(http_status=500)))
            with pytest.raises(grpc.aio.AioRpcError):
                await stub.Acquire(pb.AcquireRequest(scope=secrets[0], model="nope",
                                                     user=secrets[1]))
    assert caplog.records, "nothing was logged at all: the check would prove nothing"
    for secret in secrets:
        assert secret not in caplog.text
