"""The journal interface's error wrapping: a backend's driver errors come out as StorageError
(StartupError from open), naming the backend, whatever the backend's own code raised."""

from __future__ import annotations

from collections.abc import Sequence

import pytest

from limiterd.ledger.model import Change, Snapshot
from limiterd.storage import Journal, StartupError, StorageError


class DriverError(Exception):
    """Stands for a backend driver's own exception type (sqlite3.Error, redis.RedisError)."""


class Raising(Journal):
    driver_errors = (DriverError,)

    def __init__(self, exc: Exception) -> None:
        self.exc = exc

    def name(self) -> str:
        return "db://here"

    async def open(self) -> Snapshot:
        raise self.exc

    async def write(self, changes: Sequence[Change]) -> None:
        raise self.exc

    async def close(self) -> None:
        raise self.exc


async def test_driver_errors_become_storage_errors_naming_the_backend() -> None:
    j = Raising(DriverError("disk on fire"))
    with pytest.raises(StorageError) as err:
        await j.write([])
    assert str(err.value) == "db://here: write failed: disk on fire"
    assert isinstance(err.value.__cause__, DriverError)
    with pytest.raises(StorageError, match="^db://here: close failed: disk on fire$"):
        await j.close()


async def test_open_turns_driver_errors_into_the_operator_line() -> None:
    with pytest.raises(StartupError, match="^cannot open db://here: disk on fire$"):
        await Raising(DriverError("disk on fire")).open()


async def test_storage_errors_and_bugs_pass_through_unchanged() -> None:
    mine = StartupError("db://here is locked")
    with pytest.raises(StartupError) as err:
        await Raising(mine).open()
    assert err.value is mine
    with pytest.raises(KeyError):  # not the driver's: a bug stays a bug, not "storage"
        await Raising(KeyError("x")).write([])
