"""POST /v1/messages: validate, reserve with limiterd, forward, pass the answer back, report.

One request may make several attempts when its model's policy asks for it: a 429 or 529
is retried (Retry-After honored, bounded) and then the fallback chain is walked, but only
while nothing of an answer has reached the caller. Every attempt has its own reservation
and is reported on its own, so one 429 pauses every caller of the scope x model. Without a
policy there is exactly one attempt and the provider's answer passes through unchanged.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import aiohttp
from aiohttp import web

from limiterd.gateway.call import BadRequest, Call, read_call
from limiterd.gateway.config import GatewayConfig, ModelPolicy
from limiterd.gateway.downstream import SSE_HEADERS, ClientGone, Downstream
from limiterd.gateway.metrics import GatewayMetrics, status_class
from limiterd.gateway.wire import (
    PING_EVENT,
    SseTap,
    error_event,
    forward_headers,
    json_usage,
)
from limiterd_client import (
    Limiter,
    LimiterBusy,
    LimiterInvalidArgument,
    LimiterRejected,
    LimiterUnavailable,
    ProviderError,
    ProviderMeta,
    Reservation,
    Usage,
    classify_http,
    connection_error,
    estimate_chars,
)
from limiterd_client.errors import reported_headers
from limiterd_client.proto.limiter.v1 import limiter_pb2 as pb

log = logging.getLogger("limiterd.gateway")

PROVIDER = "anthropic"
REFUSED = (429, 529)
_COUNT_KEYS = ("model", "messages", "system", "tools", "tool_choice", "thinking")


@dataclass(frozen=True)
class Attempt:
    """What one upstream attempt ended as, when it did not reach the caller."""

    status: int
    headers: tuple[tuple[str, str], ...]
    body: bytes
    error: ProviderError


class Messages:
    def __init__(self, cfg: GatewayConfig, limiter: Limiter, session: aiohttp.ClientSession,
                 metrics: GatewayMetrics, clock: Callable[[], float],
                 wall: Callable[[], float]) -> None:
        self.cfg, self.limiter, self.session = cfg, limiter, session
        self.metrics = metrics
        self.clock, self.wall = clock, wall  # monotonic (waits), unix (HTTP retry dates)
        self.base = cfg.upstream.rstrip("/")
        self._settling: set[asyncio.Future[object]] = set()

    async def _settle(self, report: Awaitable[object]) -> None:
        """Report even if the caller hangs up meanwhile: aiohttp then cancels the handler, and
        a Report cut off mid-call would leave the reservation open until its lease lapsed.
        Reports still on their way at shutdown are waited for (`drain`)."""
        task = asyncio.ensure_future(report)
        self._settling.add(task)
        task.add_done_callback(self._settling.discard)
        await asyncio.shield(task)

    async def drain(self, timeout: float) -> None:
        """Wait (at most `timeout` s) for the Reports still on their way."""
        if self._settling:
            await asyncio.wait(set(self._settling), timeout=timeout)

    async def handle(self, request: web.Request) -> web.StreamResponse:
        down = Downstream(request)
        self.metrics.in_flight.inc()
        try:
            try:
                call = await read_call(request, self.cfg)
            except BadRequest as e:
                self.metrics.requests.labels("messages", "other").inc()
                self.metrics.answers.labels("bad_request").inc()
                return await down.error(400, "invalid_request_error", str(e))
            except PermissionError as e:
                self.metrics.requests.labels("messages", "other").inc()
                self.metrics.answers.labels("no_key").inc()
                return await down.error(401, "authentication_error", str(e))
            self.metrics.requests.labels("messages", self.metrics.model(call.model)).inc()
            return await self._serve(call, down)
        except ClientGone:
            assert down.response is not None
            return down.response
        finally:
            self.metrics.in_flight.dec()

    async def _serve(self, call: Call, down: Downstream) -> web.StreamResponse:
        estimated = await self._estimate(call)
        chain = (call.model, *self.cfg.policy(call.model).fallback)
        last: Attempt | None = None
        why: list[str] = []
        retried = 0
        for i, model in enumerate(chain):
            this = call if i == 0 else call.for_model(model, self.cfg.policy(model).max_tokens)
            policy = self.cfg.policy(model)
            for attempt in range(policy.retries + 1):
                down.extra = _our_headers(model, why, retried)
                reservation = self.limiter.reserve(
                    call.scope, model, input_tokens=estimated, user=call.user,
                    max_output_tokens=this.max_tokens, max_wait=call.max_wait_s,
                    on_wait=_quiet if self._pings(call) else None,
                    marks_sent=True)  # _attempt marks just before the upstream post
                try:
                    r = await self._acquire(reservation, this, down)
                except LimiterBusy as e:
                    return await self._refused_wait(down, model, call.max_wait_s, e)
                except LimiterInvalidArgument as e:
                    self._wait_result(model, "invalid")
                    return await down.error(400, "invalid_request_error", f"limiterd: {e}")
                except LimiterRejected as e:
                    self._wait_result(model, "rejected")
                    return await down.error(400, "invalid_request_error", f"limiterd: {e}")
                except LimiterUnavailable as e:
                    self._wait_result(model, "unavailable")
                    self.metrics.answers.labels("limiter_unavailable").inc()
                    return await down.error(503, "api_error", f"limiterd unavailable: {e}")
                last = await self._attempt(r, this, estimated, down)
                if last is None:
                    assert down.response is not None
                    return down.response
                delay = self._retry_delay(last, policy, attempt)
                if delay is None:
                    break
                self.metrics.retries.labels(self.metrics.model(model), str(last.status)).inc()
                retried += 1
                await asyncio.sleep(delay)
            assert last is not None
            why.append(f"{model}: {last.error.code or last.status} ({last.status})")
            if i + 1 < len(chain):
                self.metrics.fallbacks.labels(self.metrics.model(model),
                                              status_class(last.status)).inc()
        assert last is not None
        return await self._pass_refusal(down, last)

    def _pings(self, call: Call) -> bool:
        return call.stream and self.cfg.stream_keepalive_after_s > 0

    def _retry_delay(self, last: Attempt, policy: ModelPolicy, attempt: int) -> float | None:
        """Seconds to wait before retrying this model, or None to stop retrying it."""
        if last.status not in REFUSED or attempt >= policy.retries:
            return None
        if not last.error.retryable:
            return None
        after = (last.error.retry_after_ms or 0) / 1000
        if after > policy.max_retry_after_s:
            return None
        return float(after or min(0.25 * 2 ** attempt, policy.max_retry_after_s))

    def _wait_result(self, model: str, result: str) -> None:
        self.metrics.waits.labels(self.metrics.model(model), result).inc()

    async def _estimate(self, call: Call) -> int:
        if self.cfg.estimate == "count_tokens":
            url = call.url(self.base, "/v1/messages/count_tokens")
            doc = {k: call.body[k] for k in _COUNT_KEYS if k in call.body}
            try:
                async with self.session.post(url, data=json.dumps(doc).encode(),
                                             headers=call.headers) as resp:
                    if resp.status == 200:
                        count = (await resp.json()).get("input_tokens")
                        if isinstance(count, int) and count >= 0:
                            return count
            except (aiohttp.ClientError, TimeoutError, ValueError) as e:
                log.warning("count_tokens failed, estimating from characters: %s",
                            type(e).__name__)
        return estimate_chars(call.body)

    async def _acquire(self, reservation: Reservation, call: Call, down: Downstream
                       ) -> Reservation:
        """Wait for the grant. A stream that waits longer than stream_keepalive_after_s is
        answered 200 at once and kept alive with `ping` events until then."""
        started = self.clock()
        model = self.metrics.model(call.model)
        enter = asyncio.ensure_future(reservation.__aenter__())
        try:
            if self._pings(call):
                timeout = self.cfg.stream_keepalive_after_s
                while not (await asyncio.wait({enter}, timeout=timeout))[0]:
                    if not down.started:
                        await down.start(200, SSE_HEADERS)
                    await down.write(PING_EVENT)
                    timeout = self.cfg.ping_interval_s
            r = await enter
        except BaseException as e:
            if not enter.done():
                enter.cancel()
                await asyncio.gather(enter, return_exceptions=True)
            elif not enter.cancelled() and enter.exception() is None:
                # granted just as the caller left: give it back (never called -> Release)
                await self._settle(reservation.__aexit__(type(e), e, e.__traceback__))
            if isinstance(e, ClientGone | asyncio.CancelledError):
                self._wait_result(call.model, "client_gone")
            raise
        self.metrics.wait_seconds.labels(model).observe(self.clock() - started)
        self._wait_result(call.model, "granted")
        return r

    async def _refused_wait(self, down: Downstream, model: str, max_wait_s: float,
                            e: LimiterBusy) -> web.StreamResponse:
        self._wait_result(model, "timed_out")
        self.metrics.answers.labels("no_capacity").inc()
        retry_s = max(1, math.ceil((e.retry_after_ms or 1000) / 1000))
        return await down.error(
            429, "rate_limit_error",
            f"limiterd: no capacity for {model} within {max_wait_s:g} s",
            headers=[("retry-after", str(retry_s))])

    async def _attempt(self, r: Reservation, call: Call, estimated: int, down: Downstream
                       ) -> Attempt | None:
        """One upstream call under reservation `r`, which it always settles. Returns None when
        the answer went to the caller, or the refused attempt (429/529) to retry or pass on."""
        label = self.metrics.model(call.model)
        try:
            r.mark_called(sent=False)  # marked when the headers go out (marks_on_send)
            try:
                upstream_cm = self.session.post(call.url(self.base), data=call.raw,
                                                headers=call.headers,
                                                trace_request_ctx={"sent": r.mark_sent})
                upstream = await upstream_cm.__aenter__()
            except (aiohttp.ClientError, TimeoutError) as e:
                self.metrics.upstream.labels("messages", label, "error").inc()
                await self._settle(r.report_error(connection_error(PROVIDER, type(e).__name__,
                                                      usage=Usage(0, 0))))
                await down.error(502, "api_error", f"upstream unreachable: {type(e).__name__}")
                return None
            try:
                return await self._answer(r, call, estimated, down, upstream)
            finally:
                await upstream_cm.__aexit__(None, None, None)
        except BaseException as e:
            if not r.settled:
                # Cancelled (the caller hung up) or a bug: the reservation settles as the
                # client library does for an exception after the call started.
                await self._settle(r.__aexit__(type(e), e, e.__traceback__))
            raise

    async def _answer(self, r: Reservation, call: Call, estimated: int, down: Downstream,
                      upstream: aiohttp.ClientResponse) -> Attempt | None:
        label = self.metrics.model(call.model)
        status = upstream.status
        self.metrics.upstream.labels("messages", label, status_class(status)).inc()
        headers = tuple(forward_headers(upstream.headers.items()))
        meta = ProviderMeta(http_status=status, request_id=upstream.headers.get("request-id", ""),
                            headers=reported_headers(upstream.headers))
        streamed = upstream.content_type == "text/event-stream"
        if status == 200 and streamed:
            await self._stream(r, call, estimated, down, upstream, headers, meta)
            return None
        try:
            body = await upstream.read()
        except (aiohttp.ClientError, TimeoutError) as e:
            await self._settle(r.report_error(connection_error(PROVIDER, type(e).__name__,
                                                  usage=Usage(estimated, 0))))
            await down.error(502, "api_error", f"upstream broke: {type(e).__name__}")
            return None
        if status == 200:
            usage = json_usage(body) or Usage(estimated, call.max_tokens)
            try:  # the answer first, the Report after: it adds nothing to the caller's wait
                await self._send(down, status, headers, body)
            finally:  # (the work was done even if the caller has gone meanwhile)
                await self._settle(r.report(usage.input_tokens, usage.output_tokens,
                                       provider=meta))
            return None
        err = _http_error(status, upstream.headers, body, self.wall())
        err.usage = Usage(0, 0)  # a refused or failed answer consumed nothing
        await self._settle(r.report_error(err))
        attempt = Attempt(status, headers, body, err)
        if status in REFUSED:
            return attempt
        await self._pass_refusal(down, attempt)
        return None

    async def _send(self, down: Downstream, status: int, headers: tuple[tuple[str, str], ...],
                    body: bytes) -> None:
        if down.started:  # keep-alive pings went out: the answer becomes stream events
            await down.write(body if status == 200 else error_event(body))
            await down.finish()
            return
        await down.whole(status, headers, body)

    async def _pass_refusal(self, down: Downstream, last: Attempt) -> web.StreamResponse:
        await self._send(down, last.status, last.headers, last.body)
        assert down.response is not None
        return down.response

    async def _stream(self, r: Reservation, call: Call, estimated: int, down: Downstream,
                      upstream: aiohttp.ClientResponse, headers: tuple[tuple[str, str], ...],
                      meta: ProviderMeta) -> None:
        """Pass the event stream through chunk by chunk, watching it for usage."""
        label = self.metrics.model(call.model)
        tap = SseTap()
        if not down.started:
            await down.start(200, headers)
        chunks = upstream.content.iter_any().__aiter__()
        end = "complete"
        try:
            while True:
                try:
                    chunk = await chunks.__anext__()
                except StopAsyncIteration:
                    break
                except (aiohttp.ClientError, TimeoutError) as e:
                    end = "upstream_broke"
                    await self._upstream_broke(r, down, tap, estimated, e)
                    return
                tap.feed(chunk)
                await down.write(chunk)
                self.metrics.stream_bytes.labels(label).inc(len(chunk))
            await down.finish()
            if tap.error is not None:
                end = "error_event"
                err = classify_http(provider=PROVIDER, status=200,
                                    headers=upstream.headers, code=tap.error.kind,
                                    message=tap.error.message, now=self.wall())
                err.usage = tap.usage(estimated)
                await self._settle(r.report_error(err))
            elif not tap.finished:
                end = "upstream_broke"  # ended cleanly but without message_stop
                await self._settle(r.report_error(connection_error(PROVIDER, "stream ended early",
                                                      usage=tap.usage(estimated))))
            else:
                usage = tap.usage(estimated)
                await self._settle(r.report(usage.input_tokens, usage.output_tokens, provider=meta))
        except (ClientGone, asyncio.CancelledError):
            # A caller that leaves once message_stop has passed got the whole answer.
            whole = down.finished or tap.finished
            end = "complete" if whole else "client_gone"
            usage = tap.usage(estimated)
            if not r.settled:  # (the hang-up may come while the OK report is on its way)
                await self._settle(r.report(usage.input_tokens, usage.output_tokens,
                                       outcome=pb.OK if whole else pb.CANCELLED,
                                       provider=meta))
            raise
        finally:
            self.metrics.stream_ends.labels(label, end).inc()

    async def _upstream_broke(self, r: Reservation, down: Downstream, tap: SseTap,
                              estimated: int, e: BaseException) -> None:
        """The provider's connection broke mid-stream: the caller gets the provider's own
        `error` event (as the API sends for a failure mid-stream), the attempt is reported
        as an error with the usage seen so far."""
        usage = tap.usage(estimated)
        await self._settle(r.report_error(connection_error(
            PROVIDER, f"stream broke: {type(e).__name__}", usage=usage)))
        await down.write(error_event(json.dumps({
            "type": "error",
            "error": {"type": "api_error",
                      "message": f"upstream connection broke mid-stream ({type(e).__name__})"},
        }).encode()))
        await down.finish()


def _our_headers(model: str, why: list[str], retried: int) -> list[tuple[str, str]]:
    """What the gateway tells the caller about its own retries and fallbacks (nothing when
    it made none): the model that served, why each earlier one was left, retries made."""
    headers = []
    if why:
        headers += [("x-limiterd-served-by", model), ("x-limiterd-fallback", "; ".join(why))]
    if retried:
        headers.append(("x-limiterd-retries", str(retried)))
    return headers


def _quiet(_update: object) -> None:
    """Asks for AcquireStream, whose cancellation also gives up the place in the queue."""


def _http_error(status: int, headers: Any, body: bytes, now: float) -> ProviderError:
    code = message = None
    try:
        doc = json.loads(body)
        err = doc.get("error") if isinstance(doc, dict) else None
        if isinstance(err, dict):
            code, message = err.get("type"), err.get("message")
    except ValueError:
        pass
    return classify_http(provider=PROVIDER, status=status, headers=dict(headers),
                         code=code if isinstance(code, str) else None,
                         message=message if isinstance(message, str) else "", now=now)


def marks_on_send() -> aiohttp.TraceConfig:
    """Calls a request's `trace_request_ctx["sent"]` when its headers go out on the
    connection: after DNS, TCP and TLS, so a cold connection's handshake is not counted as
    the way to the provider (the daemon's refill hold, issue 15), and a request that never
    connects sends no mark."""
    async def sent(_session: aiohttp.ClientSession, ctx: Any,
                   _params: aiohttp.TraceRequestHeadersSentParams) -> None:
        mark = ctx.trace_request_ctx.get("sent") if ctx.trace_request_ctx else None
        if mark is not None:
            mark()

    config = aiohttp.TraceConfig()
    config.on_request_headers_sent.append(sent)
    return config
