"""What a logical call went through, as events an app can log or show its user, and
OpenTelemetry spans when `opentelemetry` is installed (never required)."""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from typing import Any, Literal

from .wait import WaitUpdate

EventKind = Literal["retry", "fallback", "give_up", "limiter_wait"]


@dataclass(frozen=True)
class CallEvent:
    """One thing that happened to a call.

    retry: `model` failed (`reason`, `error`) and is tried again after `delay_s`;
    fallback: left `model` for `to_model` (`reason`: overloaded, rate_limited, limiter_wait,
    too_large, timeout, exhausted, overloaded_hint); give_up: the call ends with `error`,
    `reason` saying why; limiter_wait: queued at the daemon (`wait`: position, estimate).
    """

    kind: EventKind
    model: str
    attempt: int  # attempts made so far in this call (all models)
    reason: str = ""
    delay_s: float | None = None
    to_model: str | None = None
    error: BaseException | None = None
    wait: WaitUpdate | None = None


OnEvent = Callable[[CallEvent], "None | Awaitable[None]"]


async def emit(on_event: OnEvent | None, span: Any, event: CallEvent) -> None:
    if span is not None:
        attrs = {k: v for k, v in (("model", event.model), ("attempt", event.attempt),
                                   ("reason", event.reason), ("to_model", event.to_model),
                                   ("delay_s", event.delay_s)) if v is not None and v != ""}
        if event.wait is not None:
            attrs.update(position=event.wait.position,
                         estimated_wait_s=event.wait.estimated_wait_s)
        span.add_event(f"limiterd.{event.kind}", attrs)
    if on_event is not None:
        done = on_event(event)
        if inspect.isawaitable(done):
            await done


def _otel() -> Any:
    try:
        from opentelemetry import trace
    except ImportError:  # optional: no spans without it
        return None
    return trace


@contextlib.contextmanager
def call_span(model: str, streamed: bool) -> Iterator[Any]:
    """A span around one logical call (all its attempts), or None without opentelemetry.
    Not made the current span: a stream's generator may be resumed from other contexts."""
    trace = _otel()
    if trace is None:
        yield None
        return
    span = trace.get_tracer("limiterd_client").start_span(
        "limiterd.call", attributes={"limiterd.model.requested": model,
                                     "limiterd.streamed": streamed})
    try:
        yield span
    except BaseException as e:
        span.record_exception(e)
        span.set_status(trace.Status(trace.StatusCode.ERROR, type(e).__name__))
        raise
    finally:
        span.end()
