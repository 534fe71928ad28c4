"""Calls that arrive together share a round trip to Redis (as the local engine group-commits).

Every command queued on this sidecar while a pipeline is on its way goes out in the next one:
at low load a call waits for nobody, under load one round trip carries many calls. Scripts are
sent by hash (EVALSHA); if Redis forgot them (a restart, SCRIPT FLUSH) they are loaded again
and the calls that met NOSCRIPT are sent once more, which is safe because every script is
idempotent for the same arguments.
"""

from __future__ import annotations

import asyncio
from typing import Any

from redis import exceptions as rx
from redis.asyncio import Redis, RedisCluster

from limiterd.shared.scripts import Scripts

Command = tuple[Any, ...]


class Batcher:
    def __init__(self, client: Redis | RedisCluster, scripts: Scripts) -> None:
        self.client = client
        self.scripts = scripts
        self._queue: list[tuple[list[Command], asyncio.Future[list[Any]]]] = []
        self._flushing = False

    async def run(self, commands: list[Command]) -> list[Any]:
        """The replies to `commands`, sent in order in one pipeline (with other callers').
        A command's own error comes back as the exception in its place; a connection
        failure raises."""
        fut: asyncio.Future[list[Any]] = asyncio.get_running_loop().create_future()
        self._queue.append((commands, fut))
        if not self._flushing:
            self._flushing = True
            asyncio.ensure_future(self._flush())
        return await fut

    async def _flush(self) -> None:
        try:
            while self._queue:
                batch, self._queue = self._queue, []
                try:
                    replies = await self._send([c for cmds, _ in batch for c in cmds])
                except BaseException as exc:  # noqa: BLE001 - every caller hears of it
                    for _, fut in batch:
                        if not fut.done():
                            fut.set_exception(exc)
                    if isinstance(exc, asyncio.CancelledError):
                        raise
                    continue
                i = 0
                for cmds, fut in batch:
                    if not fut.done():
                        fut.set_result(replies[i:i + len(cmds)])
                    i += len(cmds)
        finally:
            self._flushing = False

    async def _send(self, commands: list[Command]) -> list[Any]:
        replies = await self._pipeline(commands)
        missing = [i for i, r in enumerate(replies) if isinstance(r, rx.NoScriptError)]
        if missing:
            for script in self.scripts.all():
                await self.client.script_load(script.script)
            again = await self._pipeline([commands[i] for i in missing])
            for i, r in zip(missing, again, strict=True):
                replies[i] = r
        return replies

    async def _pipeline(self, commands: list[Command]) -> list[Any]:
        async with self.client.pipeline(transaction=False) as pipe:
            for c in commands:
                pipe.execute_command(*c)
            return list(await pipe.execute(raise_on_error=False))
