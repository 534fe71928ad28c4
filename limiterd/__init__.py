"""limiterd: a sidecar rate limiter for LLM provider calls.

Layout (each layer knows only the ones below it):
    api/       gRPC servicers: protobuf <-> domain values, validation, status codes
    engine.py  the async shell around the ledger: waiters, timers, group commit
    ledger/    the pure ledger: buckets, reservations, FIFO queues; no I/O, injected time
    storage/   the journal: where ledger changes are made durable (memory, SQLite)
    config/    TOML config -> typed limits
    server.py  the process: build, serve, drain on SIGTERM
    cli.py     click commands
"""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("limiterd")  # one source: pyproject.toml
except PackageNotFoundError:  # imported from a source tree that was never installed
    __version__ = "0+unknown"
