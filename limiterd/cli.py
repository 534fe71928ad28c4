"""The command line: parse flags, hand typed options to plain functions. No logic here."""

from __future__ import annotations

import asyncio
import logging
import sys

import click

from limiterd import __version__
from limiterd.config.loader import ConfigError, check_config
from limiterd.defaults import DEFAULT_DB, DEFAULT_GRACE_S, DEFAULT_LISTEN, ENV_PREFIX
from limiterd.server import ListenError, ServeOptions, serve
from limiterd.storage.base import StartupError
from limiterd.storage.sqlite import default_db_path


@click.group(context_settings={"auto_envvar_prefix": ENV_PREFIX, "show_default": True})
@click.version_option(__version__, prog_name="limiterd")
def main() -> None:
    """limiterd: a rate-limiter sidecar for LLM provider calls, over gRPC."""


@main.command("serve")
@click.option("--listen", default=DEFAULT_LISTEN,
              help="host:port, or a unix socket path (/path or unix:/path).")
@click.option("--config", "config_path", type=click.Path(dir_okay=False), default=None,
              help="TOML config file. Default: built-in Anthropic Tier 1 limits.")
@click.option("--db", default=None,
              help=f"SQLite journal file (its folder is created), or :memory: for no persistence. "
                   f"Default: $XDG_STATE_HOME/limiterd/limiterd.sqlite3 if XDG_STATE_HOME is set, "
                   f"else ./{DEFAULT_DB}.")
@click.option("--synchronous", type=click.Choice(["NORMAL", "FULL"]), default="NORMAL",
              help="NORMAL survives a process crash; FULL also survives power loss.")
@click.option("--grace", "grace_s", type=click.FloatRange(min=0), default=DEFAULT_GRACE_S,
              help="Seconds in-flight calls may take to finish after SIGTERM.")
@click.option("--unix-socket-mode", type=str, default="660",
              help="File mode (octal) of the unix socket, when listening on one.")
@click.option("--log-level", type=click.Choice(["debug", "info", "warning", "error"]),
              default="info")
def serve_cmd(listen: str, config_path: str | None, db: str | None, synchronous: str,
              grace_s: float,
              unix_socket_mode: str, log_level: str) -> None:
    """Run the daemon."""
    logging.basicConfig(
        level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    try:
        mode = int(unix_socket_mode, 8)
    except ValueError:
        raise click.BadParameter("must be an octal file mode such as 660",
                                 param_hint="--unix-socket-mode") from None
    options = ServeOptions(listen=listen, config_path=config_path, db=db or str(default_db_path()),
                           synchronous=synchronous, grace_s=grace_s, unix_socket_mode=mode)
    try:
        asyncio.run(serve(options))
    except ConfigError as exc:
        click.echo(f"limiterd: invalid config:\n{exc}", err=True)
        sys.exit(2)
    except (StartupError, ListenError) as exc:
        click.echo(f"limiterd: cannot start: {exc}", err=True)
        sys.exit(1)
    except KeyboardInterrupt:
        pass


@main.command("check-config")
@click.argument("file", type=click.Path(dir_okay=False))
def check_config_cmd(file: str) -> None:
    """Check a config file without starting anything. Exit 0 if valid, 2 if not."""
    try:
        click.echo(check_config(file))
    except ConfigError as exc:
        click.echo(str(exc), err=True)
        sys.exit(2)
