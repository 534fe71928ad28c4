"""The gateway's settings: typed, frozen, read from flags and an optional TOML file.

Format (every key optional)::

    [gateway]
    max_wait_s = 60                 # longest a request waits in limiterd's queue
    max_body_bytes = 33554432       # a /v1/messages body over this is a 400
    estimate = "chars"              # or "count_tokens": ask the upstream's count endpoint
    salt = "limiterd-scope-v1"      # the scope hash key; the same as the Python client's
    stream_keepalive_after_s = 5    # streams waiting longer get 200 + `ping` events (off: 0)
    ping_interval_s = 10
    on_unavailable = "closed"       # daemon unreachable: "closed" (503) or "open" (forward)
    upstream_read_timeout_s = 600

    [models."claude-opus-4-1"]      # optional per-model policy (exact model ids)
    retries = 2                     # retry 429/529 in the gateway while nothing was sent
    max_retry_after_s = 20          # never wait longer than this for one retry
    fallback = ["claude-sonnet-4-5", "claude-haiku-4-5"]

    [models."claude-haiku-4-5"]
    max_tokens = 1024               # cap max_tokens when a fallback lands on this model

Models named here are also the only ones that get their own metrics label.
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from types import MappingProxyType
from typing import Any

from limiterd_client.scope import DEFAULT_SALT

DEFAULT_GATEWAY_LISTEN = "127.0.0.1:8787"
DEFAULT_UPSTREAM = "https://api.anthropic.com"
ESTIMATES = ("chars", "count_tokens")
UNAVAILABLE_MODES = ("closed", "open")


class GatewayConfigError(Exception):
    """A config file or flag is wrong; the message names the key."""


@dataclass(frozen=True)
class ModelPolicy:
    retries: int = 0
    max_retry_after_s: float = 30.0
    fallback: tuple[str, ...] = ()
    max_tokens: int | None = None  # cap applied when a fallback lands on this model


@dataclass(frozen=True)
class GatewayConfig:
    listen: str = DEFAULT_GATEWAY_LISTEN
    limiter: str = "127.0.0.1:50051"
    upstream: str = DEFAULT_UPSTREAM
    metrics_listen: str = ""
    max_wait_s: float = 60.0
    max_body_bytes: int = 32 * 1024 * 1024
    estimate: str = "chars"
    salt: str = DEFAULT_SALT
    stream_keepalive_after_s: float = 0.0
    ping_interval_s: float = 10.0
    on_unavailable: str = "closed"
    upstream_read_timeout_s: float = 600.0
    grace_s: float = 10.0
    models: MappingProxyType[str, ModelPolicy] = field(
        default_factory=lambda: MappingProxyType({}))

    def policy(self, model: str) -> ModelPolicy:
        return self.models.get(model) or ModelPolicy()

    @property
    def host_port(self) -> tuple[str, int]:
        host, _, port = self.listen.rpartition(":")
        return host.strip("[]") or "127.0.0.1", int(port)


_GATEWAY_KEYS = {f.name for f in fields(GatewayConfig)} - {"models", "listen", "limiter",
                                                           "upstream", "metrics_listen",
                                                           "grace_s"}
_POLICY_KEYS = {f.name for f in fields(ModelPolicy)}


def _number(where: str, value: Any, *, integer: bool = False, minimum: float = 0) -> Any:
    ok = isinstance(value, int) if integer else isinstance(value, int | float)
    if isinstance(value, bool) or not ok or value < minimum:
        kind = "an integer" if integer else "a number"
        raise GatewayConfigError(f"{where}: must be {kind} >= {minimum}")
    return value


def _policy(name: str, raw: Any) -> ModelPolicy:
    if not isinstance(raw, dict):
        raise GatewayConfigError(f"models.{name}: must be a table")
    unknown = set(raw) - _POLICY_KEYS
    if unknown:
        raise GatewayConfigError(f"models.{name}.{sorted(unknown)[0]}: unknown key")
    where = f"models.{name}"
    fallback = raw.get("fallback", [])
    if not isinstance(fallback, list) or not all(isinstance(m, str) and m for m in fallback):
        raise GatewayConfigError(f"{where}.fallback: must be a list of model ids")
    if name in fallback:
        raise GatewayConfigError(f"{where}.fallback: must not name the model itself")
    max_tokens = raw.get("max_tokens")
    return ModelPolicy(
        retries=_number(f"{where}.retries", raw.get("retries", 0), integer=True),
        max_retry_after_s=float(_number(f"{where}.max_retry_after_s",
                                        raw.get("max_retry_after_s", 30.0))),
        fallback=tuple(fallback),
        max_tokens=(None if max_tokens is None
                    else _number(f"{where}.max_tokens", max_tokens, integer=True, minimum=1)))


def validate(cfg: GatewayConfig) -> GatewayConfig:
    """Check the values a file or a flag may have set; returns `cfg` unchanged."""
    if cfg.estimate not in ESTIMATES:
        raise GatewayConfigError(f"gateway.estimate: must be one of {', '.join(ESTIMATES)}")
    if cfg.on_unavailable not in UNAVAILABLE_MODES:
        raise GatewayConfigError(
            f"gateway.on_unavailable: must be one of {', '.join(UNAVAILABLE_MODES)}")
    _number("gateway.max_wait_s", cfg.max_wait_s)
    _number("gateway.max_body_bytes", cfg.max_body_bytes, integer=True, minimum=1)
    _number("gateway.stream_keepalive_after_s", cfg.stream_keepalive_after_s)
    _number("gateway.ping_interval_s", cfg.ping_interval_s, minimum=0.01)
    _number("gateway.upstream_read_timeout_s", cfg.upstream_read_timeout_s, minimum=0.01)
    if not cfg.upstream.startswith(("http://", "https://")):
        raise GatewayConfigError("upstream: must be an http:// or https:// URL")
    try:
        cfg.host_port  # noqa: B018 (parses)
    except ValueError:
        raise GatewayConfigError(f"listen: expected host:port, got {cfg.listen!r}") from None
    return cfg


def parse_gateway_config(text: str, source: str, base: GatewayConfig | None = None
                         ) -> GatewayConfig:
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise GatewayConfigError(f"{source}: not valid TOML: {e}") from None
    unknown = set(raw) - {"gateway", "models"}
    if unknown:
        raise GatewayConfigError(f"{source}: {sorted(unknown)[0]}: unknown section")
    section = raw.get("gateway", {})
    bad = set(section) - _GATEWAY_KEYS
    if bad:
        raise GatewayConfigError(f"{source}: gateway.{sorted(bad)[0]}: unknown key")
    try:
        policies = {name: _policy(name, p) for name, p in raw.get("models", {}).items()}
        cfg = replace(base or GatewayConfig(), **section,
                      models=MappingProxyType(policies))
        return validate(cfg)
    except GatewayConfigError as e:
        raise GatewayConfigError(f"{source}: {e}") from None
    except TypeError as e:
        raise GatewayConfigError(f"{source}: {e}") from None


def load_gateway_config(path: str | None, base: GatewayConfig) -> GatewayConfig:
    if path is None:
        return validate(base)
    try:
        text = Path(path).read_text()
    except OSError as e:
        raise GatewayConfigError(f"{path}: cannot read: {e.strerror}") from None
    return parse_gateway_config(text, path, base)
