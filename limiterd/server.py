"""The process: build the pieces, serve, and on SIGTERM stop accepting, drain, flush, exit.

One place owns the lifecycle (as uvicorn's Server and grpc's graceful-shutdown example do).
The CLI parses flags into ServeOptions and calls serve(); tests use running_server().
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from limiterd.api.service import AdminService, LimiterService
from limiterd.clock import Clock, SystemClock
from limiterd.config.loader import ConfigError, load_config
from limiterd.config.model import Config
from limiterd.defaults import DEFAULT_DB, DEFAULT_GRACE_S, DEFAULT_LISTEN
from limiterd.engine import Engine
from limiterd.storage.base import Journal
from limiterd.storage.memory import MemoryJournal
from limiterd.storage.sqlite import open_journal
from limiterd_client._proto.limiter.v1 import limiter_pb2 as pb
from limiterd_client._proto.limiter.v1 import limiter_pb2_grpc as pb_grpc

log = logging.getLogger("limiterd")

SERVICE_NAMES = (
    pb.DESCRIPTOR.services_by_name["Limiter"].full_name,
    pb.DESCRIPTOR.services_by_name["Admin"].full_name,
)


class ListenError(Exception):
    """The listen address cannot be bound."""


@dataclass(frozen=True)
class ServeOptions:
    listen: str = DEFAULT_LISTEN
    config_path: str | None = None
    db: str = DEFAULT_DB
    synchronous: str = "NORMAL"
    grace_s: float = DEFAULT_GRACE_S
    unix_socket_mode: int = 0o660
    extra: dict[str, str] = field(default_factory=dict)


def grpc_address(listen: str) -> str:
    """`host:port`, `unix:/path`, or a bare filesystem path (taken as a unix socket)."""
    if listen.startswith("/") or listen.startswith("./"):
        return f"unix:{listen}"
    return listen


@dataclass
class RunningServer:
    server: grpc.aio.Server
    engine: Engine
    health: health.aio.HealthServicer
    target: str

    async def stop(self, grace_s: float = DEFAULT_GRACE_S) -> None:
        """Stop accepting, let in-flight calls finish within the grace, flush the journal."""
        await self.health.enter_graceful_shutdown()
        await self.server.stop(grace_s)
        await self.engine.stop()


async def start_server(
    config: Config,
    journal: Journal,
    listen: str,
    clock: Clock | None = None,
    unix_socket_mode: int = 0o660,
) -> RunningServer:
    engine = Engine(config, journal, clock or SystemClock())
    await engine.start()
    server = grpc.aio.server(options=[("grpc.so_reuseport", 0)])
    pb_grpc.add_LimiterServicer_to_server(LimiterService(engine), server)
    pb_grpc.add_AdminServicer_to_server(AdminService(engine), server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection(
        (*SERVICE_NAMES, health.SERVICE_NAME, reflection.SERVICE_NAME), server
    )
    address = grpc_address(listen)
    try:
        port = server.add_insecure_port(address)
    except RuntimeError as exc:
        port = 0
        log.debug("bind failed: %s", exc)
    if port == 0 and not address.startswith("unix:"):
        await engine.stop()
        raise ListenError(f"cannot listen on {listen}: address in use or not available")
    await server.start()
    if address.startswith("unix:"):
        import os

        os.chmod(address.removeprefix("unix:"), unix_socket_mode)
        target = address
    else:
        host = address.rsplit(":", 1)[0]
        target = f"{host}:{port}"
    for name in ("", *SERVICE_NAMES):
        await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    return RunningServer(server, engine, health_servicer, target)


@contextlib.asynccontextmanager
async def running_server(
    config: Config | None = None,
    journal: Journal | None = None,
    clock: Clock | None = None,
    listen: str = "127.0.0.1:0",
) -> AsyncIterator[RunningServer]:
    """A real daemon in this process on an ephemeral port, for tests and embedding."""
    srv = await start_server(
        config if config is not None else load_config(None),
        journal if journal is not None else MemoryJournal(),
        listen,
        clock,
    )
    try:
        yield srv
    finally:
        await srv.stop(grace_s=0.5)


async def serve(options: ServeOptions) -> None:
    """Run until SIGTERM or SIGINT; SIGHUP reloads the config file. Raises ConfigError,
    StartupError or ListenError (each a one-line message) when it cannot start."""
    config = load_config(options.config_path)
    journal = open_journal(options.db, options.synchronous)  # type: ignore[arg-type]
    srv = await start_server(config, journal, options.listen,
                             unix_socket_mode=options.unix_socket_mode)
    log.info(
        "limiterd serving on %s; journal %s; config %s",
        srv.target, journal.describe(), options.config_path or "(built-in defaults)",
    )
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    loop.add_signal_handler(signal.SIGHUP, lambda: reload(srv.engine, options.config_path))
    try:
        await stop.wait()
        log.info("stopping: draining in-flight calls for up to %.1f s", options.grace_s)
        await srv.stop(options.grace_s)
        log.info("stopped cleanly")
    finally:
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            loop.remove_signal_handler(sig)


def reload(engine: Engine, config_path: str | None) -> bool:
    """Apply a changed config; an invalid one is rejected and the old one stays in force."""
    try:
        config = load_config(config_path)
    except ConfigError as exc:
        log.error("reload rejected, keeping the current config:\n%s", exc)
        return False
    engine.set_config(config)
    log.info("config reloaded from %s", config_path or "(built-in defaults)")
    return True
