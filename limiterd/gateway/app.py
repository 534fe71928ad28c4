"""Wiring and the process lifecycle: build the app, serve, and on SIGTERM stop accepting,
let in-flight requests finish within the grace, settle, exit.

The HTTP stack is aiohttp (3.x): one maintained library that is both the server and the
upstream client, streams bodies chunk by chunk in both directions without buffering, and can
cancel a handler when its caller hangs up (which is how an abandoned stream is noticed and
reported while the upstream is quiet).
"""

from __future__ import annotations

import asyncio
import json
import logging
import signal
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

import aiohttp
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest, start_http_server

from limiterd.gateway.config import GatewayConfig
from limiterd.gateway.messages import Messages, marks_on_send
from limiterd.gateway.metrics import GatewayMetrics
from limiterd.gateway.proxy import Proxy
from limiterd_client import FailClosed, FailOpen, Limiter

log = logging.getLogger("limiterd.gateway")

HEALTH_PATH = "/limiterd/health"
MESSAGES = web.AppKey("messages", Messages)
METRICS_PATH = "/limiterd/metrics"  # also on --metrics-listen, as the daemon serves them


def configured_models(cfg: GatewayConfig) -> set[str]:
    """The model names allowed as metric labels: the policies' and their fallbacks'."""
    names = set(cfg.models)
    for policy in cfg.models.values():
        names.update(policy.fallback)
    return names


def build_app(cfg: GatewayConfig, limiter: Limiter, session: aiohttp.ClientSession,
              metrics: GatewayMetrics, clock: Callable[[], float] = time.monotonic,
              wall: Callable[[], float] = time.time) -> web.Application:
    app = web.Application(client_max_size=cfg.max_body_bytes)
    messages = Messages(cfg, limiter, session, metrics, clock, wall)
    proxy = Proxy(cfg.upstream, session, metrics)

    async def health(_: web.Request) -> web.Response:
        return web.Response(text=json.dumps({"status": "serving"}),
                            content_type="application/json")

    async def scrape(_: web.Request) -> web.Response:
        return web.Response(body=generate_latest(metrics.registry),
                            headers={"content-type": CONTENT_TYPE_LATEST})

    app[MESSAGES] = messages
    app.router.add_get(HEALTH_PATH, health)
    app.router.add_get(METRICS_PATH, scrape)
    app.router.add_post("/v1/messages", messages.handle)
    app.router.add_route("*", "/{tail:.*}", proxy.handle)
    return app


@asynccontextmanager
async def running_gateway(cfg: GatewayConfig) -> AsyncIterator[tuple[web.AppRunner, int]]:
    """The gateway serving on cfg.listen (port 0 picks one); yields (runner, port)."""
    metrics = GatewayMetrics(configured_models(cfg))
    unavailable = FailOpen() if cfg.on_unavailable == "open" else FailClosed()
    timeout = aiohttp.ClientTimeout(total=None, sock_connect=30,
                                    sock_read=cfg.upstream_read_timeout_s)
    # auto_decompress off: pass-through bodies stay byte for byte what the upstream sent.
    connector = aiohttp.TCPConnector(limit=0)
    async with (
        Limiter(cfg.limiter, on_unavailable=unavailable) as limiter,
        aiohttp.ClientSession(timeout=timeout, connector=connector, auto_decompress=False,
                              skip_auto_headers=("User-Agent",),
                              trace_configs=[marks_on_send()]) as session,
    ):
        app = build_app(cfg, limiter, session, metrics)
        runner = web.AppRunner(app, handler_cancellation=True, access_log=None,
                               shutdown_timeout=cfg.grace_s)
        await runner.setup()
        host, port = cfg.host_port
        site = web.TCPSite(runner, host, port, shutdown_timeout=cfg.grace_s)
        await site.start()
        bound = int(runner.addresses[0][1])  # the real port when asked for port 0
        if cfg.metrics_listen:
            mhost, _, mport = cfg.metrics_listen.rpartition(":")
            start_http_server(int(mport), addr=mhost.strip("[]") or "127.0.0.1",
                              registry=metrics.registry)
        try:
            yield runner, bound
        finally:
            await runner.cleanup()  # in-flight requests finish within the grace...
            await app[MESSAGES].drain(cfg.grace_s)  # ...and so do their Reports


async def serve(cfg: GatewayConfig) -> None:
    """Serve until SIGTERM or SIGINT."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    async with running_gateway(cfg) as (_, port):
        log.info("gateway listening on %s:%d, upstream %s, limiter %s",
                 cfg.host_port[0], port, cfg.upstream, cfg.limiter)
        await stop.wait()
        log.info("gateway stopping: finishing in-flight requests (grace %.0f s)", cfg.grace_s)
