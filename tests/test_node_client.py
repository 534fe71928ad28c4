"""The Node.js example client (clients/node) against a real daemon subprocess.

Proves the API is usable from another language with nothing but limiter.proto: `npm ci` from
the committed lockfile, then `node acquire_report.js` does Acquire -> Report over loopback.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

REPO = Path(__file__).resolve().parent.parent
NODE_DIR = REPO / "clients" / "node"
STARTUP_TIMEOUT_S = 30.0
CLIENT_TIMEOUT_S = 60.0

NODE = shutil.which("node")
NPM = shutil.which("npm")
pytestmark = pytest.mark.skipif(
    NODE is None or NPM is None,
    reason="node and npm are not installed; the Node.js client cannot be run",
)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@pytest.fixture(scope="module")
def node_client(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A copy of clients/node with its locked dependencies installed by `npm ci`.

    The copy keeps the repo layout (proto/ two levels up, as a symlink) so the script's default
    proto path is the one exercised, and the work tree's node_modules is left alone.
    """
    root = tmp_path_factory.mktemp("nodeclient")
    (root / "proto").symlink_to(REPO / "proto", target_is_directory=True)
    work = root / "clients" / "node"
    work.mkdir(parents=True)
    for name in ("package.json", "package-lock.json", "acquire_report.js"):
        shutil.copy2(NODE_DIR / name, work / name)
    assert NPM is not None
    done = subprocess.run(
        [NPM, "ci", "--ignore-scripts", "--no-audit", "--no-fund"],
        cwd=work, capture_output=True, text=True, timeout=300, check=False,
    )
    assert done.returncode == 0, f"npm ci failed:\n{done.stdout}\n{done.stderr}"
    return work / "acquire_report.js"


def wait_serving(target: str, proc: subprocess.Popen[str], timeout_s: float) -> None:
    """Poll grpc.health.v1.Health/Check until SERVING; fail early if the daemon exits."""
    deadline = time.monotonic() + timeout_s
    last: Exception | str = "no answer"
    with grpc.insecure_channel(target) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                _, err = proc.communicate()
                pytest.fail(f"limiterd exited with {proc.returncode} before serving:\n{err}")
            try:
                reply = stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=1.0)
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    return
                last = f"status {reply.status}"
            except grpc.RpcError as exc:
                last = exc
            time.sleep(0.1)
    pytest.fail(f"limiterd at {target} not SERVING after {timeout_s}s: {last}")


@pytest.fixture
def start_daemon(tmp_path: Path) -> Iterator[Callable[[str], str]]:
    """Start `python -m limiterd serve` with the given TOML config; returns its target."""
    procs: list[subprocess.Popen[str]] = []

    def start(config_toml: str) -> str:
        config = tmp_path / f"limiterd{len(procs)}.toml"
        config.write_text(config_toml)
        target = f"127.0.0.1:{free_port()}"
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(
            [str(REPO), str(REPO / "client" / "src"), env.get("PYTHONPATH", "")]
        )
        proc = subprocess.Popen(
            [sys.executable, "-m", "limiterd", "serve",
             "--listen", target, "--db", ":memory:", "--config", str(config)],
            cwd=tmp_path, env=env, text=True,
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        )
        procs.append(proc)
        wait_serving(target, proc, STARTUP_TIMEOUT_S)
        return target

    yield start
    for proc in procs:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.communicate(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.communicate()


def run_client(script: Path, *args: str) -> subprocess.CompletedProcess[str]:
    assert NODE is not None
    return subprocess.run(
        [NODE, str(script), *args],
        capture_output=True, text=True, timeout=CLIENT_TIMEOUT_S, check=False,
    )


MODEL_CONFIG = """\
[models."claude-test"]
requests_per_minute = {rpm}
input_tokens_per_minute = 100000
output_tokens_per_minute = 100000
"""


def test_acquire_then_report_settles(
    node_client: Path, start_daemon: Callable[[str], str]
) -> None:
    target = start_daemon(MODEL_CONFIG.format(rpm=100))
    done = run_client(
        node_client, "--target", target, "--scope", "scope-node", "--model", "claude-test",
        "--input-tokens", "1000", "--max-output-tokens", "500",
        "--actual-input-tokens", "1000", "--actual-output-tokens", "120",
    )
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert len(lines) == 1, done.stdout
    out = json.loads(lines[0])

    acquired = out["acquire"]
    assert acquired["reservation_id"]
    # int64 fields come back as decimal strings (proto3 JSON), so no precision is lost.
    assert int(acquired["reserved_requests"]) == 1
    assert int(acquired["reserved_input_tokens"]) == 1000
    assert int(acquired["reserved_output_tokens"]) == 500
    assert int(acquired["lease_expires_at_ms"]) > int(acquired["granted_at_ms"]) > 0
    assert acquired["replayed"] is False

    settlement = out["report"]["settlement"]
    assert settlement["reservation_id"] == acquired["reservation_id"]
    assert settlement["state"] == "REPORTED"
    assert int(settlement["refunded_output_tokens"]) == 500 - 120
    assert int(settlement["refunded_input_tokens"]) == 0
    assert int(settlement["overrun_input_tokens"]) == 0
    assert int(settlement["overrun_output_tokens"]) == 0
    assert out["report"]["replayed"] is False


def test_exhausted_prints_code_and_retry_after(
    node_client: Path, start_daemon: Callable[[str], str]
) -> None:
    target = start_daemon(MODEL_CONFIG.format(rpm=1))
    args = ("--target", target, "--scope", "scope-node", "--model", "claude-test",
            "--input-tokens", "10", "--max-output-tokens", "10")
    first = run_client(node_client, *args)
    assert first.returncode == 0, first.stderr
    # The one request a minute is spent; max_wait_ms defaults to 0, so no queueing.
    second = run_client(node_client, *args)
    assert second.returncode == 1, second.stdout
    assert second.stdout == ""
    lines = second.stderr.splitlines()
    assert len(lines) == 1, second.stderr
    assert lines[0].startswith("error: Acquire failed: RESOURCE_EXHAUSTED: ")
    assert "retry-after-ms=" in lines[0]
    retry_after_ms = int(lines[0].split("retry-after-ms=")[1].rstrip(")"))
    assert 0 < retry_after_ms <= 60_000


def test_unreachable_daemon_names_status(node_client: Path) -> None:
    target = f"127.0.0.1:{free_port()}"  # nothing listens there
    done = run_client(
        node_client, "--target", target, "--scope", "s", "--model", "claude-test",
        "--input-tokens", "1", "--max-output-tokens", "1", "--timeout-ms", "3000",
    )
    assert done.returncode == 1
    assert done.stderr.startswith("error: Acquire failed: UNAVAILABLE: ")
    assert len(done.stderr.splitlines()) == 1


def test_bad_flag_is_a_usage_error(node_client: Path) -> None:
    done = run_client(
        node_client, "--scope", "s", "--model", "m",
        "--input-tokens=-5", "--max-output-tokens", "1",
    )
    assert done.returncode == 2
    assert done.stderr.splitlines()[0] == (
        'error: --input-tokens must be a non-negative integer, got "-5"'
    )
