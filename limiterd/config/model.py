"""Typed configuration. The loader (loader.py) turns TOML into these; nothing else parses."""

from __future__ import annotations

import fnmatch
from collections.abc import Mapping
from dataclasses import dataclass, field, fields


@dataclass(frozen=True, slots=True)
class Limits:
    """Per-minute limits of one bucket. None = no limit on that dimension."""

    requests_per_minute: int | None = None
    input_tokens_per_minute: int | None = None
    output_tokens_per_minute: int | None = None
    max_concurrent: int | None = None

    def merged(self, override: Limits) -> Limits:
        """These limits with every field that `override` sets replaced."""
        values = {f.name: getattr(self, f.name) for f in fields(self)}
        values.update(
            {f.name: getattr(override, f.name) for f in fields(override)
             if getattr(override, f.name) is not None}
        )
        return Limits(**values)


@dataclass(frozen=True, slots=True)
class ModelRule:
    """Limits for the models whose id matches `pattern` (exact, or an fnmatch glob)."""

    pattern: str
    limits: Limits

    def matches(self, model: str) -> bool:
        return self.pattern == model or fnmatch.fnmatchcase(model, self.pattern)


def first_match(rules: tuple[ModelRule, ...], model: str) -> Limits | None:
    """Exact names win over globs; among globs, the first in file order."""
    for rule in rules:
        if rule.pattern == model:
            return rule.limits
    for rule in rules:
        if rule.matches(model):
            return rule.limits
    return None


@dataclass(frozen=True, slots=True)
class ScopeConfig:
    """Overrides for one API key, by its scope hash. Fields set here replace the defaults."""

    scope: str
    alias: str
    models: tuple[ModelRule, ...] = ()
    user_models: tuple[ModelRule, ...] = ()


@dataclass(frozen=True, slots=True)
class Settings:
    default_lease_s: float = 600.0
    max_lease_s: float = 3600.0
    max_wait_s: float = 600.0
    max_waiters_per_queue: int = 1000
    settlement_retention_s: float = 86400.0
    max_settlements: int = 100_000
    idle_sweep_interval_s: float = 10.0
    # Live wait status (AcquireStream)
    stream_update_interval_s: float = 5.0  # a Queued keepalive at least this often
    reattach_grace_s: float = 10.0  # a lost stream keeps its place this long
    # Overload awareness: this many OVERLOADED outcomes for a model within the window mark
    # it overloaded for the cool-down.
    overload_window_s: float = 60.0
    overload_threshold: int = 3
    overload_cooldown_s: float = 30.0
    # Provider-synchronized ledgers
    sync_tolerance_tokens: int = 1000  # the provider rounds remaining tokens to thousands
    learn_limits: bool = False  # raise capacity when the provider reports a higher limit


@dataclass(frozen=True)
class Config:
    settings: Settings = Settings()
    models: tuple[ModelRule, ...] = ()
    user_models: tuple[ModelRule, ...] = ()
    scopes: Mapping[str, ScopeConfig] = field(default_factory=dict)
    source: str | None = None  # the file it came from, for messages
    _cache: dict[tuple[str, str, bool], Limits | None] = field(
        default_factory=dict, repr=False, compare=False
    )

    def limits_for(self, scope: str, model: str) -> Limits | None:
        """The scope x model bucket's limits, or None when the model has no limits at all."""
        return self._lookup(scope, model, user=False)

    def user_limits_for(self, scope: str, model: str) -> Limits | None:
        """Limits for each user under scope x model, or None when users are not limited."""
        return self._lookup(scope, model, user=True)

    def alias_for(self, scope: str) -> str | None:
        sc = self.scopes.get(scope)
        return sc.alias if sc else None

    def _lookup(self, scope: str, model: str, user: bool) -> Limits | None:
        key = (scope, model, user)
        try:
            return self._cache[key]
        except KeyError:
            pass
        base = first_match(self.user_models if user else self.models, model)
        sc = self.scopes.get(scope)
        override = first_match(sc.user_models if user else sc.models, model) if sc else None
        if base is None:
            result = override
        elif override is None:
            result = base
        else:
            result = base.merged(override)
        if len(self._cache) >= 65_536:  # bounded: scopes x models seen
            self._cache.clear()
        self._cache[key] = result
        return result
