"""For every test in both suites (tests/ and client/tests/): a healthy run logs no errors.

An ERROR from limiterd or asyncio (a task that died, a future whose exception nobody read)
fails the test it happened in, unless the test is marked `logs_errors` because it provokes one.
"""

from __future__ import annotations

import gc
import logging
from collections.abc import Iterator

import pytest

WATCHED = ("limiterd", "asyncio")


@pytest.fixture(autouse=True)
def no_error_logs(
    request: pytest.FixtureRequest, caplog: pytest.LogCaptureFixture
) -> Iterator[None]:
    yield
    if request.node.get_closest_marker("logs_errors") is not None:
        return
    gc.collect()  # an unread future exception is logged only when the future is collected
    errors = [
        f"{r.name}: {r.getMessage()}"
        for when in ("setup", "call", "teardown")
        for r in caplog.get_records(when)
        if r.levelno >= logging.ERROR and r.name.split(".")[0] in WATCHED
    ]
    assert not errors, "logged at ERROR in a healthy run:\n" + "\n".join(errors)


def pytest_collection_finish(session: pytest.Session) -> None:
    # Everything imported so far lives for the whole run: keep it out of the collections
    # above, which would otherwise re-walk it after every test (~0.2 s each).
    gc.freeze()
