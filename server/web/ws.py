"""Websockets: the volunteers' protocol, and researchers' live job events.

``Origin`` is checked before ``prepare()``: a browser may connect from our own origin or from an
embedding site in ``UVM_ALLOWED_ORIGINS``; clients that send no Origin (scripts) are allowed.

Volunteers are anonymous and may be hostile: each client address may hold at most
``UVM_MAX_CONNECTIONS_PER_ADDRESS`` volunteer sockets, and each socket may send at most
``UVM_MAX_MESSAGES_PER_SECOND`` (a burst of twice that); past either it gets ``error``, then the
socket is closed (1008). Loopback is exempt unless ``UVM_LIMIT_LOOPBACK``. Identity is issued
by the server (``server.jobs.identity``), and a connection leases only what its cap allows.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import re
import time
import weakref

from aiohttp import WSMsgType, web

from server import protocol as P
from server.jobs.dispatch import Misbehaving, VolunteerSocket
from server.jobs.outage import DatabaseAway, is_outage
from server.logs import volunteer_context
from server.store import live
from server.store.storage import NotFound
from server.web import appkeys as K
from server.web.addresses import client_address, is_loopback
from server.web.api import researcher
from server.web.metrics import websocket_opened

logger = logging.getLogger(__name__)
SOCKETS: web.AppKey[weakref.WeakSet[web.WebSocketResponse]] = web.AppKey("sockets")
PER_ADDRESS = web.AppKey("volunteer_sockets_per_address", collections.Counter)
POLICY_VIOLATION = 1008


class RateLimit:
    """A token bucket: ``rate`` messages a second on average, bursts up to twice that."""

    def __init__(self, rate: float) -> None:
        self.rate, self.capacity = rate, 2.0 * rate
        self.tokens, self.at = self.capacity, time.monotonic()

    def take(self) -> bool:
        now = time.monotonic()
        self.tokens = min(self.capacity, self.tokens + (now - self.at) * self.rate)
        self.at = now
        if self.tokens < 1.0:
            return False
        self.tokens -= 1.0
        return True


def origin_allowed(request: web.Request) -> bool:
    origin = request.headers.get("Origin")
    if origin is None:
        return True
    origin = origin.rstrip("/")
    own = f"{request.scheme}://{request.host}"
    return origin == own or origin in request.app[K.config].allowed_origins


async def _open(request: web.Request, heartbeat: float = 30.0) -> web.WebSocketResponse:
    """Accept a websocket; aiohttp pings it after ``heartbeat`` seconds without a message from it,
    and closes it if no pong comes within half that."""
    if not origin_allowed(request):
        raise web.HTTPForbidden(text="websocket origin not allowed")
    ws = web.WebSocketResponse(max_msg_size=request.app[K.config].max_ws_message_bytes, heartbeat=heartbeat)
    await ws.prepare(request)
    websocket_opened(request)
    request.app[SOCKETS].add(ws)
    return ws


async def volunteer_socket(request: web.Request) -> web.WebSocketResponse:
    config = request.app[K.config]
    # A live volunteer sends something at least every UVM_IDLE_HEARTBEAT seconds (its heartbeats):
    # aiohttp pings only the silent ones, so 10,000 idle sockets cost no pings.
    ws = await _open(request, heartbeat=config.idle_heartbeat + config.heartbeat)
    address = client_address(request)
    limited = config.limit_loopback or not is_loopback(address)
    per_address = request.app[PER_ADDRESS]
    per_address[address] += 1
    try:
        if limited and per_address[address] > config.max_connections_per_address:
            why = f"too many connections from your address (at most {config.max_connections_per_address})"
            await _refuse(ws, why)
        else:
            rate = RateLimit(config.max_messages_per_second) if limited else None
            await _volunteer_session(request, ws, address, rate)
    finally:
        per_address[address] -= 1
        if per_address[address] <= 0:
            del per_address[address]
    return ws


async def _refuse(ws: web.WebSocketResponse, why: str) -> None:
    with contextlib.suppress(ConnectionError, RuntimeError):
        await ws.send_str(P.encode(P.Error(why)))
    await ws.close(code=POLICY_VIOLATION, message=why[:120].encode())


async def _volunteer_session(
    request: web.Request, ws: web.WebSocketResponse, address: str, rate: RateLimit | None
) -> None:
    """Read the volunteer's messages until it leaves, floods, or misbehaves."""
    dispatcher = request.app[K.dispatcher]
    sock: VolunteerSocket | None = None

    async def send(msg: object) -> None:
        if not ws.closed:
            await ws.send_str(P.encode(msg))

    try:
        async for raw in ws:
            if rate is not None and not rate.take():
                await _refuse(ws, f"too many messages (at most {rate.rate:g} a second)")
                break
            if raw.type != WSMsgType.TEXT:
                if raw.type == WSMsgType.BINARY:
                    await send(P.Error("send JSON text messages, not binary"))
                continue
            try:
                sock = await _message(request, raw.data, sock, address, send)
            except P.ProtocolError as exc:
                await send(P.Error(str(exc), ref=_type_of(raw.data)))
            except Misbehaving as exc:
                await _refuse(ws, str(exc))
                break
            except Exception as exc:
                if not await _failed(request, ws, exc, send, raw.data):
                    break  # the volunteer left while we answered
    finally:
        if sock is not None:
            await asyncio.shield(dispatcher.leave(sock))


async def _failed(request: web.Request, ws: web.WebSocketResponse, exc: Exception, send, data: str) -> bool:  # noqa: ANN001
    """Handling a volunteer's message raised ``exc``. The socket stays open whatever happened (returns
    True), unless the volunteer itself left meanwhile (False). During a database outage it is told to
    try again shortly; any other error is logged with its traceback and the volunteer told that this
    message was not applied (an ``error`` naming it): never dropped in silence."""
    dispatcher = request.app[K.dispatcher]
    if isinstance(exc, ConnectionError) and (ws.closed or request.transport is None or request.transport.is_closing()):
        return False  # a send to a volunteer that left: neither an outage nor our error
    if is_outage(exc):
        # The socket stays open (volunteers keep their work meanwhile). No `ref`: a refused
        # need_code would otherwise read as "this job is gone" and drop its tasks.
        dispatcher.db_health.failed(exc)
        await send(P.Error("the server's database is unavailable; try again shortly"))
        return True
    kind = _type_of(data)
    dispatcher.metrics.socket_errors.inc()
    logger.exception("handling a volunteer's '%s' message failed; the socket stays open", kind or "?", exc_info=exc)
    with contextlib.suppress(ConnectionError, RuntimeError):
        await send(P.Error(f"the server failed to handle this '{kind or 'message'}'; send it again later", ref=kind))
    return True


async def _message(
    request: web.Request, data: str, sock: VolunteerSocket | None, address: str, send
) -> VolunteerSocket | None:  # noqa: ANN001
    """Decode and handle one message; returns the connection (made by ``hello``)."""
    msg = P.decode(data)
    if msg.TYPE not in P.FROM_VOLUNTEER:
        raise P.ProtocolError(f"'{msg.TYPE}' is not a message a volunteer sends")
    if isinstance(msg, P.Hello):
        if sock is not None:
            raise P.ProtocolError("'hello' was already sent on this connection")
        return await _hello(request, msg, address, send)
    if sock is None:
        raise P.ProtocolError("send 'hello' first")
    await _handle(msg, sock, request.app[K.dispatcher], request.app[K.storage], send)
    return sock


def _device(caps: P.Capabilities) -> dict:
    """What the volunteers table keeps of a hello's capabilities (not the attempts it resumes)."""
    return {k: v for k, v in caps.to_wire().items() if k != "resume"}


async def _hello(request: web.Request, msg: P.Hello, address: str, send) -> VolunteerSocket:  # noqa: ANN001
    """Verify (or issue) the volunteer's id, register the connection, resume what it holds."""
    config, dispatcher = request.app[K.config], request.app[K.dispatcher]
    public, signed = request.app[K.volunteer_ids].verify_or_issue(msg.volunteer)
    caps: P.Capabilities = msg.capabilities
    sock = VolunteerSocket(public, send, capabilities=caps, address=address, protocol=msg.protocol)
    volunteer_context.set(public)  # this socket's task: its log lines name the volunteer
    dispatcher.connect(sock)
    try:
        dispatcher.seen(public, _device(caps))
        if caps.resume:  # attempts this browser still holds
            await dispatcher.resume(sock, caps.resume[: sock.declared_cap()])
    except Exception as exc:
        if not is_outage(exc):
            raise
        dispatcher.db_health.failed(exc)  # welcome anyway: it will get work when the database is back
    await send(P.Welcome(signed, config.heartbeat, config.instance, config.checkpoint_every))
    return sock


async def _handle(msg: object, sock: VolunteerSocket, dispatcher, storage, send) -> None:  # noqa: ANN001
    if isinstance(msg, P.Ready):
        await dispatcher.report_computing(sock, msg.running)
        await dispatcher.ready(sock, msg.n, msg.jobs)  # tasks now, or `wait` (held until work arrives)
        await dispatcher.report_computing(sock)  # a protocol-1 volunteer's estimate counts these
    elif isinstance(msg, P.Results):
        await _results(msg, sock, dispatcher, send)
    elif isinstance(msg, P.Heartbeat):
        await dispatcher.heartbeat(sock, msg.attempts, msg.running)
        if not msg.attempts:
            await dispatcher.idle_heartbeat(sock)
    elif isinstance(msg, P.Progress):
        await dispatcher.update(sock, P.Update(msg.attempt, progress=msg.fraction))
    elif isinstance(msg, P.Update):
        await dispatcher.update(sock, msg)
    elif isinstance(msg, P.NeedCode):
        info = await storage.job_info(msg.job)
        # Only for a job this socket holds (or just lost) an attempt of: a job's code is not for
        # anyone who knows (or guesses) its id and hash.
        mine = msg.job in sock.held.values() or msg.job in sock.recent.values()
        if info is None or info.code_hash != msg.code_hash or not mine:
            raise P.ProtocolError(f"need_code: you hold no task of job {msg.job} with that code hash")
        source = await storage.job_code(msg.job)
        name, description = await storage.job_about(msg.job)
        await send(P.Code(msg.job, msg.code_hash, source, info.requirements, name, description))
    elif isinstance(msg, P.Throttle):
        sock.throttle = msg.state
        await storage.volunteer_throttle(sock.volunteer, _device(sock.capabilities), msg.state.to_wire())


async def _results(msg: P.Results, sock: VolunteerSocket, dispatcher, send) -> None:  # noqa: ANN001
    try:
        rec = await dispatcher.report(sock, msg.results)
    except DatabaseAway as exc:  # nothing committed, nothing acknowledged: keep them, send later
        dispatcher.metrics.held.inc()
        await send(P.Hold([o.attempt for o in msg.results], exc.retry_after, exc.reason))
        return
    except Misbehaving:
        raise
    except Exception:  # nothing was committed, nothing acknowledged
        logger.exception("results from %s not recorded", sock.volunteer, extra={"volunteer": sock.volunteer})
        raise P.ProtocolError("the server could not commit these results now; send them again") from None
    await send(P.Ack(rec.acked, rec.ignored))
    await dispatcher.refill(sock)  # a waiting volunteer at its cap has room again


def _type_of(data: str) -> str | None:
    match = re.search(r'"type"\s*:\s*"([a-z_]{1,20})"', data[:200]) if isinstance(data, str) else None
    return match.group(1) if match else None


async def events_socket(request: web.Request) -> web.WebSocketResponse:
    """Live status of the caller's jobs: ``{"type": "job", ...the job's status}`` as it changes, and
    ``{"type": "partials", "job", "partials": {index: [values so far]}}`` when a running task of one
    appends partial results."""
    who = await researcher(request)
    only = request.query.get("job")
    ws = await _open(request)
    dispatcher = request.app[K.dispatcher]
    pending: set[int] = set()
    with_partials: dict[int, set[int]] = {}  # job -> task indices with new partial results
    wake = asyncio.Event()

    async def listen() -> None:
        async for event in dispatcher.bus.listen():
            if event.get("type") == "revoked" and event.get("researcher") == who.id:
                await ws.close(code=POLICY_VIOLATION, message=b"account revoked")
                return
            if event.get("researcher") == who.id and (only is None or str(event.get("job")) == only):
                pending.add(int(event["job"]))
                with_partials.setdefault(int(event["job"]), set()).update(_indices(event.get("partials")))
                wake.set()

    async def flush() -> None:
        while True:
            await wake.wait()
            wake.clear()
            jobs = list(pending)
            pending.clear()
            for job in jobs:
                with contextlib.suppress(NotFound):
                    await _send_job(ws, dispatcher, who.id, job, sorted(with_partials.pop(job, ())))
            await asyncio.sleep(0.25)  # at most four updates a second

    tasks = [asyncio.create_task(listen()), asyncio.create_task(flush())]
    try:
        if only is not None and only.isdigit():
            pending.add(int(only))
            wake.set()
        async for raw in ws:
            if raw.type == WSMsgType.TEXT and raw.data.strip() == "ping":
                await ws.send_str("pong")
    finally:
        for task in tasks:
            task.cancel()
    return ws


def _indices(value: object) -> list[int]:
    """The task indices a job event says have new partial results (none, for other events)."""
    return [i for i in value[:64] if isinstance(i, int)] if isinstance(value, list) else []


async def _send_job(ws: web.WebSocketResponse, dispatcher, researcher_id: int, job: int, indices: list[int]) -> None:  # noqa: ANN001
    """A job's status, then the partial results of the tasks that appended some (``indices``)."""
    await ws.send_json({"type": "job", **await dispatcher.job_status(researcher_id, job)})
    if indices:  # job_status above checked that the job is the caller's (NotFound otherwise)
        values = await live.partials_of(dispatcher.storage, job, indices)
        await ws.send_json({"type": "partials", "job": job, "partials": values})


async def close_sockets(app: web.Application) -> None:
    sockets: weakref.WeakSet[web.WebSocketResponse] = app[SOCKETS]
    for ws in list(sockets):
        await ws.close(code=1001, message=b"server shutdown")


def add_routes(app: web.Application) -> None:
    app[SOCKETS] = weakref.WeakSet()
    app[PER_ADDRESS] = collections.Counter()
    app.router.add_get("/ws/volunteer", volunteer_socket)
    app.router.add_get("/api/events", events_socket)
    app.on_shutdown.append(close_sockets)
