"""The Lua scripts beside this file, each loaded once and then called by its SHA (EVALSHA).

Every script is common.lua followed by its own file; redis-py's Script loads it again by
itself if the server forgot it (a restart, SCRIPT FLUSH), so callers never see NOSCRIPT.
"""

from __future__ import annotations

from dataclasses import dataclass
from importlib import resources
from typing import Any

from redis.asyncio import Redis, RedisCluster
from redis.commands.core import AsyncScript

NAMES = ("acquire", "settle", "leave", "sweep", "reset", "overload")


def source(name: str) -> str:
    lua = resources.files("limiterd.shared") / "lua"
    return (lua / "common.lua").read_text() + "\n" + (lua / f"{name}.lua").read_text()


@dataclass(frozen=True, slots=True)
class Scripts:
    acquire: AsyncScript
    settle: AsyncScript
    leave: AsyncScript
    sweep: AsyncScript
    reset: AsyncScript
    overload: AsyncScript

    def all(self) -> tuple[AsyncScript, ...]:
        return tuple(getattr(self, n) for n in NAMES)

    @classmethod
    def register(cls, client: Redis | RedisCluster) -> Scripts:
        return cls(*(client.register_script(source(n)) for n in NAMES))


def text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
