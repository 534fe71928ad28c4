"""Every other route (count_tokens, models, batches, files, ...): proxied unchanged, streamed
both ways, never counted against the per-minute buckets."""

from __future__ import annotations

import aiohttp
from aiohttp import web

from limiterd.gateway.downstream import ClientGone, Downstream
from limiterd.gateway.metrics import GatewayMetrics, route_of, status_class
from limiterd.gateway.wire import forward_headers


class Proxy:
    def __init__(self, upstream: str, session: aiohttp.ClientSession,
                 metrics: GatewayMetrics) -> None:
        self.base = upstream.rstrip("/")
        self.session = session
        self.metrics = metrics

    async def handle(self, request: web.Request) -> web.StreamResponse:
        route = route_of(request.path)
        self.metrics.requests.labels(route, "other").inc()
        down = Downstream(request)
        body = request.content if request.body_exists else None
        try:
            async with self.session.request(
                    request.method, self.base + request.raw_path, data=body,
                    headers=forward_headers(request.headers.items(), same_body=True),
                    allow_redirects=False) as upstream:
                self.metrics.upstream.labels(route, "other", status_class(upstream.status)).inc()
                await down.start(upstream.status,
                                 forward_headers(upstream.headers.items(), same_body=True))
                async for chunk in upstream.content.iter_any():
                    await down.write(chunk)
                await down.finish()
        except ClientGone:
            pass
        except (aiohttp.ClientError, TimeoutError) as e:
            self.metrics.upstream.labels(route, "other", "error").inc()
            if not down.started:
                return await down.error(502, "api_error", f"upstream: {type(e).__name__}")
            # Mid-body: all we can do is cut the answer short, as the upstream did.
            if request.transport is not None:
                request.transport.close()
        assert down.response is not None
        return down.response
