"""The command line: parse flags, hand typed options to plain functions. No logic here."""

from __future__ import annotations

import asyncio
import logging
import os
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path
from typing import Any

import click
import grpc
from click.core import ParameterSource

from limiterd import __version__
from limiterd.address import dial_target
from limiterd.config.loader import ConfigError, check_config, defaults_text
from limiterd.defaults import DEFAULT_DB, DEFAULT_GRACE_S, DEFAULT_LISTEN, ENV_PREFIX
from limiterd.gateway.command import gateway_cmd
from limiterd.inspect import (
    EXIT_FAILED,
    EXIT_UNREACHABLE,
    Client,
    Target,
    Unreachable,
    as_json,
    bucket_rows,
    lease_rows,
    short_scope,
    table,
    when,
)
from limiterd.storage.base import StartupError
from limiterd.storage.factory import default_db_path
from limiterd_client.proto.limiter.v1 import limiter_pb2 as pb
from limiterd_client.scope import DEFAULT_SALT, scope_for_api_key


@click.group(context_settings={"auto_envvar_prefix": ENV_PREFIX, "show_default": True})
@click.version_option(__version__, prog_name="limiterd")
def main() -> None:
    """limiterd: a rate-limiter sidecar for LLM provider calls, over gRPC."""


main.add_command(gateway_cmd)  # the HTTP gateway: limiterd/gateway/ (LIMITERD_GATEWAY_*)

TOKEN_ENV = f"{ENV_PREFIX}_ADMIN_TOKEN"


def _warn_on_argv(ctx: click.Context, param: click.Parameter, value: str | None) -> str | None:
    if value and ctx.get_parameter_source(param.name or "") is ParameterSource.COMMANDLINE:
        click.echo(f"limiterd: warning: --admin-token on the command line is visible to "
                   f"every user (ps); set ${TOKEN_ENV} or use --admin-token-file", err=True)
    return value


def admin_token_options(help_text: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """The admin token, for the daemon and the operator commands alike: from $LIMITERD_ADMIN_
    TOKEN or a file (--admin-token-file); --admin-token still works, with a warning."""

    def add(f: Callable[..., Any]) -> Callable[..., Any]:
        f = click.option("--admin-token-file", type=click.Path(dir_okay=False), default=None,
                         envvar=f"{TOKEN_ENV}_FILE",
                         help=f"File holding the admin token (${TOKEN_ENV}_FILE).")(f)
        return click.option("--admin-token", default=None, envvar=TOKEN_ENV,
                            callback=_warn_on_argv, show_envvar=True,
                            help=f"{help_text} Prefer ${TOKEN_ENV} or --admin-token-file: "
                                 "arguments show in ps.")(f)

    return add


def read_admin_token(token: str | None, path: str | None) -> str | None:
    if token and path:
        raise click.UsageError("give the admin token one way: --admin-token or "
                               "--admin-token-file")
    if not path:
        return token or None
    try:
        text = Path(path).read_text().strip()
    except OSError as exc:
        raise click.BadParameter(f"cannot read {path}: {exc.strerror or exc}",
                                 param_hint="--admin-token-file") from None
    if not text:
        raise click.BadParameter(f"{path} is empty", param_hint="--admin-token-file")
    return text


# Each `serve` option also comes from LIMITERD_<OPTION> (without this, click would read
# LIMITERD_SERVE_<OPTION>, and the health probe's $LIMITERD_LISTEN would not match).
@main.command("serve", context_settings={"auto_envvar_prefix": ENV_PREFIX})
@click.option("--listen", default=DEFAULT_LISTEN,
              help="host:port, or a unix socket path (/path or unix:/path).")
@click.option("--config", "config_path", type=click.Path(dir_okay=False), default=None,
              help="TOML config file. Default: built-in Anthropic Tier 1 limits.")
@click.option("--db", default=None,
              help=f"SQLite journal file (its folder is created), or :memory: for no persistence. "
                   f"Default: $XDG_STATE_HOME/limiterd/limiterd.sqlite3 if XDG_STATE_HOME is set, "
                   f"else ./{DEFAULT_DB}.")
@click.option("--ledger", default=None,
              help="Share the ledger with other sidecars: redis://host:6379/0, rediss://... or "
                   "redis+sentinel://sentinel1:26379,sentinel2:26379/mymaster/0 "
                   "(overrides [ledger] url in the config). The password comes from "
                   "$LIMITERD_REDIS_PASSWORD or --redis-password-file, never from here. "
                   "Default: the local ledger, journaled to --db.")
@click.option("--redis-password-file", type=click.Path(dir_okay=False), default=None,
              help="File holding the Redis password (for --ledger).")
@click.option("--synchronous", type=click.Choice(["NORMAL", "FULL"]), default="NORMAL",
              help="NORMAL survives a process crash; FULL also survives power loss.")
@click.option("--grace", "grace_s", type=click.FloatRange(min=0), default=DEFAULT_GRACE_S,
              help="Seconds in-flight calls may take to finish after SIGTERM.")
@click.option("--unix-socket-mode", type=str, default="660",
              help="File mode (octal) of the unix socket, when listening on one.")
@click.option("--metrics-listen", default="",
              help="host:port to serve Prometheus /metrics on (off when empty).")
@click.option("--admin-listen", default="",
              help="Serve the Admin service only on this address (host:port or socket path).")
@admin_token_options("Require this token (metadata x-limiterd-admin-token) on Admin calls "
                     "and reflection.")
@click.option("--tls-cert", type=click.Path(dir_okay=False), default=None,
              help="Server certificate (PEM): serve TLS.")
@click.option("--tls-key", type=click.Path(dir_okay=False), default=None,
              help="Server private key (PEM).")
@click.option("--tls-client-ca", type=click.Path(dir_okay=False), default=None,
              help="CA (PEM) that client certificates must chain to: mutual TLS.")
@click.option("--watch-config", "watch_config_s", type=click.FloatRange(min=0), default=2.0,
              help="Seconds between checks of --config for changes (0: off). Follows symlink "
                   "swaps, as a Kubernetes ConfigMap mount does.")
@click.option("--log-level", type=click.Choice(["debug", "info", "warning", "error"]),
              default="info")
def serve_cmd(listen: str, config_path: str | None, db: str | None, ledger: str | None,
              redis_password_file: str | None, synchronous: str,
              grace_s: float, unix_socket_mode: str, metrics_listen: str, admin_listen: str,
              admin_token: str | None, admin_token_file: str | None, tls_cert: str | None,
              tls_key: str | None, tls_client_ca: str | None, watch_config_s: float,
              log_level: str) -> None:
    """Run the daemon."""
    # Only `serve` needs the server (grpc servicers, engine, storage): ~0.2 s of imports that
    # the operator commands and --help skip.
    from limiterd.server import ListenError, Security, ServeOptions, serve

    logging.basicConfig(
        level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    try:
        mode = int(unix_socket_mode, 8)
    except ValueError:
        raise click.BadParameter("must be an octal file mode such as 660",
                                 param_hint="--unix-socket-mode") from None
    options = ServeOptions(
        listen=listen, config_path=config_path, db=db or str(default_db_path()),
        ledger=ledger, redis_password_file=redis_password_file,
        synchronous=synchronous, grace_s=grace_s, unix_socket_mode=mode,
        metrics_listen=metrics_listen, admin_listen=admin_listen,
        watch_config_s=watch_config_s,
        security=Security(tls_cert=tls_cert, tls_key=tls_key, tls_client_ca=tls_client_ca,
                          admin_token=read_admin_token(admin_token, admin_token_file)),
    )
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


@main.command("default-config")
def default_config_cmd() -> None:
    """Print the built-in config, a starting point for your own --config file."""
    click.echo(defaults_text(), nl=False)


@main.command("scope")
@click.option("--from-env", "env_name", default=None, metavar="NAME",
              help="Read the API key from this environment variable (e.g. ANTHROPIC_API_KEY) "
                   "instead of stdin.")
@click.option("--salt", default=DEFAULT_SALT, envvar=f"{ENV_PREFIX}_SCOPE_SALT",
              show_envvar=True, help="The salt your apps pass to scope_for_api_key.")
def scope_cmd(env_name: str | None, salt: str) -> None:
    """Print an API key's scope hash, for [[scopes]] in the config.

    The key is read from stdin (typed without echo on a terminal) or from an environment
    variable, never from the command line, where `ps` and shell history would keep it. The
    hash is the client's scope_for_api_key."""
    if env_name is not None:
        key = os.environ.get(env_name, "")
        if not key:
            raise click.UsageError(f"${env_name} is not set or empty")
    elif sys.stdin.isatty():
        key = click.prompt("API key", hide_input=True, err=True)
    else:
        key = sys.stdin.read()
    key = key.strip()
    if not key:
        raise click.UsageError("no API key on stdin")
    click.echo(scope_for_api_key(key, salt=salt))


# ---- operator commands: talk to a running daemon -----------------------------------------


def target_options(f: Callable[..., Any]) -> Callable[..., Any]:
    options: list[Callable[[Callable[..., Any]], Callable[..., Any]]] = [
        click.option("--target", default=DEFAULT_LISTEN, envvar=f"{ENV_PREFIX}_TARGET",
                     show_envvar=True,
                     help="The daemon's address (host:port or unix socket path)."),
        admin_token_options("Token for Admin calls."),
        click.option("--tls-ca", type=click.Path(dir_okay=False), default=None,
                     help="CA (PEM) to trust: connect with TLS."),
        click.option("--tls-cert", type=click.Path(dir_okay=False), default=None,
                     help="Client certificate (PEM), for mutual TLS."),
        click.option("--tls-key", type=click.Path(dir_okay=False), default=None,
                     help="Client private key (PEM)."),
    ]
    for option in reversed(options):
        f = option(f)
    return f


def _target(target: str, admin_token: str | None, admin_token_file: str | None,
            tls_ca: str | None, tls_cert: str | None, tls_key: str | None) -> Target:
    try:
        dial_target(target)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--target") from None
    return Target(target, admin_token=read_admin_token(admin_token, admin_token_file),
                  tls_ca=tls_ca, tls_cert=tls_cert, tls_key=tls_key)


@contextmanager
def connected(target: Target) -> Iterator[Client]:
    """A client; a daemon that does not answer or refuses is one clear line and an exit code."""
    client = Client(target)
    try:
        yield client
    except Unreachable as exc:
        click.echo(f"limiterd: {exc}", err=True)
        sys.exit(EXIT_UNREACHABLE)
    except grpc.RpcError as exc:
        click.echo(f"limiterd: {exc.code().name}: {exc.details()}", err=True)
        sys.exit(EXIT_FAILED)
    finally:
        client.close()


@main.command("leases")
@target_options
@click.option("--scope", default="",
              help="Scope alias, hash, or the start of a hash as the tables print it.")
@click.option("--model", default="")
@click.option("--json", "as_json_", is_flag=True, help="JSON for scripts.")
def leases_cmd(scope: str, model: str, as_json_: bool, **t: Any) -> None:
    """Open reservations, soonest expiry first."""
    with connected(_target(**t)) as client:
        leases = list(client.leases(scope, model))
        now_ms = int(time.time() * 1000)
        rows = lease_rows(leases, now_ms, full=as_json_)
        click.echo(as_json(rows) if as_json_ else table(rows, "no open reservations"))


@main.command("buckets")
@target_options
@click.option("--scope", default="",
              help="Scope alias, hash, or the start of a hash as the tables print it.")
@click.option("--model", default="")
@click.option("--json", "as_json_", is_flag=True, help="JSON for scripts.")
def buckets_cmd(scope: str, model: str, as_json_: bool, **t: Any) -> None:
    """Bucket levels/capacities (* = learned from the provider), queues, pauses."""
    with connected(_target(**t)) as client:
        resp = client.buckets(scope, model)
        if as_json_:
            click.echo(as_json(resp))
        else:
            click.echo(table(bucket_rows(resp), "no buckets (idle buckets at full capacity "
                                                "are not kept)"))


@main.command("reset")
@target_options
@click.option("--scope", required=True, help="Scope alias, hash or the prefix a table shows.")
@click.option("--model", required=True, help="Budget name, or a model id (its budget).")
@click.option("--user", default="", help="That user's bucket under the budget.")
@click.option("--json", "as_json_", is_flag=True, help="JSON for scripts.")
def reset_cmd(scope: str, model: str, user: str, as_json_: bool, **t: Any) -> None:
    """Refill a bucket to full, forgiving its debt (e.g. after a wrong overrun Report)."""
    with connected(_target(**t)) as client:
        resp = client.call(client.admin.ResetBucket, pb.ResetBucketRequest(
            scope=scope, model=model, user=user))
        if as_json_:
            click.echo(as_json(resp))
        else:
            rows = bucket_rows(pb.GetBucketsResponse(buckets=resp.buckets))
            click.echo(f"reset {len(resp.buckets)} bucket"
                       f"{'' if len(resp.buckets) == 1 else 's'}:")
            click.echo(table(rows, ""))


@main.command("release")
@target_options
@click.argument("reservation_id")
@click.option("--json", "as_json_", is_flag=True, help="JSON for scripts.")
def release_cmd(reservation_id: str, as_json_: bool, **t: Any) -> None:
    """Release a reservation (refund everything), e.g. one a crashed caller left."""
    with connected(_target(**t)) as client:
        resp = client.call(client.limiter.Release, pb.ReleaseRequest(
            reservation_id=reservation_id))
        if as_json_:
            click.echo(as_json(resp))
        else:
            s = resp.settlement
            again = " (it was already released)" if resp.replayed else ""
            click.echo(f"released {s.reservation_id}: refunded {s.refunded_requests} request, "
                       f"{s.refunded_input_tokens} input and {s.refunded_output_tokens} output "
                       f"tokens{again}")


@main.command("reload")
@target_options
def reload_cmd(**t: Any) -> None:
    """Make the daemon re-read its config file (as SIGHUP does)."""
    with connected(_target(**t)) as client:
        resp = client.call(client.admin.Reload, pb.ReloadRequest())
        click.echo(resp.message, err=not resp.ok)
        if not resp.ok:
            sys.exit(EXIT_FAILED)


@main.command("watch")
@target_options
@click.option("--interval", type=click.FloatRange(min=0.1), default=2.0, show_default=True)
@click.option("--iterations", type=click.IntRange(min=0), default=0,
              help="Stop after this many refreshes (0: until interrupted).")
def watch_cmd(interval: float, iterations: int, **t: Any) -> None:
    """A live view of buckets, queues and recent grants, like top."""
    seen: dict[str, pb.Lease] = {}
    recent: list[str] = []
    tty = sys.stdout.isatty()
    with connected(_target(**t)) as client:
        n = 0
        try:
            while True:
                resp = client.buckets()
                leases = list(client.leases())
                for lease in leases:
                    if lease.reservation_id not in seen:
                        recent.append(f"{when(lease.granted_at_ms)}  "
                                      f"{short_scope(lease.scope, lease.scope_alias)}  "
                                      f"{lease.model}  "
                                      f"in {lease.reserved_input_tokens}  "
                                      f"out {lease.reserved_output_tokens}")
                seen = {lease.reservation_id: lease for lease in leases}
                recent = recent[-10:]
                screen = [
                    f"limiterd at {client.target.address}  {when(resp.now_ms)}  "
                    f"open {len(leases)}  waiting {sum(b.queue_depth for b in resp.buckets)}",
                    "",
                    table(bucket_rows(resp), "no buckets"),
                    "",
                    "recent grants:",
                    *(recent or ["(none)"]),
                ]
                if tty:
                    click.echo("\x1b[H\x1b[2J", nl=False)
                click.echo("\n".join(screen))
                n += 1
                if iterations and n >= iterations:
                    return
                time.sleep(interval)
        except KeyboardInterrupt:
            return


def parse_since(value: str) -> float:
    """`90s`, `10m`, `2h`, `1d` ago, or an ISO 8601 time; as unix seconds."""
    units = {"s": 1, "m": 60, "h": 3600, "d": 86400}
    if value and value[-1] in units and value[:-1].replace(".", "", 1).isdigit():
        return time.time() - float(value[:-1]) * units[value[-1]]
    try:
        return datetime.fromisoformat(value).timestamp()
    except ValueError:
        raise click.BadParameter(
            "use a duration such as 10m, 2h or 1d, or an ISO time such as 2026-11-26T10:00",
            param_hint="--since") from None


@main.command("errors")
@target_options
@click.option("--model", default="")
@click.option("--status", "http_status", type=click.IntRange(0, 999), default=0,
              help="Only this HTTP status (e.g. 429, 529).")
@click.option("--since", default="", help="e.g. 10m, 2h, 1d, or an ISO time.")
@click.option("--limit", type=click.IntRange(1, 10_000), default=100, show_default=True)
@click.option("--json", "as_json_", is_flag=True, help="JSON for scripts.")
def errors_cmd(model: str, http_status: int, since: str, limit: int, as_json_: bool,
               **t: Any) -> None:
    """Failed provider outcomes that clients reported, newest first."""
    since_ms = int(parse_since(since) * 1000) if since else 0
    with connected(_target(**t)) as client:
        resp = client.call(client.admin.ListErrors, pb.ListErrorsRequest(
            model=model, http_status=http_status, since_ms=since_ms, limit=limit))
        rows = [{
            "time": datetime.fromtimestamp(e.at_ms / 1000).isoformat(timespec="seconds"),
            "scope": e.scope_alias, "model": e.model, "outcome": pb.Outcome.Name(e.outcome),
            "status": e.http_status or "-", "type": e.error_type or "-",
            "code": e.error_code or "-", "request_id": e.provider_request_id or "-",
            "fell_back": "yes" if e.fell_back else "no",
        } for e in resp.errors]
        click.echo(as_json(rows) if as_json_ else table(rows, "no provider errors recorded"))
