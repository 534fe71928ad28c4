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

SENTINEL_SCHEMES = {"redis+sentinel": False, "rediss+sentinel": True}  # scheme -> TLS
SENTINEL_FORM = "redis+sentinel://host:26379,host2:26379/mymaster/0"


@dataclass(frozen=True, slots=True)
class SentinelAddress:
    """Where Sentinel finds the master: the sentinels to ask, the master's name, the db.
    Parsed by hand because a list of hosts is not one URL authority."""

    sentinels: tuple[tuple[str, int], ...]
    service: str
    db: int
    tls: bool

    @classmethod
    def parse(cls, url: str) -> SentinelAddress:
        """Raises ValueError naming what is wrong with `url`."""
        scheme, sep, rest = url.partition("://")
        if not sep or scheme not in SENTINEL_SCHEMES:
            raise ValueError(f"{url!r}: expected {SENTINEL_FORM}")
        hosts, _, path = rest.partition("/")
        if "@" in hosts:
            raise ValueError("put no password in the URL (it shows in `ps` and logs); set "
                             "$LIMITERD_REDIS_PASSWORD or a password file instead")
        sentinels = []
        for item in hosts.split(","):
            host, colon, port = item.strip().rpartition(":")
            if not colon:
                host, port = port, "26379"
            if not host or not port.isdigit() or not 0 < int(port) < 65536:
                raise ValueError(f"{url!r}: sentinel {item.strip()!r} is not host:port "
                                 f"(expected {SENTINEL_FORM})")
            sentinels.append((host.strip("[]"), int(port)))
        service, _, db = path.partition("/")
        if not service:
            raise ValueError(f"{url!r}: no master name after the sentinels "
                             f"(expected {SENTINEL_FORM})")
        if db and not db.isdigit():
            raise ValueError(f"{url!r}: db must be a number, got {db!r}")
        return cls(tuple(sentinels), service, int(db or 0), SENTINEL_SCHEMES[scheme])

    def describe(self) -> str:
        hosts = ",".join(f"{h}:{p}" for h, p in self.sentinels)
        return f"master {self.service!r} db {self.db} via Sentinel {hosts}"


class WhenUnavailable(enum.Enum):
    FAIL_CLOSED = "fail_closed"  # UNAVAILABLE until Redis answers again
    LOCAL_SHARE = "local_share"  # a local ledger at `local_share` of the limits meanwhile


@dataclass(frozen=True, slots=True)
class SharedLedger:
    url: str  # redis://, rediss:// or redis+sentinel://, with a db number; never a password
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
        if self.when_unavailable is WhenUnavailable.LOCAL_SHARE and not 0 < self.local_share <= 1:
            raise ValueError(f"local_share must be in (0, 1], got {self.local_share}")
        if self.url.split("://", 1)[0] in SENTINEL_SCHEMES:
            SentinelAddress.parse(self.url)
            if self.cluster:
                raise ValueError("a Sentinel address names a master, not a Cluster node: "
                                 "set cluster = false")
            return
        parts = urlsplit(self.url)
        if parts.scheme not in ("redis", "rediss"):
            raise ValueError(f"{self.url!r}: expected redis://host:port/db, "
                             f"rediss://host:port/db or {SENTINEL_FORM}")
        if parts.password:
            raise ValueError("put no password in the URL (it shows in `ps` and logs); set "
                             f"${self.password_env} or a password file instead")
        if not parts.hostname:
            raise ValueError(f"{self.url!r}: no host")

    @property
    def sentinel(self) -> SentinelAddress | None:
        """The Sentinel address when the URL is one (redis+sentinel://), else None."""
        if self.url.split("://", 1)[0] in SENTINEL_SCHEMES:
            return SentinelAddress.parse(self.url)
        return None

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
        policy = self.when_unavailable.value
        if self.when_unavailable is WhenUnavailable.LOCAL_SHARE:
            policy += f" {self.local_share:.3g}"
        if (sentinel := self.sentinel) is not None:
            return f"shared on Redis, {sentinel.describe()} ({policy} when unreachable)"
        parts = urlsplit(self.url)
        where = f"{parts.scheme}://{parts.hostname}:{parts.port or 6379}{parts.path or '/0'}"
        kind = "Redis Cluster" if self.cluster else "Redis"
        return f"shared on {kind} at {where} ({policy} when unreachable)"
