"""TOML -> Config. Every mistake in a file is collected and reported at once.

Format (deploy/limiterd.example.toml is the commented version; every section is optional)::

    [daemon]                           # all values positive integers
    default_lease_ms = 600000          # lease of a reservation when Acquire says lease_ms = 0
    max_lease_ms = 3600000             # must be >= default_lease_ms
    max_wait_ms = 600000               # longest Acquire wait accepted
    max_waiters_per_queue = 1000
    max_waiters = 20000                # waiting callers over all queues
    max_streams = 10000                # of them, waiting AcquireStream calls
    settlement_retention_s = 86400     # how long settled reservations answer duplicates
    max_settlements = 100000
    idle_sweep_interval_s = 10

    # default limits per model: an exact model id or an fnmatch glob.
    # An exact id beats any glob; among globs the first in file order wins.
    # Every model a rule matches shares one budget, named by the pattern, or by `group`
    # (A-Z a-z 0-9 . _ -) for rules that share one (they must have the same limits).
    [models."claude-opus-4*"]
    requests_per_minute = 50
    input_tokens_per_minute = 30000
    output_tokens_per_minute = 8000
    max_concurrent = 20                # every limit is optional; omitted = no limit

    # default limits for each distinct `user` under a scope x model
    [user_limits."claude-*"]
    requests_per_minute = 10

    [ledger]                           # optional: share the ledger with other sidecars
    url = "redis://redis:6379/0"       # or rediss://; `limiterd serve --ledger URL` overrides
                                       # Sentinel: redis+sentinel://s1:26379,s2:26379/mymaster/0
    cluster = false                    # true: url names one node of a Redis Cluster
    password_env = "LIMITERD_REDIS_PASSWORD"  # or password_file = "/run/secrets/redis"
    when_unavailable = "fail_closed"   # UNAVAILABLE until Redis answers; or "local_share":
    local_share = 0.34                 #   a local ledger at this share of the limits meanwhile
    key_prefix = "limiterd"
    queue_entry_ttl_ms = 10000         # a dead sidecar's waiters stop blocking after this
    sweep_interval_ms = 1000

    [[scopes]]
    scope = "3f1a..."                  # the API-key hash (client's scope_for_api_key)
    alias = "prod-key"                 # required: shown in logs and metrics instead of the hash
    [scopes.models."claude-sonnet-4*"]  # overrides: only the fields given replace the defaults
    input_tokens_per_minute = 80000
    [scopes.user_limits."claude-*"]
    requests_per_minute = 5

Limits are integers in 1..10**12. Unknown keys are errors (typos would otherwise silently
mean "no limit"). A file without [models] (or [user_limits]) keeps the built-in rules of that
table; an empty `[models]` table means no model has limits, so every model is unknown. A
scope is an API key's hash (64 lowercase hex), never the key.
Messages read `<file>: <dotted.key>: <what is wrong>`, one problem per line.
"""

from __future__ import annotations

import difflib
import functools
import json
import os
import re
import tomllib
from collections.abc import Iterable
from dataclasses import fields, replace
from importlib import resources
from pathlib import Path
from types import MappingProxyType
from typing import Any

from limiterd.config.model import Config, Limits, ModelRule, ScopeConfig, Settings
from limiterd.shared.settings import SharedLedger, WhenUnavailable

__all__ = ["ConfigError", "DEFAULTS_SOURCE", "check_config", "defaults_text", "load_config",
           "parse_config"]

DEFAULTS_SOURCE = "<built-in defaults.toml>"
MAX_LIMIT = 10**12
SCOPE_HASH_HEX = 64  # HMAC-SHA256 in hex (limiterd_client.scope_for_api_key)
_SCOPE_HASH = re.compile(f"[0-9a-f]{{{SCOPE_HASH_HEX}}}")
_ALIAS = re.compile(r"[A-Za-z0-9._-]{1,64}")
_GROUP = _ALIAS
_BARE_KEY = re.compile(r"[A-Za-z0-9_-]+")
_AT = re.compile(r"\s*\(at (line \d+, column \d+|end of document)\)$")

_LIMIT_KEYS = tuple(f.name for f in fields(Limits))
# [daemon] key -> (Settings field, divisor from the file's unit to the model's)
_DAEMON: dict[str, tuple[str, int | None]] = {
    "default_lease_ms": ("default_lease_s", 1000),
    "max_lease_ms": ("max_lease_s", 1000),
    "max_wait_ms": ("max_wait_s", 1000),
    "max_waiters_per_queue": ("max_waiters_per_queue", None),
    "max_waiters": ("max_waiters", None),
    "max_streams": ("max_streams", None),
    "settlement_retention_s": ("settlement_retention_s", 1),
    "max_settlements": ("max_settlements", None),
    "idle_sweep_interval_s": ("idle_sweep_interval_s", 1),
    "stream_update_interval_ms": ("stream_update_interval_s", 1000),
    "reattach_grace_ms": ("reattach_grace_s", 1000),
    "overload_window_s": ("overload_window_s", 1),
    "overload_threshold": ("overload_threshold", None),
    "overload_cooldown_s": ("overload_cooldown_s", 1),
    "sync_tolerance_tokens": ("sync_tolerance_tokens", None),
    "refill_allowance_ms": ("refill_allowance_s", 1000),
}
_DAEMON_ZERO_OK = ("refill_allowance_ms",)  # 0 turns it off
_DAEMON_FLAGS = ("learn_limits", "expect_refunds")
_TOP_KEYS = ("daemon", "models", "user_limits", "scopes", "ledger")
_LEDGER_KEYS = ("url", "cluster", "password_env", "password_file", "when_unavailable",
                "local_share", "key_prefix", "queue_entry_ttl_ms", "sweep_interval_ms")
_SCOPE_KEYS = ("scope", "alias", "models", "user_limits")


class ConfigError(ValueError):
    """A config file that cannot be used. `problems` holds one line per mistake."""

    def __init__(self, problems: Iterable[str]) -> None:
        self.problems = tuple(problems)
        super().__init__("\n".join(self.problems))


def defaults_text() -> str:
    """The built-in config file, a starting point for one's own (`limiterd default-config`)."""
    return resources.files("limiterd.config").joinpath("defaults.toml").read_text("utf-8")


@functools.cache
def _builtin() -> Config:
    return parse_config(defaults_text(), DEFAULTS_SOURCE)


def _builtin_models(source: str, table: str) -> tuple[ModelRule, ...]:
    if source == DEFAULTS_SOURCE:  # the built-in file itself: what it has is all there is
        return ()
    return _builtin().models if table == "models" else _builtin().user_models


def uses_builtin_models(cfg: Config) -> bool:
    """Whether `cfg` came from a file without [models] and so has the built-in rules."""
    return cfg.source != DEFAULTS_SOURCE and bool(cfg.models) and \
        cfg.models is _builtin().models


def load_config(path: str | os.PathLike[str] | None) -> Config:
    """The config in the TOML file at `path`; None = the shipped defaults."""
    if path is None:
        return _builtin()
    source = os.fspath(path)
    try:
        data = Path(source).read_bytes()
    except FileNotFoundError:
        raise ConfigError([f"{source}: config file not found"]) from None
    except IsADirectoryError:
        raise ConfigError([f"{source}: is a directory, not a config file"]) from None
    except PermissionError:
        raise ConfigError([f"{source}: config file not readable: permission denied"]) from None
    except OSError as e:
        raise ConfigError([f"{source}: cannot read config file: {e.strerror or e}"]) from None
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise ConfigError([f"{source}: not UTF-8 text (bad byte at offset {e.start})"]) from None
    return parse_config(text, source)


def parse_config(text: str, source: str) -> Config:
    """The config in TOML `text`; `source` names it in messages (usually the file path)."""
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        msg = str(e)
        at = _AT.search(msg)
        where = at.group(1) if at else "somewhere"
        raise ConfigError([f"{source}: {where}: invalid TOML: {_AT.sub('', msg)}"]) from None
    p = _Problems(source)
    p.unknown_keys(doc, _TOP_KEYS, "")
    settings = _settings(doc.get("daemon", {}), p)
    # A file without [models] (say, one that only names [[scopes]]) keeps the built-in model
    # rules rather than leaving every model unknown; an empty [models] table means none.
    models = _rules(doc["models"], "models", p) if "models" in doc else _builtin_models(
        source, "models")
    user_models = (_rules(doc["user_limits"], "user_limits", p) if "user_limits" in doc
                   else _builtin_models(source, "user_limits"))
    scopes = _scopes(doc.get("scopes", []), models, user_models, p)
    ledger = _ledger(doc["ledger"], p) if "ledger" in doc else None
    if p.lines:
        raise ConfigError(p.lines)
    return Config(settings, models, user_models, MappingProxyType(scopes), source=source,
                  ledger=ledger)


def check_config(path: str | os.PathLike[str] | None) -> str:
    """A short human summary of a valid config; raises ConfigError like load_config."""
    cfg = load_config(path)
    s = cfg.settings

    def rules(n: int, what: str) -> str:
        return f"{n} {what} rule{'' if n == 1 else 's'}"

    lines = [f"{cfg.source}: OK"]
    if cfg.models:
        pats = ", ".join(r.pattern for r in cfg.models)
        builtin = " (built in: this file has no [models])" if uses_builtin_models(cfg) else ""
        lines.append(f"  {rules(len(cfg.models), 'model')}{builtin}: {pats}")
    else:
        lines.append("  no model rules: every model is unknown")
    lines.append(f"  {rules(len(cfg.user_models), 'per-user limit')}")
    aliases = ", ".join(sc.alias for sc in cfg.scopes.values())
    lines.append(f"  {len(cfg.scopes)} scope{'' if len(cfg.scopes) == 1 else 's'}"
                 + (f": {aliases}" if aliases else ""))
    lines.append("  ledger: " + (cfg.ledger.describe() if cfg.ledger else "local (SQLite journal)"))
    lines.append(f"  leases {s.default_lease_s:.10g}s default, {s.max_lease_s:.10g}s max; "
                 f"waits up to {s.max_wait_s:.10g}s, {s.max_waiters_per_queue} per queue, "
                 f"{s.max_waiters} in all ({s.max_streams} streams)")
    return "\n".join(lines)


class _Problems:
    def __init__(self, source: str) -> None:
        self.source = source
        self.lines: list[str] = []

    def add(self, key: str, what: str) -> None:
        self.lines.append(f"{self.source}: {key}: {what}" if key else f"{self.source}: {what}")

    def unknown_keys(self, table: dict[str, Any], allowed: tuple[str, ...], path: str) -> None:
        for key in table:
            if key in allowed:
                continue
            close = difflib.get_close_matches(key, allowed, n=1)
            hint = (f'did you mean "{close[0]}"?' if close
                    else "expected one of: " + ", ".join(allowed))
            self.add(_key(path, key), f"unknown key; {hint}")

    def table(self, value: Any, path: str) -> dict[str, Any] | None:
        if isinstance(value, dict):
            return value
        self.add(path, f"must be a table, got {_show(value)}")
        return None

    def integer(self, value: Any, path: str, minimum: int = 1) -> int | None:
        # bool is an int subclass in Python; `true` is never a limit
        if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
            kind = "a positive integer" if minimum == 1 else f"an integer >= {minimum}"
            self.add(path, f"must be {kind}, got {_show(value)}")
            return None
        if value > MAX_LIMIT:
            self.add(path, f"must be at most {MAX_LIMIT}, got {value}")
            return None
        return value


def _settings(value: Any, p: _Problems) -> Settings:
    table = p.table(value, "daemon")
    if table is None:
        return Settings()
    p.unknown_keys(table, (*_DAEMON, *_DAEMON_FLAGS), "daemon")
    values: dict[str, float | int | bool] = {}
    for key, (name, divisor) in _DAEMON.items():
        minimum = 0 if key in _DAEMON_ZERO_OK else 1
        if key in table and (n := p.integer(table[key], _key("daemon", key),
                                            minimum)) is not None:
            values[name] = n if divisor is None else n / divisor
    for key in _DAEMON_FLAGS:
        if key in table:
            if isinstance(table[key], bool):
                values[key] = table[key]
            else:
                p.add(_key("daemon", key), f"must be true or false, got {_show(table[key])}")
    settings = Settings(**values)  # type: ignore[arg-type]  # names come from _DAEMON
    if settings.default_lease_s > settings.max_lease_s:
        p.add("daemon.default_lease_ms",
              f"must be <= daemon.max_lease_ms ({round(settings.max_lease_s * 1000)}), "
              f"got {round(settings.default_lease_s * 1000)}")
    return settings


def _ledger(value: Any, p: _Problems) -> SharedLedger | None:
    table = p.table(value, "ledger")
    if table is None:
        return None
    p.unknown_keys(table, _LEDGER_KEYS, "ledger")
    values: dict[str, Any] = {}
    for key in ("url", "password_env", "password_file", "key_prefix"):
        if key in table:
            if isinstance(table[key], str) and table[key]:
                values[key] = table[key]
            else:
                p.add(_key("ledger", key), f"must be a non-empty string, got {_show(table[key])}")
    for key, name in (("queue_entry_ttl_ms", "queue_entry_ttl_s"),
                      ("sweep_interval_ms", "sweep_interval_s")):
        if key in table and (n := p.integer(table[key], _key("ledger", key))) is not None:
            values[name] = n / 1000
    if "when_unavailable" in table:
        policies = [w.value for w in WhenUnavailable]
        if table["when_unavailable"] in policies:
            values["when_unavailable"] = WhenUnavailable(table["when_unavailable"])
        else:
            p.add("ledger.when_unavailable", f"must be one of {', '.join(policies)}, got "
                  f"{_show(table['when_unavailable'])}")
    if "cluster" in table:
        if isinstance(table["cluster"], bool):
            values["cluster"] = table["cluster"]
        else:
            p.add("ledger.cluster", f"must be true or false, got {_show(table['cluster'])}")
    if "local_share" in table:
        share = table["local_share"]
        if isinstance(share, int | float) and not isinstance(share, bool) and 0 < share <= 1:
            values["local_share"] = float(share)
        else:
            p.add("ledger.local_share", "must be a number in (0, 1], e.g. 0.34 for 3 "
                  f"replicas, got {_show(share)}")
    elif values.get("when_unavailable") is WhenUnavailable.LOCAL_SHARE:
        p.add("ledger.local_share", "missing: the share of the limits each sidecar may "
              "grant alone while Redis is away, e.g. 0.34 for 3 replicas")
    if "url" not in values:
        if "url" not in table:
            p.add("ledger.url", "missing; e.g. \"redis://redis:6379/0\"")
        return None
    try:
        return SharedLedger(**values)
    except ValueError as exc:
        p.add("ledger.url", str(exc))
        return None


def _rules(value: Any, path: str, p: _Problems) -> tuple[ModelRule, ...]:
    table = p.table(value, path)
    if table is None:
        return ()
    rules: list[ModelRule] = []
    for pattern, body in table.items():
        rule_path = _key(path, pattern)
        if not pattern:
            p.add(rule_path, "model pattern must not be empty")
        group = None
        if isinstance(body, dict) and "group" in body:
            body = dict(body)
            group = _group(body.pop("group"), _key(rule_path, "group"), p)
        limits = _limits(body, rule_path, p)
        if limits is not None and pattern:
            rules.append(ModelRule(pattern, limits, group))
    _check_groups(rules, path, p)
    return tuple(rules)


def _group(value: Any, path: str, p: _Problems) -> str | None:
    if not isinstance(value, str) or not _GROUP.fullmatch(value):
        p.add(path, f"must be 1 to 64 characters of A-Z a-z 0-9 . _ -, got {_show(value)}")
        return None
    return value


def _check_groups(rules: list[ModelRule], path: str, p: _Problems) -> None:
    """Rules sharing a group are one budget, so they must agree on its limits; a group may
    not take the name of another rule's own budget (its pattern)."""
    first: dict[str, ModelRule] = {}
    for rule in rules:
        if rule.group is None:
            continue
        where = _key(_key(path, rule.pattern), "group")
        other = first.setdefault(rule.group, rule)
        if other.limits != rule.limits:
            p.add(where, f"rules in group {_show(rule.group)} must have the same limits; "
                  f"{_show(other.pattern)} has different ones")
        if any(r.group is None and r.pattern == rule.group for r in rules):
            p.add(where, f"{_show(rule.group)} is also a model rule's pattern; pick another name")


def _limits(value: Any, path: str, p: _Problems) -> Limits | None:
    table = p.table(value, path)
    if table is None:
        return None
    values: dict[str, int] = {}
    for key, v in table.items():
        if key in _LIMIT_KEYS:
            if (n := p.integer(v, _key(path, key))) is not None:
                values[key] = n
        elif isinstance(v, dict):
            # [models.claude-3.5-haiku] nests tables at the dot: the usual cause
            p.add(_key(path, key), "unknown key (a table); a model id with a dot must be "
                  'quoted, e.g. [models."claude-3.5-haiku"]')
        else:
            p.unknown_keys({key: v}, _LIMIT_KEYS, path)
    return Limits(**values)


def _scopes(
    value: Any,
    models: tuple[ModelRule, ...],
    user_models: tuple[ModelRule, ...],
    p: _Problems,
) -> dict[str, ScopeConfig]:
    if not isinstance(value, list):
        p.add("scopes", f"must be an array of tables ([[scopes]]), got {_show(value)}")
        return {}
    scopes: dict[str, ScopeConfig] = {}
    seen_alias: dict[str, str] = {}
    seen_scope: dict[str, str] = {}
    for i, item in enumerate(value):
        path = f"scopes[{i}]"
        table = p.table(item, path)
        if table is None:
            continue
        p.unknown_keys(table, _SCOPE_KEYS, path)
        scope = _scope_hash(table.get("scope"), f"{path}.scope", p)
        alias = _alias(table.get("alias"), f"{path}.alias", p)
        overrides = _overrides(_rules(table.get("models", {}), f"{path}.models", p), models)
        user_overrides = _overrides(
            _rules(table.get("user_limits", {}), f"{path}.user_limits", p), user_models)
        if scope is not None and scope in seen_scope:
            p.add(f"{path}.scope", f"duplicate of {seen_scope[scope]}.scope {_show(scope)}")
            scope = None
        if alias is not None and alias in seen_alias:
            p.add(f"{path}.alias", f"duplicate of {seen_alias[alias]}.alias {_show(alias)}")
            alias = None
        if scope is not None:
            seen_scope[scope] = path
        if alias is not None:
            seen_alias[alias] = path
        if scope is not None and alias is not None:
            scopes[scope] = ScopeConfig(scope, alias, overrides, user_overrides)
    return scopes


def _overrides(rules: tuple[ModelRule, ...], defaults: tuple[ModelRule, ...]
               ) -> tuple[ModelRule, ...]:
    """A scope's rule for a default rule's pattern overrides that rule, group included."""
    groups = {r.pattern: r.group for r in defaults if r.group}
    return tuple(
        replace(r, group=groups[r.pattern]) if r.group is None and r.pattern in groups else r
        for r in rules
    )


def _scope_hash(value: Any, path: str, p: _Problems) -> str | None:
    # The value is never echoed: a mistake here may well be a secret.
    if value is None:
        p.add(path, "missing; the API-key hash this entry applies to")
    elif not isinstance(value, str) or not value:
        p.add(path, f"must be a non-empty string, got {_show(value)}")
    elif value.startswith("sk-"):
        p.add(path, "is a raw API key: never put a key here, put its hash (`limiterd scope` "
              "reads the key from stdin and prints it); and rotate the key if this file was "
              "shared")
    elif not _SCOPE_HASH.fullmatch(value):
        p.add(path, f"must be an API key's hash, {SCOPE_HASH_HEX} lowercase hex characters as "
              f"`limiterd scope` and the client's scope_for_api_key print it; got "
              f"{len(value)} characters" + ("" if value.isascii() and value.isalnum()
                                            else " with some not hex"))
    else:
        return value
    return None


def _alias(value: Any, path: str, p: _Problems) -> str | None:
    if value is None:
        p.add(path, 'missing; a name for logs and metrics, e.g. "prod-key"')
    elif not isinstance(value, str) or not _ALIAS.fullmatch(value):
        p.add(path, f"must be 1 to 64 characters of A-Z a-z 0-9 . _ -, got {_show(value)}")
    else:
        return value
    return None


def _key(path: str, key: str) -> str:
    """`path.key`, quoting `key` the way TOML would need it."""
    part = key if _BARE_KEY.fullmatch(key) else json.dumps(key, ensure_ascii=False)
    return f"{path}.{part}" if path else part


def _show(value: Any) -> str:
    """A value as it looks in TOML, or its kind when that would be long."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        shown = json.dumps(value, ensure_ascii=False)
        return shown if len(shown) <= 80 else shown[:76] + '..."'
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, dict):
        return "a table"
    if isinstance(value, list):
        return "an array"
    return f"a {type(value).__name__}"  # dates and times
