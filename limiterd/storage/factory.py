"""From a --db value to a journal, and where the database lives by default."""

from __future__ import annotations

import os
from pathlib import Path

from limiterd.defaults import DEFAULT_DB
from limiterd.storage.base import Journal
from limiterd.storage.memory import MemoryJournal
from limiterd.storage.sqlite import SqliteJournal, Synchronous


def default_db_path() -> Path:
    """$LIMITERD_DB, else $XDG_STATE_HOME/limiterd/limiterd.sqlite3, else ./var/..."""
    if env := os.environ.get("LIMITERD_DB"):
        return Path(env)
    if state := os.environ.get("XDG_STATE_HOME"):
        return Path(state) / "limiterd" / "limiterd.sqlite3"
    return Path(DEFAULT_DB)


def open_journal(db: str, synchronous: Synchronous = "NORMAL") -> Journal:
    """The journal for a --db value: ":memory:" keeps nothing, anything else is a file."""
    if db == ":memory:":
        return MemoryJournal()
    return SqliteJournal(db, synchronous=synchronous)
