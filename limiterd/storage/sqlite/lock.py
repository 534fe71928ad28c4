"""One daemon per database: an exclusive flock on a `.lock` file beside it, holding the pid.

The kernel drops the lock when the process dies, so a SIGKILLed daemon never leaves a stale
one.
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path

from limiterd.storage.sqlite.errors import in_use, startup_error


class DatabaseLock:
    def __init__(self, path: Path) -> None:
        self.path = path
        self._fd: int | None = None

    @property
    def lock_path(self) -> Path:
        return self.path.with_name(self.path.name + ".lock")

    def acquire(self) -> None:
        try:
            fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        except OSError as e:
            raise startup_error(self.path, e) from e
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise in_use(self.path, holder) from None
        except OSError as e:
            os.close(fd)
            raise startup_error(self.path, e) from e
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        except OSError as e:
            os.close(fd)
            raise startup_error(self.path, e) from e
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            fd, self._fd = self._fd, None
            # Leave the pid in place: truncating could race a successor's write.
            os.close(fd)  # closing the only description drops the flock
