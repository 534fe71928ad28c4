"""The journal interface: where the ledger's changes are made durable.

A backend loads a Snapshot once at start (`open`), then receives batches of Changes (`write`:
one batch is one group commit, all or nothing), and is closed at stop. The ledger's state
lives in memory; a journal only records it. Modeled on gubernator's Loader/Store split.

Errors: a backend names its driver's exception types in `driver_errors`; every subclass's
`open`, `write` and `close` are wrapped when the class is defined (`__init_subclass__`, as
alisaifee/limits does) so those come out as StartupError (from `open`) or StorageError,
whose message names the journal. Callers catch StorageError and nothing else.
"""

from __future__ import annotations

import abc
import functools
from collections.abc import Awaitable, Callable, Coroutine, Mapping, Sequence
from typing import TYPE_CHECKING, Any, ClassVar

from limiterd.ledger.model import Change, Snapshot

if TYPE_CHECKING:
    from limiterd.errorlog import ErrorStore


class StorageError(Exception):
    """A journal could not do what was asked. The message names where and why."""


class StartupError(StorageError):
    """The journal cannot be opened at all (locked, corrupt, unwritable, too new).

    The message is one line meant for the operator, and says how to recover.
    """


class HasDriverErrors(abc.ABC):
    """A storage object whose driver failures are re-raised as StorageError.

    Subclasses list their driver's exception types in `driver_errors` and the async methods
    to guard in `guarded` (method name -> what it does, for the message). The wrapping
    happens once per class, when it is defined, and leaves the methods' types alone.
    """

    driver_errors: ClassVar[tuple[type[Exception], ...]] = ()
    guarded: ClassVar[Mapping[str, str]] = {}

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        for method, what in cls.guarded.items():
            if method in cls.__dict__:
                setattr(cls, method, _guard(cls.__dict__[method], what))

    @abc.abstractmethod
    def name(self) -> str:
        """Where the data lives, for error messages (a path, a URL)."""

    def failed(self, what: str, exc: Exception) -> StorageError:
        """The StorageError for a driver failure while doing `what`."""
        return StorageError(f"{self.name()}: {what} failed: {exc}")


def _guard(
    fn: Callable[..., Awaitable[Any]], what: str
) -> Callable[..., Coroutine[Any, Any, Any]]:
    @functools.wraps(fn)
    async def guarded(self: HasDriverErrors, *args: Any, **kwargs: Any) -> Any:
        try:
            return await fn(self, *args, **kwargs)
        except StorageError:
            raise
        except self.driver_errors as exc:
            raise self.failed(what, exc) from exc

    return guarded


class Journal(HasDriverErrors):
    #: Whether write() makes changes survive a process crash. When False, the engine
    #: answers requests without waiting for write() (in-memory mode).
    durable: ClassVar[bool] = True

    # `open` is special-cased in failed(): the operator hears one line on how to recover.
    guarded: ClassVar[Mapping[str, str]] = {"open": "open", "write": "write", "close": "close"}

    @abc.abstractmethod
    async def open(self) -> Snapshot:
        """Open (creating or migrating as needed) and return what was saved.

        Raises StartupError with a one-line message for the operator."""

    @abc.abstractmethod
    async def write(self, changes: Sequence[Change]) -> None:
        """Write one batch atomically: all of it commits or none of it. Raises StorageError.

        Changes are in the order they happened; later changes to the same row win. The
        engine retries a failed batch merged with newer changes, so writes must be
        idempotent (upserts; deleting a missing row is a no-op).
        """

    @abc.abstractmethod
    async def close(self) -> None:
        """Flush and release the backend. Safe to call twice."""

    def describe(self) -> str:
        """For logs: where this journal keeps its data, and how."""
        return self.name()

    def error_store(self) -> ErrorStore | None:
        """Where the error log (limiterd.errorlog) is kept, if this backend keeps it."""
        return None

    def failed(self, what: str, exc: Exception) -> StorageError:
        if what == "open":
            return self.startup_error(exc)
        return super().failed(what, exc)

    def startup_error(self, exc: Exception) -> StartupError:
        """The operator's line for a driver failure in open(); backends refine it."""
        return StartupError(f"cannot open {self.name()}: {exc}")
