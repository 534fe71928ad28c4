"""One daemon per database: an exclusive flock on the database file itself.

Locking the file, not a name beside it, means every path to it (a symlink, a hard link, a
bind mount) meets the same lock. The kernel drops the lock when the process dies, so a
SIGKILLed daemon never leaves a stale one. SQLite's own locks are POSIX record locks, which
Linux keeps apart from flock locks. But closing any descriptor of a file drops this
process's POSIX locks on it, so release() must come after SQLite's connection is closed.
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path

from limiterd.storage.sqlite.errors import in_use, startup_error

PROC_LOCKS = Path("/proc/locks")


class DatabaseLock:
    def __init__(self, path: Path) -> None:
        self.path = path
        self._fd: int | None = None

    def acquire(self) -> None:
        """Create the file if needed and lock it, or raise StartupError naming the holder."""
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        except OSError as e:
            raise startup_error(self.path, e) from e
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _holder(os.fstat(fd))
            os.close(fd)
            raise in_use(self.path, holder) from None
        except OSError as e:
            os.close(fd)
            raise startup_error(self.path, e) from e
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            fd, self._fd = self._fd, None
            os.close(fd)  # the only descriptor of this open file: the flock goes with it


def _holder(st: os.stat_result) -> str:
    """The pid holding a flock on this inode, from /proc/locks (Linux); else "unknown".

    Lines read `1: FLOCK  ADVISORY  WRITE 4242 08:01:1311 0 EOF` (device numbers in hex).
    """
    try:
        lines = PROC_LOCKS.read_text().splitlines()
    except OSError:
        return "unknown"
    device = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}"
    on_inode: list[tuple[str, str]] = []  # (device, pid)
    for line in lines:
        fields = line.split()
        if "FLOCK" not in fields:
            continue
        i = fields.index("FLOCK")
        if len(fields) < i + 5:
            continue
        pid, where = fields[i + 3], fields[i + 4]
        dev, _, inode = where.rpartition(":")
        if inode == str(st.st_ino):
            on_inode.append((dev, pid))
    # Some filesystems (btrfs, overlayfs) report another device number there than stat().
    for dev, pid in on_inode:
        if dev == device:
            return pid
    return on_inode[0][1] if len(on_inode) == 1 else "unknown"
