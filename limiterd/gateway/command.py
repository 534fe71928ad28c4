"""`limiterd gateway`: parse flags into a GatewayConfig and hand it to serve()."""

from __future__ import annotations

import asyncio
import logging
import sys
from dataclasses import replace

import click

from limiterd.defaults import DEFAULT_LISTEN
from limiterd.gateway.config import (
    DEFAULT_GATEWAY_LISTEN,
    DEFAULT_UPSTREAM,
    GatewayConfig,
    GatewayConfigError,
    load_gateway_config,
)


@click.command("gateway")
@click.option("--listen", default=DEFAULT_GATEWAY_LISTEN,
              help="host:port to serve the Anthropic-compatible API on (port 0: any).")
@click.option("--limiter", default=DEFAULT_LISTEN, help="The daemon's address.")
@click.option("--upstream", default=DEFAULT_UPSTREAM, help="The provider's base URL.")
@click.option("--config", "config_path", type=click.Path(dir_okay=False), default=None,
              help="TOML file: [gateway] settings and per-model [models.\"id\"] policies.")
@click.option("--metrics-listen", default="",
              help="host:port to serve Prometheus /metrics on (off when empty).")
@click.option("--grace", "grace_s", type=click.FloatRange(min=0), default=10.0,
              help="Seconds in-flight requests may take to finish after SIGTERM.")
@click.option("--log-level", type=click.Choice(["debug", "info", "warning", "error"]),
              default="info")
def gateway_cmd(listen: str, limiter: str, upstream: str, config_path: str | None,
                metrics_listen: str, grace_s: float, log_level: str) -> None:
    """Run the Anthropic-compatible HTTP gateway (point ANTHROPIC_BASE_URL at it)."""
    from limiterd.gateway.app import serve  # aiohttp is imported only by this command

    logging.basicConfig(level=log_level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    base = replace(GatewayConfig(), listen=listen, limiter=limiter, upstream=upstream,
                   metrics_listen=metrics_listen, grace_s=grace_s)
    try:
        cfg = load_gateway_config(config_path, base)
    except GatewayConfigError as exc:
        click.echo(f"limiterd gateway: invalid config: {exc}", err=True)
        sys.exit(2)
    try:
        asyncio.run(serve(cfg))
    except OSError as exc:
        click.echo(f"limiterd gateway: cannot start: {exc}", err=True)
        sys.exit(1)
    except KeyboardInterrupt:
        pass
