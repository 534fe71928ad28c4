"""Prometheus metrics. Observability wraps the core from outside: the ledger stays pure.

- Counters move from two places: the engine's change batches (grants and their waits,
  settlements, orphans, pauses, tokens) and the API layer's interceptor (how each call ended,
  handling time).
- Gauges (levels, capacities, queues, open reservations, pauses) are read at scrape time, on
  the event loop, so no call pays for them.

Label cardinality is bounded by the config, never by what callers send: a scope appears under
its configured alias and a model under the name of the config rule (budget) it draws on;
everything else is folded into OTHER (caller-chosen model names once took /metrics to 8.6 MB).
Raw scope hashes and user ids are never labels.
"""

from __future__ import annotations

import asyncio
from collections import defaultdict
from collections.abc import Iterator, Sequence
from typing import Any

import grpc
from prometheus_client import CollectorRegistry, Counter, Histogram, start_http_server
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from limiterd.backend import Backend
from limiterd.config.model import Config
from limiterd.ledger.buckets import RATE_DIMS
from limiterd.ledger.model import (
    Change,
    PauseSet,
    ReservationOpened,
    ReservationSettled,
    State,
)

OTHER = "other"
RPC_BUCKETS = (0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05,
               0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
WAIT_BUCKETS = (0.001, 0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0,
                300.0, 600.0)

# What an Acquire ended as, by status code.
ACQUIRE_RESULTS = {
    grpc.StatusCode.OK: "granted",
    grpc.StatusCode.RESOURCE_EXHAUSTED: "timed_out",
    grpc.StatusCode.FAILED_PRECONDITION: "rejected",
    grpc.StatusCode.INVALID_ARGUMENT: "invalid",
    grpc.StatusCode.UNAVAILABLE: "unavailable",
    grpc.StatusCode.ABORTED: "superseded",
    grpc.StatusCode.CANCELLED: "cancelled",
}


class Metrics:
    def __init__(self, engine: Backend, registry: CollectorRegistry | None = None) -> None:
        self.engine = engine
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.acquires = Counter("limiterd_acquires",
                                "Acquire and AcquireStream calls by result.",
                                ["result"], registry=r)
        self.reports = Counter("limiterd_reports", "Reports by outcome.", ["outcome"],
                               registry=r)
        self.releases = Counter("limiterd_releases", "Reservations released.", registry=r)
        self.tokens = Counter("limiterd_tokens", "Tokens reserved, refunded and overrun.",
                              ["kind", "dimension"], registry=r)
        self.orphaned = Counter("limiterd_orphaned_leases",
                                "Reservations whose lease lapsed without Report or Release.",
                                registry=r)
        self.pauses = Counter("limiterd_rate_limit_pauses",
                              "Pauses set by a RATE_LIMITED (429) report.", registry=r)
        self.provider_failures = Counter(
            "limiterd_provider_failures", "Reports of failed provider calls.",
            ["model", "status_class"], registry=r)
        self.reloads = Counter("limiterd_config_reloads", "Config reloads by result.",
                               ["result"], registry=r)
        self.waited = Histogram("limiterd_acquire_wait_seconds",
                                "Time an Acquire (or AcquireStream) waited before its grant.",
                                buckets=WAIT_BUCKETS, registry=r)
        self.rpc_seconds = Histogram("limiterd_rpc_duration_seconds",
                                     "Time to handle a call, by method.", ["method"],
                                     buckets=RPC_BUCKETS, registry=r)
        self._rpc_children: dict[str, Any] = {}
        self._acquire_children = {code: self.acquires.labels(result)
                                  for code, result in ACQUIRE_RESULTS.items()}
        self._reserved = [self.tokens.labels("reserved", d) for d in RATE_DIMS]
        self._refunded = [self.tokens.labels("refunded", d) for d in RATE_DIMS]
        self._overrun = [self.tokens.labels("overrun", d) for d in RATE_DIMS]
        self._labels = _Labels(engine)
        self._collector = _LedgerCollector(engine, self._labels)
        r.register(self._collector)
        engine.add_listener(self.on_changes)

    # ---- from the engine's change batches -----------------------------------------------

    def on_changes(self, changes: Sequence[Change]) -> None:
        for c in changes:
            if isinstance(c, ReservationOpened):
                self.waited.observe(c.reservation.waited_s)  # Acquire and AcquireStream alike
                res = c.reservation.reserved
                for counter, n in zip(self._reserved, (res.requests, res.input_tokens,
                                                       res.output_tokens), strict=True):
                    if n:
                        counter.inc(n)
            elif isinstance(c, ReservationSettled):
                s = c.settlement
                if s.state is State.EXPIRED:
                    self.orphaned.inc()
                elif s.state is State.RELEASED:
                    self.releases.inc()
                elif s.outcome is not None:
                    self.reports.labels(s.outcome.name).inc()
                for counters, amounts in ((self._refunded, s.refunded), (self._overrun, s.overrun)):
                    for counter, n in zip(counters, (amounts.requests, amounts.input_tokens,
                                                     amounts.output_tokens), strict=True):
                        if n:
                            counter.inc(n)
            elif isinstance(c, PauseSet):
                self.pauses.inc()

    # ---- from the API layer ------------------------------------------------------------------

    def observe_rpc(self, method: str, seconds: float) -> None:
        child = self._rpc_children.get(method)
        if child is None:
            child = self._rpc_children[method] = self.rpc_seconds.labels(method)
        child.observe(seconds)

    def observe_acquire(self, code: grpc.StatusCode) -> None:
        child = self._acquire_children.get(code)
        if child is None:
            child = self.acquires.labels("error")
        child.inc()

    def observe_provider_failure(self, model: str, http_status: int) -> None:
        status_class = f"{http_status // 100}xx" if http_status else "none"
        if http_status in (429, 529):
            status_class = str(http_status)
        self.provider_failures.labels(self._labels.model(model), status_class).inc()

    def serve(self, listen: str) -> Any:
        """Serve /metrics on `listen` (host:port) from a background thread. Call from the
        event loop that runs the engine."""
        self._collector.bind(asyncio.get_running_loop())
        host, _, port = listen.rpartition(":")
        return start_http_server(int(port), addr=host.strip("[]") or "127.0.0.1",
                                 registry=self.registry)


class _Labels:
    """Label values from the current config: configured names pass, the rest is OTHER."""

    def __init__(self, engine: Backend) -> None:
        self.engine = engine
        self._config: Config | None = None
        self._models: frozenset[str] = frozenset()

    def scope(self, scope: str) -> str:
        return self.engine.config.alias_for(scope) or OTHER

    def model(self, name: str) -> str:
        """A budget's name as is; a model id as the default budget it spends; else OTHER."""
        config = self.engine.config
        if config is not self._config:  # a reload: configured names may have changed
            self._config, self._models = config, configured_models(config)
        if name in self._models:
            return name
        budget = config.budget_for("", name)
        return budget.name if budget is not None else OTHER


def configured_models(config: Config) -> frozenset[str]:
    """Every budget's name (a rule's group or pattern), in the defaults and in each scope's
    overrides."""
    rules = [*config.models, *config.user_models]
    for sc in config.scopes.values():
        rules += [*sc.models, *sc.user_models]
    return frozenset(r.budget for r in rules)


class _LedgerCollector(Collector):
    """Gauges read from the ledger at scrape time. The scrape runs on the HTTP server's
    thread, the ledger lives on the event loop: read it there, never across threads."""

    def __init__(self, engine: Backend, labels: _Labels) -> None:
        self.engine = engine
        self.labels = labels
        self.loop: asyncio.AbstractEventLoop | None = None

    def bind(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop

    def collect(self) -> Iterator[GaugeMetricFamily]:
        loop = self.loop
        if loop is None:
            try:
                loop = asyncio.get_running_loop()
            except RuntimeError:
                return
        try:
            running_here = asyncio.get_running_loop() is loop
        except RuntimeError:
            running_here = False
        if running_here:
            families = self._families()
        else:
            families = asyncio.run_coroutine_threadsafe(self._on_loop(), loop).result(5)
        yield from families

    async def _on_loop(self) -> list[GaugeMetricFamily]:
        return self._families()

    def _families(self) -> list[GaugeMetricFamily]:
        engine, labels = self.engine, self.labels
        level = GaugeMetricFamily("limiterd_bucket_level", "Tokens or requests available now.",
                                  labels=["scope", "model", "dimension"])
        capacity = GaugeMetricFamily("limiterd_bucket_capacity", "Bucket capacity per minute.",
                                     labels=["scope", "model", "dimension"])
        queue = GaugeMetricFamily("limiterd_queue_depth", "Callers waiting.",
                                  labels=["scope", "model"])
        levels: dict[tuple[str, str, str], float] = defaultdict(float)
        caps: dict[tuple[str, str, str], float] = defaultdict(float)
        queues: dict[tuple[str, str], float] = defaultdict(float)
        for b in engine.buckets():
            if b.key.user:
                continue  # user ids are never labels; the scope x model bucket says enough
            alias, model = labels.scope(b.key.scope), labels.model(b.key.budget)
            for name, lvl, cap in b.rates():
                levels[(alias, model, name)] += lvl
                caps[(alias, model, name)] += cap
            if b.max_concurrent is not None:
                levels[(alias, model, "concurrent")] += b.max_concurrent - b.slots_held
                caps[(alias, model, "concurrent")] += b.max_concurrent
            queues[(alias, model)] += b.queue_depth
        for key, v in levels.items():
            level.add_metric(list(key), v)
        for key, v in caps.items():
            capacity.add_metric(list(key), v)
        for qkey, v in queues.items():
            queue.add_metric(list(qkey), v)
        stats = engine.stats()
        open_res = GaugeMetricFamily("limiterd_open_reservations", "Reservations held now.",
                                     value=stats.open_reservations)
        waiting = GaugeMetricFamily("limiterd_waiting", "Callers waiting in any queue.",
                                    value=stats.waiting)
        pauses = GaugeMetricFamily("limiterd_active_pauses",
                                   "Scope x model pairs paused by a 429 now.",
                                   value=stats.active_pauses)
        overloaded = GaugeMetricFamily("limiterd_model_overloaded",
                                       "1 while a model budget is marked overloaded.",
                                       labels=["model"])
        for name in sorted({labels.model(m) for m, _until in stats.overloaded}):
            overloaded.add_metric([name], 1)
        healthy = GaugeMetricFamily("limiterd_persistence_healthy",
                                    "1 while the journal writes.", value=int(stats.healthy))
        local_share = GaugeMetricFamily(
            "limiterd_ledger_local_share",
            "1 while a shared-ledger sidecar grants from its local share (Redis away).",
            value=int(stats.local_share))
        return [level, capacity, queue, open_res, waiting, pauses, overloaded, healthy,
                local_share]
