"""`python -m limiterd.healthcheck`, the probe of the deploy files, against a real daemon."""

from __future__ import annotations

import asyncio
import socket
from pathlib import Path

import pytest

from limiterd.healthcheck import main, probe_target
from limiterd.server import RunningServer, running_server
from tests.conftest import make_test_config


@pytest.mark.parametrize(
    ("listen", "target"),
    [
        ("127.0.0.1:50051", "127.0.0.1:50051"),
        ("0.0.0.0:50051", "127.0.0.1:50051"),  # bound everywhere: dial loopback
        ("[::]:9", "[::1]:9"),
        (":7", "127.0.0.1:7"),
        ("/run/limiterd.sock", "unix:/run/limiterd.sock"),
        ("unix:/run/limiterd.sock", "unix:/run/limiterd.sock"),
    ],
)
def test_probe_target(listen: str, target: str) -> None:
    assert probe_target(listen) == target


@pytest.mark.parametrize("bad", ["localhost", "host:port", "127.0.0.1:"])
def test_probe_target_rejects_non_addresses(bad: str) -> None:
    with pytest.raises(ValueError, match="host:port|port must be"):
        probe_target(bad)


async def run_main(*argv: str) -> int:
    # The check is a blocking gRPC call: keep it off the loop the daemon serves on.
    return await asyncio.to_thread(main, list(argv))


async def test_serving_daemon_passes(daemon: RunningServer) -> None:
    assert await run_main(daemon.target, "--timeout", "5") == 0


async def test_target_from_environment(
    daemon: RunningServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("LIMITERD_LISTEN", daemon.target)
    assert await run_main("--timeout", "5") == 0


async def test_draining_daemon_fails(capsys: pytest.CaptureFixture[str]) -> None:
    async with running_server(config=make_test_config()) as srv:
        await srv.health.enter_graceful_shutdown()  # what SIGTERM does first
        assert await run_main(srv.target, "--timeout", "5") == 1
    assert "is not serving: NOT_SERVING" in capsys.readouterr().err


async def test_unix_socket_daemon(tmp_path: Path) -> None:
    sock = tmp_path / "limiterd.sock"
    async with running_server(config=make_test_config(), listen=f"unix:{sock}"):
        assert await run_main(str(sock), "--timeout", "5") == 0


async def test_nothing_listening_fails(capsys: pytest.CaptureFixture[str]) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # bound but never listening: connections are refused
        assert await run_main(f"127.0.0.1:{port}", "--timeout", "2") == 1
    err = capsys.readouterr().err
    assert err.startswith(f"limiterd at 127.0.0.1:{port} is not serving: ")
    assert len(err.splitlines()) == 1
