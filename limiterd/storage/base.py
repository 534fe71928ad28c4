"""The journal interface: where the ledger's changes are made durable.

Modeled on gubernator's Loader/Store split and alisaifee/limits' StorageError: a backend
loads a Snapshot once at start, then receives batches of Changes (one batch = one group
commit, written atomically), and wraps every failure in StorageError. The ledger's state
lives in memory; a journal only records it. A shared backend (Redis, later) sits beside
SQLite behind this same interface.
"""

from __future__ import annotations

import abc
from collections.abc import Sequence

from limiterd.ledger.model import Change, Snapshot


class StorageError(Exception):
    """A journal could not do what was asked. The message names the path and the cause."""


class StartupError(StorageError):
    """The journal cannot be opened at all (locked, corrupt, unwritable, too new).

    The message is one line meant for the operator, and says how to recover.
    """


class Journal(abc.ABC):
    #: Whether write() makes changes survive a process crash. When False, the engine
    #: answers requests without waiting for write() (in-memory mode).
    durable: bool = True

    @abc.abstractmethod
    async def open(self) -> Snapshot:
        """Open (creating or migrating as needed) and return what was saved."""

    @abc.abstractmethod
    async def write(self, changes: Sequence[Change]) -> None:
        """Write one batch atomically: all of it commits or none of it. Raises StorageError.

        Changes are in the order they happened; later changes to the same row win.
        """

    @abc.abstractmethod
    async def close(self) -> None:
        """Flush and release the backend. Safe to call twice."""

    def describe(self) -> str:
        """For logs: where this journal keeps its data."""
        return type(self).__name__
