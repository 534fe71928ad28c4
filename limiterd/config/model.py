"""Typed configuration. The loader (loader.py) turns TOML into these; nothing else parses."""

from __future__ import annotations

import fnmatch
from collections.abc import Mapping
from dataclasses import dataclass, field, fields

from limiterd.shared.settings import SharedLedger


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
    """Limits for the models whose id matches `pattern` (exact, or an fnmatch glob).

    Every model a rule matches draws on one budget (Anthropic counts a model class's limit
    across its versions and aliases), named `group` when rules share one, else the pattern.
    """

    pattern: str
    limits: Limits
    group: str | None = None

    @property
    def budget(self) -> str:
        return self.group or self.pattern

    def matches(self, model: str) -> bool:
        return self.pattern == model or fnmatch.fnmatchcase(model, self.pattern)


def first_rule(rules: tuple[ModelRule, ...], model: str) -> ModelRule | None:
    """Exact names win over globs; among globs, the first in file order."""
    for rule in rules:
        if rule.pattern == model:
            return rule
    for rule in rules:
        if rule.matches(model):
            return rule
    return None


@dataclass(frozen=True, slots=True)
class Budget:
    """What a model draws on: the budget's name (the bucket key) and its limits."""

    name: str
    limits: Limits


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
    max_waiters: int = 20_000  # over every queue: memory and the loop stay bounded
    max_streams: int = 10_000  # AcquireStream callers waiting at once
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
    # Wait estimates count the refunds expected from calls in flight (ledger/refunds.py)
    expect_refunds: bool = True
    # The time from a client's send to the provider counting the request (the network): a
    # take from a full bucket holds its refill until the client marks its send (MarkSent),
    # then this long; after the grant, for a client that does not mark
    # (limiterd/ledger/buckets.py). 0 = off.
    refill_allowance_s: float = 0.1


@dataclass(frozen=True)
class Config:
    settings: Settings = Settings()
    models: tuple[ModelRule, ...] = ()
    user_models: tuple[ModelRule, ...] = ()
    scopes: Mapping[str, ScopeConfig] = field(default_factory=dict)
    source: str | None = None  # the file it came from, for messages
    ledger: SharedLedger | None = None  # [ledger]: shared on Redis; None = local (SQLite)
    _cache: dict[tuple[str, str, bool], Budget | None] = field(
        default_factory=dict, repr=False, compare=False
    )
    _by_name: dict[tuple[str, str, bool], Limits | None] = field(
        default_factory=dict, repr=False, compare=False
    )

    def budget_for(self, scope: str, model: str, user: bool = False) -> Budget | None:
        """The budget `model` draws on under `scope` (per user when `user`), or None when no
        rule matches it. The most specific rule names it: the scope's own rule when one
        matches the model, else the default rule."""
        key = (scope, model, user)
        try:
            return self._cache[key]
        except KeyError:
            pass
        base, scoped = self._tables(scope, user)
        rule = first_rule(scoped, model) or first_rule(base, model)
        result = None
        if rule is not None:
            limits = self.budget_limits(scope, rule.budget, user)
            result = Budget(rule.budget, limits) if limits is not None else None
        if len(self._cache) >= 65_536:  # bounded: scopes x models seen
            self._cache.clear()
        self._cache[key] = result
        return result

    def budget_limits(self, scope: str, name: str, user: bool = False) -> Limits | None:
        """The limits of budget `name` under `scope`, a function of the name alone, so every
        model in one budget sees the same limits (and a restart or reload finds them). A
        scope's rule replaces only the fields it sets, of the default rule of the same name,
        else of the default rule its pattern falls under."""
        key = (scope, name, user)
        try:
            return self._by_name[key]
        except KeyError:
            pass
        base, scoped = self._tables(scope, user)
        override = next((r for r in scoped if r.budget == name), None)
        default = next((r for r in base if r.budget == name), None)
        if override is not None and default is None:
            default = first_rule(base, override.pattern)
        result: Limits | None = None
        if default is not None:
            result = default.limits if override is None else default.limits.merged(
                override.limits)
        elif override is not None:
            result = override.limits
        if len(self._by_name) >= 65_536:
            self._by_name.clear()
        self._by_name[key] = result
        return result

    def limits_for(self, scope: str, model: str) -> Limits | None:
        """The scope x model bucket's limits, or None when the model has no limits at all."""
        budget = self.budget_for(scope, model)
        return budget.limits if budget is not None else None

    def user_limits_for(self, scope: str, model: str) -> Limits | None:
        """Limits for each user under scope x model, or None when users are not limited."""
        budget = self.budget_for(scope, model, user=True)
        return budget.limits if budget is not None else None

    def alias_for(self, scope: str) -> str | None:
        sc = self.scopes.get(scope)
        return sc.alias if sc else None

    def _tables(
        self, scope: str, user: bool
    ) -> tuple[tuple[ModelRule, ...], tuple[ModelRule, ...]]:
        sc = self.scopes.get(scope)
        if user:
            return self.user_models, sc.user_models if sc else ()
        return self.models, sc.models if sc else ()
