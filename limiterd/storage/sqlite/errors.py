"""The one line an operator reads when the database cannot be opened, by cause."""

from __future__ import annotations

import errno
import sqlite3
from pathlib import Path

from limiterd.storage.base import StartupError


def corrupt(path: Path, detail: str = "") -> StartupError:
    why = f" ({detail})" if detail else ""
    return StartupError(
        f"{path} is not a limiterd database or is corrupt{why}: move it aside "
        f"(mv {path} {path}.bad) and start again; state in it is lost"
    )


def in_use(path: Path, holder: str) -> StartupError:
    return StartupError(
        f"{path} is in use by another limiterd (pid {holder}); stop it or use another --db"
    )


def startup_error(path: Path, exc: BaseException) -> StartupError:
    """Map a sqlite3 or OS error met while opening to its line."""
    code = getattr(exc, "sqlite_errorcode", None)
    code = code & 0xFF if isinstance(code, int) else None  # the primary result code
    err = exc.errno if isinstance(exc, OSError) else None
    if code in (sqlite3.SQLITE_NOTADB, sqlite3.SQLITE_CORRUPT):
        return corrupt(path)
    if err in (errno.ENOTDIR, errno.EEXIST):  # mkdir met a file where a folder should be
        return StartupError(
            f"{path} is not writable: a parent of it is a file, not a folder ({exc}): "
            "move that file or point --db elsewhere"
        )
    if code == sqlite3.SQLITE_FULL or err in (errno.ENOSPC, errno.EDQUOT):
        return StartupError(f"{path}: the disk is full ({exc}): free space and start again")
    if code in (sqlite3.SQLITE_READONLY, sqlite3.SQLITE_CANTOPEN, sqlite3.SQLITE_PERM) or err in (
        errno.EACCES,
        errno.EPERM,
        errno.EROFS,
    ):
        return StartupError(
            f"{path} is not writable ({exc}): fix the permissions of {path.parent} "
            "or point --db elsewhere"
        )
    return StartupError(f"cannot open {path}: {exc}")
