"""gRPC servicers: map protobuf to engine calls and domain failures to statuses. No logic."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any, Protocol, TypeVar

import grpc

from limiterd.api import convert
from limiterd.api.errors import RpcFailure, exhausted, to_failure
from limiterd.api.provider_headers import provider_limits
from limiterd.backend import Backend
from limiterd.engine import StatusCallback, WaitStatus
from limiterd.errorlog import ErrorEntry, ErrorLog
from limiterd.ledger.errors import InvalidRequest
from limiterd.ledger.ledger import Rejected
from limiterd.views import AmbiguousScope, lease_order
from limiterd_client.proto.limiter.v1 import limiter_pb2 as pb
from limiterd_client.proto.limiter.v1 import limiter_pb2_grpc as pb_grpc

T = TypeVar("T")
Context = grpc.aio.ServicerContext[Any, Any]

# Leave this much of the caller's gRPC deadline for the answer to travel back, so a grant is
# never made that the caller can only hear of after it gave up.
DEADLINE_MARGIN_S = 0.02


class Observer(Protocol):
    """What the servicers tell metrics beyond what the interceptor sees (limiterd.metrics)."""

    def observe_provider_failure(self, model: str, http_status: int) -> None: ...


async def answer(context: Context, call: Callable[[], Awaitable[T]]) -> T:
    """Run `call`; turn any failure into a status (the daemon never crashes on input)."""
    try:
        return await call()
    except Exception as exc:  # noqa: BLE001 - every failure becomes a status
        failure = to_failure(exc)
    await context.abort(failure.code, failure.message, failure.trailing)
    raise AssertionError("unreachable")  # abort() raises


class LimiterService(pb_grpc.LimiterServicer):  # type: ignore[misc]
    def __init__(self, engine: Backend, observer: Observer | None = None,
                 errors: ErrorLog | None = None) -> None:
        self.engine = engine
        self.observer = observer
        self.errors = errors

    async def _acquire(
        self,
        request: pb.AcquireRequest,
        context: Context,
        on_status: StatusCallback | None = None,
    ) -> pb.AcquireResponse:
        engine = self.engine
        req, max_wait_s = convert.acquire_request(request, engine.config.settings)
        remaining = context.time_remaining()
        if remaining is not None:
            max_wait_s = max(0.0, min(max_wait_s, remaining - DEADLINE_MARGIN_S))
        result = await engine.acquire(req, max_wait_s, on_status)
        if isinstance(result, Rejected):
            raise exhausted(
                f"no capacity for model {req.model!r} within {round(max_wait_s * 1000)} ms",
                result.retry_after_s,
            )
        response = convert.acquire_response(result.reservation, result.replayed,
                                            result.mark_sent)
        overloaded = engine.overloaded_until(result.reservation.buckets[0].budget)
        if overloaded:
            response.model_overloaded = True
            response.overloaded_until_ms = convert.ms(overloaded)
        return response

    async def Acquire(
        self, request: pb.AcquireRequest, context: Context
    ) -> pb.AcquireResponse:
        return await answer(context, lambda: self._acquire(request, context))

    async def AcquireStream(
        self, request: pb.AcquireRequest, context: Context
    ) -> None:
        async def on_status(status: WaitStatus) -> None:
            await context.write(pb.AcquireEvent(queued=pb.Queued(
                position=status.position,
                estimated_wait_ms=convert.ms(status.estimated_wait_s),
                queue_depth=status.queue_depth,
                waited_ms=convert.ms(status.waited_s),
                model_overloaded=status.model_overloaded,
            )))

        async def call() -> None:
            granted = await self._acquire(request, context, on_status)
            await context.write(pb.AcquireEvent(granted=granted))

        await answer(context, call)

    async def Report(
        self, request: pb.ReportRequest, context: Context
    ) -> pb.ReportResponse:
        async def call() -> pb.ReportResponse:
            rid, actual_in, actual_out, outcome, retry_after_s = convert.report_request(request)
            told = (provider_limits(request.provider.headers)
                    if request.HasField("provider") else None)
            r, replayed = await self.engine.report(
                rid, actual_in, actual_out, outcome, retry_after_s, told
            )
            if not replayed and request.outcome != pb.OK:
                p = request.provider
                if self.observer is not None:
                    # by the bucket's name (the budget), not the caller's model string
                    self.observer.observe_provider_failure(r.buckets[0].budget if r.buckets
                                                           else r.model, p.http_status)
                if self.errors is not None:
                    self.errors.add(ErrorEntry(
                        self.engine.now(), r.scope, r.model, outcome.name, p.http_status,
                        p.error_type, p.error_code, p.request_id, p.fell_back))
            return pb.ReportResponse(settlement=convert.settlement(r), replayed=replayed)

        return await answer(context, call)

    async def Release(
        self, request: pb.ReleaseRequest, context: Context
    ) -> pb.ReleaseResponse:
        async def call() -> pb.ReleaseResponse:
            r, replayed = await self.engine.release(convert.reservation_id(request.reservation_id))
            return pb.ReleaseResponse(settlement=convert.settlement(r), replayed=replayed)

        return await answer(context, call)

    async def KeepAlive(
        self, request: pb.KeepAliveRequest, context: Context
    ) -> pb.KeepAliveResponse:
        async def call() -> pb.KeepAliveResponse:
            rid = convert.reservation_id(request.reservation_id)
            settings = self.engine.config.settings
            lease_s = (
                convert._ms_to_s("lease_ms", request.lease_ms, settings.max_lease_s)
                if request.lease_ms else None
            )
            r = await self.engine.keep_alive(rid, lease_s)
            return pb.KeepAliveResponse(
                reservation_id=r.id, lease_expires_at_ms=convert.ms(r.expires_at)
            )

        return await answer(context, call)


    async def MarkSent(
        self, request: pb.MarkSentRequest, context: Context
    ) -> pb.MarkSentResponse:
        async def call() -> pb.MarkSentResponse:
            await self.engine.mark_sent(convert.reservation_id(request.reservation_id))
            return pb.MarkSentResponse()

        return await answer(context, call)


class Reloads(Protocol):
    @property
    def source(self) -> str: ...

    def reload(self) -> tuple[bool, str]: ...


class AdminService(pb_grpc.AdminServicer):  # type: ignore[misc]
    def __init__(self, engine: Backend, reloads: Reloads | None = None,
                 errors: ErrorLog | None = None) -> None:
        self.engine = engine
        self.reloads = reloads
        self.errors = errors

    async def ListErrors(
        self, request: pb.ListErrorsRequest, context: Context
    ) -> pb.ListErrorsResponse:
        async def call() -> pb.ListErrorsResponse:
            if not 0 <= request.limit <= 10_000:
                raise InvalidRequest("limit", "must be 0..10000")
            if not 0 <= request.http_status <= 999:
                raise InvalidRequest("http_status", "must be 0..999")
            if request.since_ms < 0:
                raise InvalidRequest("since_ms", "must be >= 0")
            if self.errors is None:
                return pb.ListErrorsResponse()
            rows = self.errors.query(request.model, request.http_status,
                                     request.since_ms / 1000.0, request.limit or 100)
            return pb.ListErrorsResponse(errors=[pb.ProviderErrorEntry(
                at_ms=convert.ms(e.at), scope_alias=self._alias(e.scope) or "other",
                model=e.model, outcome=e.outcome, http_status=e.http_status,
                error_type=e.error_type, error_code=e.error_code,
                provider_request_id=e.provider_request_id, fell_back=e.fell_back,
            ) for e in rows])

        return await answer(context, call)

    async def Reload(
        self, request: pb.ReloadRequest, context: Context
    ) -> pb.ReloadResponse:
        async def call() -> pb.ReloadResponse:
            if self.reloads is None:
                raise RpcFailure(grpc.StatusCode.UNIMPLEMENTED, "this daemon has no config file")
            ok, message = self.reloads.reload()
            return pb.ReloadResponse(ok=ok, message=message, source=self.reloads.source)

        return await answer(context, call)

    def _scopes(self, wanted: str) -> frozenset[str] | None:
        try:
            return self.engine.scopes(wanted)
        except AmbiguousScope as exc:
            raise InvalidRequest("scope", str(exc)) from None

    def _alias(self, scope: str) -> str:
        return self.engine.config.alias_for(scope) or ""

    async def ListLeases(
        self, request: pb.ListLeasesRequest, context: Context
    ) -> pb.ListLeasesResponse:
        async def call() -> pb.ListLeasesResponse:
            size = convert.page_size(request.page_size)
            after = convert.lease_token(request.page_token)
            await self.engine.refresh()
            leases = self.engine.leases(self._scopes(request.scope), request.model, after,
                                        size + 1)
            page = leases[:size]
            more = len(leases) > size
            return pb.ListLeasesResponse(
                leases=[convert.lease(r, self._alias(r.scope)) for r in page],
                next_page_token=convert.encode_token(lease_order(page[-1])) if more else "",
            )

        return await answer(context, call)

    async def ResetBucket(
        self, request: pb.ResetBucketRequest, context: Context
    ) -> pb.ResetBucketResponse:
        async def call() -> pb.ResetBucketResponse:
            for field in ("scope", "model"):
                if not getattr(request, field):
                    raise InvalidRequest(field, "is required")
            views = await self.engine.reset_buckets(
                self._scopes(request.scope), request.model, request.user)
            if not views:
                raise RpcFailure(grpc.StatusCode.NOT_FOUND, (
                    f"no bucket for scope {request.scope!r}, model {request.model!r}"
                    + (f", user {request.user!r}" if request.user else "")
                    + " (idle buckets at full capacity are not kept: nothing to reset)"))
            return pb.ResetBucketResponse(
                buckets=[convert.bucket(v, self._alias(v.key.scope)) for v in views])

        return await answer(context, call)

    async def GetBuckets(
        self, request: pb.GetBucketsRequest, context: Context
    ) -> pb.GetBucketsResponse:
        async def call() -> pb.GetBucketsResponse:
            await self.engine.refresh()
            size = convert.page_size(request.page_size)
            after = convert.bucket_token(request.page_token)
            views = self.engine.buckets(self._scopes(request.scope), request.model, after,
                                        size + 1)
            page = views[:size]
            more = len(views) > size
            return pb.GetBucketsResponse(
                buckets=[convert.bucket(v, self._alias(v.key.scope)) for v in page],
                now_ms=convert.ms(self.engine.now()),
                next_page_token=convert.encode_token(page[-1].key) if more else "",
            )

        return await answer(context, call)


__all__ = ["AdminService", "LimiterService", "RpcFailure"]
