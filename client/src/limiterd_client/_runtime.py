"""One implementation for the async and the sync client.

The client's logic (reserve, settle, keep alive, retry, fall back) is written once, as
coroutines. The async client awaits them on its event loop. The sync client runs the very
same coroutines with `run_sync`: there every await reaches a blocking call (a sync gRPC stub,
time.sleep, a sync callback) that never suspends, so each coroutine finishes in one step with
no event loop. What differs between the two lives here: how to call the daemon, how to sleep,
how to run a background job (a task or a thread).
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import threading
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Iterator
from typing import Any, Protocol, TypeVar

import grpc
import grpc.aio

from ._core import log

T = TypeVar("T")
Sleep = Callable[[float], Awaitable[None]]
JobFn = Callable[[Sleep], Coroutine[Any, Any, None]]

SUSPENDED = ("the sync client reached an await that suspends: give SyncLimiter and the sync "
             "adapters plain (non-async) callbacks, or use Limiter / AsyncAnthropicAdapter "
             "in async code")


def run_sync(aw: Awaitable[T]) -> T:
    """Run a coroutine that never suspends to its end, without an event loop."""
    it = aw.__await__()
    try:
        next(it)
    except StopIteration as done:
        return done.value  # type: ignore[no-any-return]
    close = getattr(it, "close", None)
    if close is not None:
        close()
    raise RuntimeError(SUSPENDED)


def iterate_sync(agen: AsyncIterator[T]) -> Iterator[T]:
    """An async generator that never suspends, as a plain iterator (closed with it)."""
    try:
        while True:
            try:
                item = run_sync(agen.__anext__())
            except StopAsyncIteration:
                return
            yield item
    finally:
        aclose = getattr(agen, "aclose", None)
        if aclose is not None:
            run_sync(aclose())


async def maybe_await(value: Any) -> Any:
    """Await what an async API returns; take what a sync API returns as it is. This lets
    one piece of code drive both (the sync faces run it without an event loop)."""
    return await value if inspect.isawaitable(value) else value


async def each(items: Any) -> AsyncIterator[Any]:
    """Iterate an async or a sync iterable with `async for`."""
    if hasattr(items, "__aiter__"):
        async for item in items:
            yield item
    else:
        for item in items:
            yield item


class RpcStream(Protocol):
    def cancel(self) -> Any: ...
    def __aiter__(self) -> AsyncIterator[Any]: ...


class Job(Protocol):
    def done(self) -> bool: ...
    async def stop(self) -> None: ...
    async def join(self, timeout: float | None) -> None: ...


class Runtime(Protocol):
    """How the shared logic calls the daemon, sleeps and runs background jobs."""

    sync: bool

    async def unary(self, method: str, request: Any, timeout: float,
                    wait_for_ready: bool = False) -> Any: ...
    def stream(self, method: str, request: Any, timeout: float) -> RpcStream: ...
    async def sleep(self, seconds: float) -> None: ...
    def start(self, job: JobFn, name: str) -> Job: ...
    def fire(self, method: str, request: Any, timeout: float) -> None: ...
    async def shielded(self, aw: Awaitable[T]) -> T: ...
    async def close_channel(self) -> None: ...


class _Task:
    def __init__(self, task: asyncio.Task[None]) -> None:
        self.task = task

    def done(self) -> bool:
        return self.task.done()

    async def stop(self) -> None:
        self.task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self.task

    async def join(self, timeout: float | None) -> None:
        if not self.task.done():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(self.task), timeout)


class AsyncRuntime:
    sync = False

    def __init__(self, channel: grpc.aio.Channel, stub: Any,
                 sleep: Callable[[float], Awaitable[None]]) -> None:
        self.channel, self.stub, self._sleep = channel, stub, sleep
        self._fired: set[asyncio.Task[None]] = set()

    async def unary(self, method: str, request: Any, timeout: float,
                    wait_for_ready: bool = False) -> Any:
        rpc = getattr(self.stub, method)
        if wait_for_ready:
            return await rpc(request, timeout=timeout, wait_for_ready=True)
        return await rpc(request, timeout=timeout)

    def stream(self, method: str, request: Any, timeout: float) -> RpcStream:
        return getattr(self.stub, method)(request, timeout=timeout)  # type: ignore[no-any-return]

    async def sleep(self, seconds: float) -> None:
        await self._sleep(seconds)

    def start(self, job: JobFn, name: str) -> Job:
        return _Task(asyncio.get_running_loop().create_task(job(self._sleep), name=name))

    def fire(self, method: str, request: Any, timeout: float) -> None:
        """Send a call nobody waits for (its failure is only logged)."""
        task = asyncio.get_running_loop().create_task(self._quietly(method, request, timeout))
        self._fired.add(task)
        task.add_done_callback(self._fired.discard)

    async def _quietly(self, method: str, request: Any, timeout: float) -> None:
        try:
            await getattr(self.stub, method)(request, timeout=timeout)
        except grpc.RpcError as e:
            log.debug("%s failed: %s", method, e)

    async def shielded(self, aw: Awaitable[T]) -> T:
        return await asyncio.shield(aw)

    async def close_channel(self) -> None:
        await self.channel.close()


class _Stopped(Exception):
    """Raised inside a sync background job's sleep when the job is stopped."""


class _Thread:
    def __init__(self, job: JobFn, name: str) -> None:
        self._stop = threading.Event()
        self.thread = threading.Thread(target=self._run, args=(job,), name=name, daemon=True)
        self.thread.start()

    async def _sleep(self, seconds: float) -> None:
        if self._stop.wait(seconds):
            raise _Stopped

    def _run(self, job: JobFn) -> None:
        try:
            run_sync(job(self._sleep))
        except _Stopped:
            pass
        except Exception:  # a background job must never die silently
            log.exception("background job %s failed", self.thread.name)

    def done(self) -> bool:
        return not self.thread.is_alive()

    async def stop(self) -> None:
        self._stop.set()
        if self.thread is not threading.current_thread():
            self.thread.join()

    async def join(self, timeout: float | None) -> None:
        self.thread.join(timeout)


class _BlockingStream:
    """A sync server-streaming call, iterated with `async for` (each step blocks)."""

    def __init__(self, call: Any) -> None:
        self._call = call

    def cancel(self) -> Any:
        return self._call.cancel()

    def __aiter__(self) -> AsyncIterator[Any]:
        return self._events()

    async def _events(self) -> AsyncIterator[Any]:
        for ev in self._call:
            yield ev


class SyncRuntime:
    sync = True

    def __init__(self, channel: grpc.Channel, stub: Any, sleep: Callable[[float], None]) -> None:
        self.channel, self.stub, self._sleep = channel, stub, sleep

    async def unary(self, method: str, request: Any, timeout: float,
                    wait_for_ready: bool = False) -> Any:
        rpc = getattr(self.stub, method)
        if wait_for_ready:
            return rpc(request, timeout=timeout, wait_for_ready=True)
        return rpc(request, timeout=timeout)

    def stream(self, method: str, request: Any, timeout: float) -> RpcStream:
        return _BlockingStream(getattr(self.stub, method)(request, timeout=timeout))

    async def sleep(self, seconds: float) -> None:
        self._sleep(seconds)

    def start(self, job: JobFn, name: str) -> Job:
        return _Thread(job, name)

    def fire(self, method: str, request: Any, timeout: float) -> None:
        """Send a call nobody waits for (grpc's own threads carry it; a failure is logged)."""
        future = getattr(self.stub, method).future(request, timeout=timeout)
        future.add_done_callback(
            lambda f: log.debug("%s failed: %s", method, f.exception()) if f.exception()
            else None)

    async def shielded(self, aw: Awaitable[T]) -> T:
        return await aw  # nothing can cancel a blocking call half way

    async def close_channel(self) -> None:
        self.channel.close()
