"""The process: build the pieces, serve, and on SIGTERM stop accepting, drain, flush, exit.

One place owns the lifecycle (as uvicorn's Server and grpc's graceful-shutdown example do).
The CLI parses flags into ServeOptions and calls serve(); tests use running_server().
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import os
import re
import signal
import sys
import tempfile
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from limiterd.address import bind_target, is_socket_path
from limiterd.api.interceptors import AdminToken, Calls
from limiterd.api.service import AdminService, LimiterService
from limiterd.backend import Backend
from limiterd.clock import Clock, SystemClock
from limiterd.config.loader import DEFAULTS_SOURCE, ConfigError, load_config
from limiterd.config.model import Config
from limiterd.defaults import DEFAULT_DB, DEFAULT_GRACE_S, DEFAULT_LISTEN
from limiterd.engine import Engine
from limiterd.errorlog import ErrorLog
from limiterd.metrics import Metrics
from limiterd.shared.settings import SharedLedger
from limiterd.storage.base import Journal, StartupError
from limiterd.storage.factory import open_journal
from limiterd.storage.memory import MemoryJournal
from limiterd_client.proto.limiter.v1 import limiter_pb2 as pb
from limiterd_client.proto.limiter.v1 import limiter_pb2_grpc as pb_grpc

log = logging.getLogger("limiterd")

LIMITER = pb.DESCRIPTOR.services_by_name["Limiter"].full_name
ADMIN = pb.DESCRIPTOR.services_by_name["Admin"].full_name
SERVICE_NAMES = (LIMITER, ADMIN)
# A health "service" that details the ledger: NOT_SERVING while the journal cannot write or
# the shared ledger's Redis is away (the daemon itself, "", stays SERVING: it still answers,
# with UNAVAILABLE or from its local share). `grpc_health_probe -service limiterd.ledger`.
LEDGER_HEALTH = "limiterd.ledger"
LEDGER_HEALTH_EVERY_S = 1.0
DRAIN_RETRY_AFTER_S = 1.0  # what a wait ended by shutdown is told: a restart is quick
GC_THRESHOLD = 50_000  # allocations between young-generation collections (default 700)
# grpc's own line: "... (Error in bind for address '[::1]:50051': Address already in use)"
_BIND_REASON = re.compile(r"Error in bind for address '[^']*': ([^)]+)\)")


class ListenError(Exception):
    """The listen address cannot be bound, or TLS files cannot be read."""


@dataclass(frozen=True)
class Security:
    """Who may call. TLS applies to every listener; the token guards the Admin service."""

    tls_cert: str | None = None
    tls_key: str | None = None
    tls_client_ca: str | None = None  # given: clients must present a certificate it signed
    admin_token: str | None = None

    def credentials(self) -> grpc.ServerCredentials | None:
        if not self.tls_cert and not self.tls_key:
            return None
        if not (self.tls_cert and self.tls_key):
            raise ListenError("TLS needs both --tls-cert and --tls-key")
        try:
            key, cert = Path(self.tls_key).read_bytes(), Path(self.tls_cert).read_bytes()
            ca = Path(self.tls_client_ca).read_bytes() if self.tls_client_ca else None
        except OSError as exc:
            raise ListenError(f"cannot read a TLS file: {exc}") from exc
        return grpc.ssl_server_credentials(
            [(key, cert)], root_certificates=ca, require_client_auth=ca is not None
        )


@dataclass(frozen=True)
class ServeOptions:
    listen: str = DEFAULT_LISTEN
    config_path: str | None = None
    db: str = DEFAULT_DB
    synchronous: str = "NORMAL"
    grace_s: float = DEFAULT_GRACE_S
    unix_socket_mode: int = 0o660
    metrics_listen: str = ""
    admin_listen: str = ""  # given: the Admin service is served only there
    watch_config_s: float = 2.0  # 0 = off; polls the config's folder (ConfigMap swaps)
    security: Security = field(default_factory=Security)
    ledger: str | None = None  # redis:// URL of a shared ledger (overrides the config's)
    redis_password_file: str | None = None


class Reloader:
    """Applies a changed config; an invalid one is rejected and the old one stays."""

    def __init__(self, engine: Backend, path: str | None, metrics: Metrics | None) -> None:
        self.engine, self.path, self.metrics = engine, path, metrics
        self._seen = self._signature()

    @property
    def source(self) -> str:
        return self.path or DEFAULTS_SOURCE

    def reload(self) -> tuple[bool, str]:
        try:
            config = load_config(self.path)
        except ConfigError as exc:
            log.error("reload rejected, keeping the current config:\n%s", exc)
            self._count("rejected")
            return False, str(exc)
        self.engine.set_config(config)
        self._seen = self._signature()
        log.info("config reloaded from %s", self.source)
        self._count("applied")
        return True, f"reloaded {self.source}"

    def _count(self, result: str) -> None:
        if self.metrics is not None:
            self.metrics.reloads.labels(result).inc()

    def _signature(self) -> tuple[str, float, int] | None:
        """What identifies the file's content. A Kubernetes ConfigMap mount swaps a symlink
        (..data) in the folder, so resolve the path afresh each time, not the inode."""
        if self.path is None:
            return None
        try:
            real = os.path.realpath(self.path)
            st = os.stat(real)
        except OSError:
            return None
        return (real, st.st_mtime, st.st_size)

    async def watch(self, every_s: float) -> None:
        while True:
            await asyncio.sleep(every_s)
            sig = self._signature()
            if sig is not None and sig != self._seen:
                self._seen = sig
                log.info("config file changed: reloading")
                self.reload()


# gRPC core cancels calls that arrive faster than the server takes them (1,000 pending by
# default, 3,000 at most): a burst of a few thousand AcquireStream callers joining at once
# was answered CANCELLED. Callers waiting is limiterd's business, capped by its own settings
# (max_waiters, max_streams), so let them all in.
MAX_PENDING_CALLS = 100_000
SERVER_OPTIONS = [
    ("grpc.so_reuseport", 0),
    ("grpc.server.max_pending_requests", MAX_PENDING_CALLS),
    ("grpc.server.max_pending_requests_hard_limit", MAX_PENDING_CALLS),
]


@dataclass
class RunningServer:
    servers: list[grpc.aio.Server]
    engine: Backend
    health: health.aio.HealthServicer
    target: str
    admin_target: str
    metrics: Metrics | None
    reloader: Reloader
    errors: ErrorLog
    tasks: list[asyncio.Task[None]] = field(default_factory=list)
    metrics_http: Any = None

    @property
    def server(self) -> grpc.aio.Server:
        return self.servers[0]

    @property
    def metrics_target(self) -> str:
        """host:port that /metrics is served on, as bound (a port 0 asked for reads as the
        one the kernel gave), or "" when not served."""
        if self.metrics_http is None:
            return ""
        host, port = self.metrics_http[0].server_address[:2]
        return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"

    def cut_short(self) -> None:
        """During stop(): cancel the calls still in flight now instead of after the grace.
        (A second stop with no grace ends a pending graceful one.)"""
        for s in self.servers:
            self.tasks.append(asyncio.ensure_future(s.stop(0)))

    async def stop(self, grace_s: float = DEFAULT_GRACE_S) -> None:
        """Stop accepting, end waits at once (UNAVAILABLE with a retry-after: the wait would
        outlast the grace), let other in-flight calls finish within the grace, flush the
        journal."""
        for task in self.tasks:
            task.cancel()
        await self.health.enter_graceful_shutdown()
        ended = self.engine.end_waits(DRAIN_RETRY_AFTER_S)
        if ended:
            log.info("stopping: told %d waiting callers to retry", ended)
        await asyncio.gather(*(s.stop(grace_s) for s in self.servers))
        await self.errors.stop()
        await self.engine.stop()
        if self.metrics_http is not None:
            server, _thread = self.metrics_http
            server.shutdown()
            server.server_close()


@contextlib.contextmanager
def _umask(mode: int | None) -> Iterator[None]:
    if mode is None:
        yield
        return
    old = os.umask(0o777 & ~mode)
    try:
        yield
    finally:
        os.umask(old)


@contextlib.contextmanager
def _stderr_held() -> Iterator[list[str]]:
    """What is written to fd 2 meanwhile, held back (in the list once the block ends).
    grpc's core reports a failed bind there itself, before limiterd can say it in one line."""
    held: list[str] = []
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as tmp:
        os.dup2(tmp.fileno(), 2)
        try:
            yield held
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            tmp.seek(0)
            held.append(tmp.read().decode(errors="replace"))


def _bind(server: grpc.aio.Server, listen: str, creds: grpc.ServerCredentials | None) -> str:
    address = bind_target(listen)
    with _stderr_held() as held:
        try:
            if creds is None:
                port = server.add_insecure_port(address)
            else:
                port = server.add_secure_port(address, creds)
        except RuntimeError as exc:
            port = 0
            log.debug("bind failed: %s", exc)
    said = "".join(held)
    if port == 0 and not address.startswith("unix:"):
        why = _BIND_REASON.search(said)
        raise ListenError(f"cannot listen on {listen}: "
                          f"{why.group(1) if why else 'address in use or not available'}")
    if said and port != 0:
        sys.stderr.write(said)  # not about this bind: pass it on
    if address.startswith("unix:"):
        return address
    return f"{address.rsplit(':', 1)[0]}:{port}"


async def start_server(
    config: Config,
    journal: Journal,
    listen: str,
    clock: Clock | None = None,
    unix_socket_mode: int = 0o660,
    *,
    config_path: str | None = None,
    metrics_listen: str = "",
    admin_listen: str = "",
    security: Security | None = None,
    watch_config_s: float = 0.0,
    metrics: bool = True,
    shared: SharedLedger | None = None,
) -> RunningServer:
    """`shared`: keep the ledger in Redis, shared with other sidecars (then `journal` keeps
    nothing but the error log)."""
    security = security or Security()
    creds = security.credentials()
    engine: Backend
    if shared is not None:
        # Imported here: redis and its client take ~0.1 s to import, and most daemons are local.
        from limiterd.shared.engine import SharedEngine

        engine = SharedEngine(config, shared, clock or SystemClock())
    else:
        engine = Engine(config, journal, clock or SystemClock())
    await engine.start()
    observer = Metrics(engine) if metrics or metrics_listen else None
    reloader = Reloader(engine, config_path, observer)
    errors = ErrorLog(engine.clock, journal.error_store())
    await errors.start()
    interceptors: list[grpc.aio.ServerInterceptor] = [Calls(observer)]
    if security.admin_token:
        interceptors.insert(0, AdminToken(security.admin_token, ADMIN))
    main = grpc.aio.server(options=SERVER_OPTIONS, interceptors=interceptors)
    admin = main
    if admin_listen:
        admin = grpc.aio.server(options=SERVER_OPTIONS, interceptors=interceptors)
    servers = [main] if admin is main else [main, admin]
    health_servicer = health.aio.HealthServicer()
    pb_grpc.add_LimiterServicer_to_server(LimiterService(engine, observer, errors), main)
    pb_grpc.add_AdminServicer_to_server(AdminService(engine, reloader, errors), admin)
    for s in servers:
        health_pb2_grpc.add_HealthServicer_to_server(health_servicer, s)
    for s in servers:
        served = (LIMITER,) if s is not admin else (ADMIN,) if s is not main else SERVICE_NAMES
        reflection.enable_server_reflection(
            (*served, health.SERVICE_NAME, reflection.SERVICE_NAME), s
        )
    try:
        # A socket is created with the umask's mode: never more open than asked, not even
        # for the moment before a chmod.
        with _umask(unix_socket_mode if any(map(is_socket_path, (listen, admin_listen)))
                    else None):
            target = _bind(main, listen, creds)
            admin_target = _bind(admin, admin_listen, creds) if admin is not main else target
            for s in servers:
                await s.start()
    except ListenError:
        await errors.stop()
        await engine.stop()
        raise
    for t in {target, admin_target}:
        if t.startswith("unix:"):
            os.chmod(t.removeprefix("unix:"), unix_socket_mode)  # the exact mode asked for
    for name in ("", *SERVICE_NAMES):
        await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    srv = RunningServer(servers, engine, health_servicer, target, admin_target, observer,
                        reloader, errors)
    if metrics_listen and observer is not None:
        try:
            srv.metrics_http = observer.serve(metrics_listen)
        except OSError as exc:
            await srv.stop(0)
            raise ListenError(f"cannot serve metrics on {metrics_listen}: {exc}") from exc
    if watch_config_s > 0 and config_path is not None:
        srv.tasks.append(asyncio.create_task(reloader.watch(watch_config_s)))
    await health_servicer.set(LEDGER_HEALTH, health_pb2.HealthCheckResponse.SERVING)
    srv.tasks.append(asyncio.create_task(_ledger_health(engine, health_servicer)))
    return srv


async def _ledger_health(engine: Backend, servicer: health.aio.HealthServicer) -> None:
    """Keep the LEDGER_HEALTH status in step with the engine's health."""
    last = True
    while True:
        await asyncio.sleep(LEDGER_HEALTH_EVERY_S)
        healthy = engine.healthy
        if healthy != last:
            last = healthy
            await servicer.set(LEDGER_HEALTH, health_pb2.HealthCheckResponse.SERVING if healthy
                               else health_pb2.HealthCheckResponse.NOT_SERVING)


@contextlib.asynccontextmanager
async def running_server(
    config: Config | None = None,
    journal: Journal | None = None,
    clock: Clock | None = None,
    listen: str = "127.0.0.1:0",
    **options: Any,
) -> AsyncIterator[RunningServer]:
    """A real daemon in this process on an ephemeral port, for tests and embedding."""
    srv = await start_server(
        config if config is not None else load_config(options.get("config_path")),
        journal if journal is not None else MemoryJournal(),
        listen,
        clock,
        **options,
    )
    try:
        yield srv
    finally:
        await srv.stop(grace_s=0.5)


def shared_ledger(config: Config, options: ServeOptions) -> SharedLedger | None:
    """The shared ledger asked for by --ledger or the config's [ledger], or None (local)."""
    base = config.ledger
    if options.ledger is None and base is None:
        return None
    try:
        if base is None:
            base = SharedLedger(url=options.ledger or "")
        if options.ledger is not None:
            base = replace(base, url=options.ledger)
        if options.redis_password_file is not None:
            base = replace(base, password_file=options.redis_password_file)
    except ValueError as exc:
        raise StartupError(f"--ledger: {exc}") from None
    return base


async def serve(options: ServeOptions) -> None:
    """Run until SIGTERM or SIGINT; SIGHUP reloads the config file. Raises ConfigError,
    StartupError or ListenError (each a one-line message) when it cannot start."""
    # The ledger keeps many long-lived objects (a bucket per scope, settled reservations);
    # with the default thresholds the cyclic GC re-walks them so often that 100k scopes cost
    # 1.8x per call (bench: scale). Its data has no cycles, so collect far less often.
    gc.set_threshold(GC_THRESHOLD, 20, 20)
    config = load_config(options.config_path)
    shared = shared_ledger(config, options)
    journal: Journal = (
        MemoryJournal() if shared is not None
        else open_journal(options.db, options.synchronous)  # type: ignore[arg-type]
    )
    srv = await start_server(
        config, journal, options.listen, unix_socket_mode=options.unix_socket_mode,
        config_path=options.config_path, metrics_listen=options.metrics_listen,
        admin_listen=options.admin_listen, security=options.security,
        watch_config_s=options.watch_config_s, metrics=bool(options.metrics_listen),
        shared=shared,
    )
    log.info(
        "limiterd serving on %s%s; ledger %s; config %s%s",
        srv.target,
        f" (admin on {srv.admin_target})" if srv.admin_target != srv.target else "",
        srv.engine.describe(), srv.reloader.source,
        f"; metrics on http://{srv.metrics_target}/metrics" if srv.metrics_target else "",
    )
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    loop.add_signal_handler(signal.SIGHUP, srv.reloader.reload)
    def again() -> None:
        log.warning("second signal: cancelling the calls still in flight now")
        srv.cut_short()

    try:
        await stop.wait()
        log.info("stopping: draining in-flight calls for up to %.1f s (signal again to cut "
                 "it short)", options.grace_s)
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, again)
        await srv.stop(options.grace_s)
        log.info("stopped cleanly")
    finally:
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            loop.remove_signal_handler(sig)
