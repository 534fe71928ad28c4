"""The daemon as a real process: startup errors, SIGTERM drain, exit codes."""

from __future__ import annotations

import os
import re
import select
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from limiterd_client.proto.limiter.v1 import limiter_pb2 as pb
from limiterd_client.proto.limiter.v1 import limiter_pb2_grpc as pb_grpc
from tests.conftest import TEST_CONFIG_TOML

ROOT = Path(__file__).resolve().parent.parent


# Daemons listen on port 0 and the test reads the port from the start-up line: a port picked
# free beforehand can be taken by another process before the daemon binds it.
ANY_PORT = "127.0.0.1:0"
SERVING = re.compile(r"limiterd serving on (\S+?)(?: \(admin on (\S+?)\))?;")


@contextmanager
def refused_port() -> Iterator[int]:
    """A loopback port that refuses connections: bound, never listening, held meanwhile."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        yield int(s.getsockname()[1])


class Daemon(subprocess.Popen[str]):
    """A limiterd process. What it wrote to stderr while the test waited for its start-up
    line is given back at the front of communicate()'s stderr."""

    said = ""

    def communicate(self, input: str | None = None,  # noqa: A002 (Popen's own name)
                    timeout: float | None = None) -> tuple[str, str]:
        out, err = super().communicate(input, timeout)
        return out, self.said + (err or "")

    def serving_on(self, timeout: float = 30) -> str:
        """The address the daemon says it serves on, once it says so (it is serving then)."""
        assert self.stderr is not None
        fd, deadline, said = self.stderr.fileno(), time.monotonic() + timeout, b""
        while (found := SERVING.search(said.decode(errors="replace"))) is None:
            left = deadline - time.monotonic()
            assert left > 0, f"daemon did not say where it serves: {said.decode()!r}"
            if select.select([fd], [], [], left)[0]:
                chunk = os.read(fd, 65536)
                if not chunk:
                    self.said = said.decode(errors="replace")
                    out, err = self.communicate(timeout=10)
                    raise AssertionError(f"daemon exited ({self.returncode}): {err}")
                said += chunk
        self.said = said.decode(errors="replace")
        return found.group(1)


def limiterd(*args: str, cwd: Path | None = None, env: dict[str, str] | None = None) -> Daemon:
    env = dict(os.environ, PYTHONPATH=f"{ROOT}:{ROOT / 'client' / 'src'}", **(env or {}))
    return Daemon(
        [sys.executable, "-m", "limiterd", *args], cwd=cwd or ROOT, env=env,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )


def serve(*args: str, cwd: Path | None = None, env: dict[str, str] | None = None,
          listen: str = ANY_PORT) -> tuple[Daemon, str]:
    """`limiterd serve` on a port of the kernel's choosing; the process and its target,
    once it serves."""
    proc = limiterd("serve", *(("--listen", listen) if listen else ()), *args, cwd=cwd, env=env)
    try:
        return proc, proc.serving_on()
    except BaseException:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
        raise


def wait_serving(target: str, proc: subprocess.Popen[str], timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    with grpc.insecure_channel(target) as ch:
        health = health_pb2_grpc.HealthStub(ch)
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise AssertionError(f"daemon exited: {proc.communicate()}")
            try:
                if health.Check(health_pb2.HealthCheckRequest(), timeout=0.5).status == 1:
                    return
            except grpc.RpcError:
                time.sleep(0.05)
    raise AssertionError("daemon did not become healthy")


@pytest.fixture
def config_file(tmp_path: Path) -> Path:
    p = tmp_path / "limiterd.toml"
    p.write_text(TEST_CONFIG_TOML)
    return p


@contextmanager
def running_daemon(config_file: Path, grace_s: int = 5
                   ) -> Iterator[tuple[subprocess.Popen[str], str]]:
    proc, target = serve("--config", str(config_file), "--db", ":memory:",
                         "--grace", str(grace_s))
    try:
        yield proc, target
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()


@pytest.fixture
def daemon_proc(config_file: Path) -> Iterator[tuple[subprocess.Popen[str], str]]:
    with running_daemon(config_file) as (proc, target):
        yield proc, target


def queue_depth(target: str) -> int:
    with grpc.insecure_channel(target) as ch:
        buckets = pb_grpc.AdminStub(ch).GetBuckets(pb.GetBucketsRequest(), timeout=5).buckets
    return sum(b.queue_depth for b in buckets)


def wait_for(condition: Callable[[], bool], timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.02)


def test_sigterm_ends_waits_at_once_with_a_retry_after_and_exits_zero(
    daemon_proc: tuple[subprocess.Popen[str], str],
) -> None:
    proc, target = daemon_proc
    with grpc.insecure_channel(target) as ch:
        stub = pb_grpc.LimiterStub(ch)
        stub.Acquire(pb.AcquireRequest(scope="s", model="tiny", input_tokens=1000))
        waiting = stub.Acquire.future(pb.AcquireRequest(
            scope="s", model="tiny", input_tokens=100, max_wait_ms=30_000))
        streaming = stub.AcquireStream(pb.AcquireRequest(
            scope="s", model="tiny", input_tokens=100, max_wait_ms=30_000))
        assert next(streaming).HasField("queued")
        wait_for(lambda: queue_depth(target) == 2)
        proc.send_signal(signal.SIGTERM)
        # Not held through the grace (5 s) and then cut off without advice: told at once
        # when to come back (the wait would have outlasted the daemon anyway).
        for call in (waiting, streaming):
            with pytest.raises(grpc.RpcError) as err:
                waiting.result(timeout=10) if call is waiting else list(streaming)
            assert err.value.code() == grpc.StatusCode.UNAVAILABLE
            assert "shutting down" in err.value.details()
            assert dict(err.value.trailing_metadata())["retry-after-ms"] == "1000"
    out, errs = proc.communicate(timeout=10)
    assert proc.returncode == 0, errs
    assert "stopped cleanly" in errs


def test_a_second_signal_cuts_the_drain_short(config_file: Path) -> None:
    with running_daemon(config_file, grace_s=60) as (proc, target), \
            grpc.insecure_channel(target) as ch:
        # A health watch stays open until the grace ends (60 s here): the drain holds.
        watch = health_pb2_grpc.HealthStub(ch).Watch(health_pb2.HealthCheckRequest())
        assert next(watch).status == health_pb2.HealthCheckResponse.SERVING
        proc.send_signal(signal.SIGINT)
        assert next(watch).status == health_pb2.HealthCheckResponse.NOT_SERVING
        proc.send_signal(signal.SIGINT)
        out, errs = proc.communicate(timeout=20)  # well inside the 60 s grace
    assert proc.returncode == 0, errs
    assert "second signal" in errs and "stopped cleanly" in errs


def test_invalid_config_is_one_clear_error(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text('[models."m"]\nrequests_per_minute = -1\n')
    proc = limiterd("serve", "--config", str(bad), "--db", ":memory:",
                    "--listen", ANY_PORT)
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 2
    assert f"{bad}: models.m.requests_per_minute" in err or "requests_per_minute" in err
    assert "Traceback" not in err


def test_listen_address_in_use_is_one_line(
    daemon_proc: tuple[subprocess.Popen[str], str],
) -> None:
    _, target = daemon_proc
    proc = limiterd("serve", "--listen", target, "--db", ":memory:")
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 1
    assert f"cannot listen on {target}" in err
    assert "Traceback" not in err


def test_check_config(config_file: Path, tmp_path: Path) -> None:
    ok = limiterd("check-config", str(config_file))
    out, err = ok.communicate(timeout=30)
    assert ok.returncode == 0, err
    missing = limiterd("check-config", str(tmp_path / "nope.toml"))
    out, err = missing.communicate(timeout=30)
    assert missing.returncode == 2 and "nope.toml" in err and "Traceback" not in err


def test_unix_socket_listen(tmp_path: Path, config_file: Path) -> None:
    sock = tmp_path / "limiterd.sock"
    proc = limiterd("serve", "--listen", str(sock), "--config", str(config_file),
                    "--db", ":memory:", "--unix-socket-mode", "600")
    try:
        wait_serving(f"unix:{sock}", proc)
        assert (sock.stat().st_mode & 0o777) == 0o600
        with grpc.insecure_channel(f"unix:{sock}") as ch:
            grant = pb_grpc.LimiterStub(ch).Acquire(
                pb.AcquireRequest(scope="s", model="tiny", input_tokens=1))
            assert grant.reserved_input_tokens == 1
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=15)
    assert proc.returncode == 0
