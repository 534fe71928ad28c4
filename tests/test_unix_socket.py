"""Unix sockets: never more open than asked, and every tool reaches `./relative` paths."""

from __future__ import annotations

import asyncio
import os
import stat
import sys
from pathlib import Path

import pytest

from limiterd import server
from limiterd.address import bind_target, dial_target
from limiterd.server import running_server
from tests.conftest import make_test_config
from tests.test_process import ROOT


async def test_socket_is_never_more_open_than_asked(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    seen: list[int] = []
    chmod = os.chmod

    def spy(path: str, mode: int) -> None:  # the mode the socket had before the chmod
        seen.append(stat.S_IMODE(os.stat(path).st_mode))
        chmod(path, mode)

    monkeypatch.setattr(server.os, "chmod", spy)
    old = os.umask(0)  # the worst case: a umask that leaves a new socket 0777
    try:
        async with running_server(config=make_test_config(), listen=str(tmp_path / "l.sock"),
                                  unix_socket_mode=0o600) as d:
            assert stat.S_IMODE(os.stat(tmp_path / "l.sock").st_mode) == 0o600
            assert d.target == f"unix:{tmp_path / 'l.sock'}"
    finally:
        os.umask(old)
    assert seen == [0o600]
    assert os.umask(old) == old  # the process umask is back


def test_addresses() -> None:
    assert bind_target("./a.sock") == dial_target("./a.sock") == "unix:./a.sock"
    assert dial_target("/run/a.sock") == "unix:/run/a.sock"
    assert dial_target("0.0.0.0:50051") == "127.0.0.1:50051"
    assert bind_target("0.0.0.0:50051") == "0.0.0.0:50051"
    with pytest.raises(ValueError, match="host:port|port must be"):
        dial_target("localhost")
    # The CLI's --target goes through the client library's check: a URL is named as one,
    # not handed to gRPC's resolver (which answered with 'Misformatted domain name').
    with pytest.raises(ValueError, match="gRPC, not HTTP"):
        dial_target("http://127.0.0.1:50051")


async def test_cli_dials_a_relative_socket_path(tmp_path: Path) -> None:
    async with running_server(config=make_test_config(), listen=str(tmp_path / "r.sock")):
        env = dict(os.environ, PYTHONPATH=f"{ROOT}:{ROOT / 'client' / 'src'}")
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "limiterd", "buckets", "--target", "./r.sock", cwd=tmp_path,
            env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
        out, err = await proc.communicate()
    assert proc.returncode == 0, err.decode()
    assert out.decode().startswith("no buckets")
