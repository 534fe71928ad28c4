"""A real redis-server for tests: its own process, a free loopback port, its files in a temp dir.

`make test` installs Debian's redis-server when it is missing; run directly without it, the
tests that need it fail with one line that says so.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

START_TIMEOUT_S = 10.0


def redis_server_binary() -> str:
    path = shutil.which("redis-server")
    if path is None:
        pytest.fail("redis-server is not installed: run `make test` (it installs Debian's "
                    "redis-server) or `apt-get install redis-server`", pytrace=False)
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class RedisServer:
    """One redis-server process. `aof`: append-only file with fsync on every write (so a
    kill -9 loses nothing acknowledged); otherwise no persistence at all."""

    def __init__(self, workdir: Path, aof: bool = False, port: int | None = None,
                 extra: tuple[str, ...] = ()) -> None:
        self.workdir = workdir
        self.aof = aof
        self.port = port or free_port()
        self.extra = extra
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> RedisServer:
        self.workdir.mkdir(parents=True, exist_ok=True)
        args = [
            redis_server_binary(), "--port", str(self.port), "--bind", "127.0.0.1",
            "--dir", str(self.workdir), "--save", "", "--daemonize", "no",
            "--logfile", str(self.workdir / "redis.log"),
            "--appendonly", "yes" if self.aof else "no",
            *(("--appendfsync", "always") if self.aof else ()),
            *self.extra,
        ]
        self.proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                log = self.workdir / "redis.log"
                tail = log.read_text()[-500:] if log.exists() else ""
                raise RuntimeError(f"redis-server exited at start: {tail}")
            if self.ping():
                return self
            time.sleep(0.02)  # polling a process coming up, not racing the code under test
        raise RuntimeError(f"redis-server did not answer on port {self.port}")

    def ping(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=0.5) as s:
                s.sendall(b"PING\r\n")
                return s.recv(16).startswith(b"+PONG")
        except OSError:
            return False

    def kill(self) -> None:
        """kill -9: no shutdown, no final save."""
        if self.proc is not None and self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
        self.proc = None

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.kill()
        self.proc = None


@contextmanager
def redis_server(workdir: Path, **kw: object) -> Iterator[RedisServer]:
    server = RedisServer(workdir, **kw).start()  # type: ignore[arg-type]
    try:
        yield server
    finally:
        server.stop()
