"""``/metrics`` for Prometheus, readable with ``UVM_METRICS_TOKEN`` or from ``UVM_METRICS_ALLOW``;
and the request-latency middleware that feeds ``uvm_http_request_seconds``."""

from __future__ import annotations

import hmac
import time
from collections.abc import Awaitable, Callable

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from server.web import appkeys as K
from server.web.addresses import client_address, in_networks

STARTED = web.RequestKey("uvm_started", float)
TIMED = web.RequestKey("uvm_timed", bool)  # a websocket, timed when it was set up
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def _allowed(request: web.Request) -> bool:
    config = request.app[K.config]
    scheme, _, token = request.headers.get("Authorization", "").partition(" ")
    if config.metrics_token and scheme.lower() == "bearer":
        return hmac.compare_digest(token.strip().encode(), config.metrics_token.encode())
    return in_networks(client_address(request), config.metrics_allow)


async def metrics(request: web.Request) -> web.Response:
    """The Prometheus text exposition of this process's registry, gauges read fresh."""
    if not _allowed(request):
        raise web.HTTPForbidden(
            text="/metrics: send Authorization: Bearer UVM_METRICS_TOKEN, or scrape from an address in "
            "UVM_METRICS_ALLOW",
        )
    dispatcher = request.app[K.dispatcher]
    await dispatcher.metrics.refresh(dispatcher)
    return web.Response(
        body=generate_latest(dispatcher.metrics.registry), headers={"Content-Type": CONTENT_TYPE_LATEST}
    )


@web.middleware
async def latency_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Time every HTTP request by its route pattern (``/api/jobs/{job_id}``, never the raw path, so
    the series stay few); websockets are timed until they are set up, not for their whole life."""
    request[STARTED] = time.perf_counter()
    status = 500
    try:
        response = await handler(request)
        status = response.status
        return response
    except web.HTTPException as exc:
        status = exc.status
        raise
    finally:
        if not request.get(TIMED):
            _observe(request, status)


def websocket_opened(request: web.Request) -> None:
    """A websocket is set up (101): its latency is counted now, not when it closes hours later."""
    if STARTED in request and not request.get(TIMED):
        _observe(request, 101)
        request[TIMED] = True


def _observe(request: web.Request, status: int) -> None:
    info = request.match_info
    route = info.route.resource.canonical if info.route.resource is not None else "unmatched"
    if K.dispatcher in request.app:
        elapsed = time.perf_counter() - request[STARTED]
        request.app[K.dispatcher].metrics.requests.labels(request.method, route, str(status)).observe(elapsed)


def add_routes(app: web.Application) -> None:
    app.router.add_get("/metrics", metrics)
