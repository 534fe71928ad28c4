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
from collections.abc import Callable, Iterator
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


def free_cluster_port() -> int:
    """A free port whose cluster bus port (+10000) is free too, as Cluster needs."""
    for _ in range(200):
        port = free_port()
        if port > 55535:
            continue
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port + 10000))
            except OSError:
                continue
        return port
    raise RuntimeError("no free port pair for a cluster node")


PICKS = 5


class PortTaken(RuntimeError):
    """redis-server could not bind its port: another process holds it."""


class RedisServer:
    """One redis-server process. `aof`: append-only file, fsynced as `fsync` says ("always":
    every write, so a kill -9 loses nothing acknowledged; "everysec": once a second, the
    production default); otherwise no persistence at all."""

    def __init__(self, workdir: Path, aof: bool = False, port: int | None = None,
                 extra: tuple[str, ...] = (), config: Path | None = None,
                 fsync: str = "always") -> None:
        self.workdir = workdir
        self.aof = aof
        self.fsync = fsync
        self.port = port or free_port()
        # A port picked here can be taken before redis binds it: then another is picked. A
        # port asked for, or kept for a restart (clients hold its URL), stays as it is.
        self._may_repick = port is None
        self.extra = extra
        self.config = config  # a config file read first (a sentinel's must be writable)
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> RedisServer:
        for _ in range(PICKS):
            try:
                return self._start()
            except PortTaken:
                if not self._may_repick:
                    raise
                self.port = free_port()
        raise RuntimeError(f"no free port for redis-server in {PICKS} picks")

    def _start(self) -> RedisServer:
        self.workdir.mkdir(parents=True, exist_ok=True)
        args = [
            redis_server_binary(), *((str(self.config),) if self.config else ()),
            "--port", str(self.port), "--bind", "127.0.0.1",
            "--dir", str(self.workdir), "--save", "", "--daemonize", "no",
            "--logfile", str(self.workdir / "redis.log"),
            "--appendonly", "yes" if self.aof else "no",
            *(("--appendfsync", self.fsync) if self.aof else ()),
            *self.extra,
        ]
        self.proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                log = self.workdir / "redis.log"
                tail = log.read_text()[-500:] if log.exists() else ""
                if "Address already in use" in tail:
                    raise PortTaken(tail)
                raise RuntimeError(f"redis-server exited at start: {tail}")
            if self.ping():
                self._may_repick = False
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


def redis_cli(port: int, *args: str) -> str:
    """One redis-cli command against a loopback port; its output."""
    cli = shutil.which("redis-cli")
    if cli is None:
        pytest.fail("redis-cli is not installed (it comes with redis-server)", pytrace=False)
    return subprocess.run([cli, "-p", str(port), *args], capture_output=True, text=True,
                          timeout=10).stdout


def wait_for(what: str, check: Callable[[], bool], timeout_s: float = START_TIMEOUT_S) -> None:
    """Poll a Redis-side condition (a server coming up, a sentinel's view) until it holds."""
    deadline = time.monotonic() + timeout_s
    while not check():
        if time.monotonic() > deadline:
            raise RuntimeError(f"not reached in {timeout_s:g} s: {what}")
        time.sleep(0.05)  # polling Redis processes, not racing the code under test


@contextmanager
def redis_replica(workdir: Path, master: RedisServer) -> Iterator[RedisServer]:
    """A redis-server replicating `master`; yields once its link to the master is up."""
    replica = RedisServer(workdir, extra=("--replicaof", "127.0.0.1", str(master.port))).start()
    try:
        wait_for("the replica's link to its master", lambda: "master_link_status:up"
                 in redis_cli(replica.port, "info", "replication"))
        yield replica
    finally:
        replica.stop()


@contextmanager
def redis_sentinel(workdir: Path, master: RedisServer, service: str = "mymaster",
                   down_after_ms: int = 5000, failover_timeout_ms: int | None = None,
                   replicas: int = 0) -> Iterator[RedisServer]:
    """`redis-server --sentinel` on loopback, monitoring `master` under the name `service`;
    yields once it names that master's address (and knows its `replicas`)."""
    workdir.mkdir(parents=True, exist_ok=True)
    conf = workdir / "sentinel.conf"  # Sentinel rewrites it: one file of its own
    conf.write_text(f"sentinel monitor {service} 127.0.0.1 {master.port} 1\n"
                    f"sentinel down-after-milliseconds {service} {down_after_ms}\n"
                    + (f"sentinel failover-timeout {service} {failover_timeout_ms}\n"
                       if failover_timeout_ms is not None else ""))
    sentinel = RedisServer(workdir, config=conf, extra=("--sentinel",)).start()
    try:
        wait_for(f"the sentinel names {service}", lambda: redis_cli(
            sentinel.port, "sentinel", "get-master-addr-by-name", service
        ).split() == ["127.0.0.1", str(master.port)])
        wait_for(f"the sentinel knows {replicas} replicas", lambda: redis_cli(
            sentinel.port, "sentinel", "replicas", service).count("slave") >= replicas)
        yield sentinel
    finally:
        sentinel.stop()


@contextmanager
def redis_cluster(workdir: Path, masters: int = 3) -> Iterator[list[RedisServer]]:
    """A Redis Cluster of `masters` nodes on loopback, no replicas, created with
    `redis-cli --cluster create`; yields its nodes once every slot is served."""
    nodes = [RedisServer(workdir / f"node{i}", port=free_cluster_port(), extra=(
        "--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf",
        "--cluster-node-timeout", "2000")) for i in range(masters)]
    try:
        for n in nodes:
            n.start()
        cli = shutil.which("redis-cli")
        if cli is None:
            pytest.fail("redis-cli is not installed (it comes with redis-server)", pytrace=False)
        subprocess.run(
            [cli, "--cluster", "create", *(f"127.0.0.1:{n.port}" for n in nodes),
             "--cluster-replicas", "0", "--cluster-yes"],
            check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=60)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            states = [subprocess.run([cli, "-p", str(n.port), "cluster", "info"],
                                     capture_output=True, text=True, timeout=10).stdout
                      for n in nodes]
            if all("cluster_state:ok" in s for s in states):
                break
            time.sleep(0.1)  # polling the cluster forming, not racing the code under test
        else:
            raise RuntimeError("the cluster did not reach cluster_state:ok")
        yield nodes
    finally:
        for n in nodes:
            n.stop()
