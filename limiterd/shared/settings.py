"""Which ledger a daemon uses, and for the shared one: where Redis is and what to do without it.

The password never travels on the command line (`ps` shows it): it comes from an environment
variable or a file, named in the config or by flags.
"""

from __future__ import annotations

import enum
import os
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from limiterd.storage.base import StartupError


class WhenUnavailable(enum.Enum):
    FAIL_CLOSED = "fail_closed"  # UNAVAILABLE until Redis answers again
    LOCAL_SHARE = "local_share"  # a local ledger at `local_share` of the limits meanwhile


@dataclass(frozen=True, slots=True)
class SharedLedger:
    url: str  # redis:// or rediss://, with a db number; never a password
    password_env: str = "LIMITERD_REDIS_PASSWORD"
    password_file: str | None = None
    when_unavailable: WhenUnavailable = WhenUnavailable.FAIL_CLOSED
    local_share: float = 1.0
    key_prefix: str = "limiterd"
    queue_entry_ttl_s: float = 10.0  # a dead sidecar's waiters stop blocking after this
    sweep_interval_s: float = 1.0
    idle_ttl_s: float = 180.0  # an idle bucket is dropped this long after its last lease
    timeout_s: float = 2.0
    cluster: bool = False  # url names one node of a Redis Cluster; the others are discovered

    def __post_init__(self) -> None:
        """Raises ValueError with a message that names what is wrong."""
        parts = urlsplit(self.url)
        if parts.scheme not in ("redis", "rediss"):
            raise ValueError(f"{self.url!r}: expected redis://host:port/db or "
                             "rediss://host:port/db")
        if parts.password:
            raise ValueError("put no password in the URL (it shows in `ps` and logs); set "
                             f"${self.password_env} or a password file instead")
        if not parts.hostname:
            raise ValueError(f"{self.url!r}: no host")
        if self.when_unavailable is WhenUnavailable.LOCAL_SHARE and not 0 < self.local_share <= 1:
            raise ValueError(f"local_share must be in (0, 1], got {self.local_share}")

    def password(self) -> str | None:
        if self.password_file:
            try:
                return Path(self.password_file).read_text().strip() or None
            except OSError as exc:
                raise StartupError(
                    f"redis password file {self.password_file}: {exc.strerror or exc}"
                ) from None
        return os.environ.get(self.password_env) or None

    def describe(self) -> str:
        parts = urlsplit(self.url)
        where = f"{parts.scheme}://{parts.hostname}:{parts.port or 6379}{parts.path or '/0'}"
        policy = self.when_unavailable.value
        if self.when_unavailable is WhenUnavailable.LOCAL_SHARE:
            policy += f" {self.local_share:.3g}"
        kind = "Redis Cluster" if self.cluster else "Redis"
        return f"shared on {kind} at {where} ({policy} when unreachable)"
