"""Websockets: the volunteers' protocol, and researchers' live job events.

``Origin`` is checked before ``prepare()``: a browser may connect from our own origin or from an
embedding site in ``UVM_ALLOWED_ORIGINS``; clients that send no Origin (scripts) are allowed.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import weakref

from aiohttp import WSMsgType, web

from server import protocol as P
from server.jobs.dispatch import Conn
from server.store.storage import NotFound
from server.web import appkeys as K
from server.web.api import researcher

logger = logging.getLogger(__name__)
VOLUNTEER_ID = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
SOCKETS: web.AppKey[weakref.WeakSet[web.WebSocketResponse]] = web.AppKey("sockets")


def origin_allowed(request: web.Request) -> bool:
    origin = request.headers.get("Origin")
    if origin is None:
        return True
    origin = origin.rstrip("/")
    own = f"{request.scheme}://{request.host}"
    return origin == own or origin in request.app[K.config].allowed_origins


async def _open(request: web.Request) -> web.WebSocketResponse:
    if not origin_allowed(request):
        raise web.HTTPForbidden(text="websocket origin not allowed")
    ws = web.WebSocketResponse(max_msg_size=request.app[K.config].max_ws_message_bytes, heartbeat=30.0)
    await ws.prepare(request)
    request.app[SOCKETS].add(ws)
    return ws


async def volunteer_socket(request: web.Request) -> web.WebSocketResponse:  # noqa: C901
    ws = await _open(request)
    dispatcher = request.app[K.dispatcher]
    storage = request.app[K.storage]
    conn: Conn | None = None

    async def send(msg: object) -> None:
        if not ws.closed:
            await ws.send_str(P.encode(msg))

    try:
        async for raw in ws:
            if raw.type != WSMsgType.TEXT:
                if raw.type == WSMsgType.BINARY:
                    await send(P.Error("send JSON text messages, not binary"))
                continue
            try:
                msg = P.decode(raw.data)
                if msg.TYPE not in P.FROM_VOLUNTEER:
                    raise P.ProtocolError(f"'{msg.TYPE}' is not a message a volunteer sends")
                if conn is None and not isinstance(msg, P.Hello):
                    raise P.ProtocolError("send 'hello' first")
                if isinstance(msg, P.Hello):
                    if conn is not None:
                        raise P.ProtocolError("'hello' was already sent on this connection")
                    if not VOLUNTEER_ID.match(msg.volunteer):
                        raise P.ProtocolError("hello: volunteer id must be 1-64 letters, digits, '-' or '_'")
                    conn = Conn(msg.volunteer, send, capabilities=msg.capabilities)
                    dispatcher.conns.add(conn)
                    await storage.volunteer_seen(msg.volunteer, msg.capabilities)
                    resume = msg.capabilities.get("resume")
                    if isinstance(resume, list) and resume:  # attempts this browser still holds
                        await dispatcher.resume(conn, resume)
                    await send(
                        P.Welcome(msg.volunteer, request.app[K.config].heartbeat, request.app[K.config].instance)
                    )
                elif conn is not None:  # always, after the check above; said again for the type checker
                    await _handle(msg, conn, dispatcher, storage, send)
            except P.ProtocolError as exc:
                await send(P.Error(str(exc), ref=_type_of(raw.data)))
    finally:
        if conn is not None:
            await asyncio.shield(dispatcher.abandon(conn))
    return ws


async def _handle(msg: object, conn: Conn, dispatcher, storage, send) -> None:  # noqa: ANN001
    if isinstance(msg, P.Ready):
        await send(P.Tasks(await dispatcher.lease(conn, msg.n)))
    elif isinstance(msg, P.Results):
        try:
            rec = await dispatcher.report(conn, msg.results)
        except Exception:  # the database is away: nothing was committed, nothing acknowledged
            logger.exception("results from %s not recorded", conn.volunteer)
            raise P.ProtocolError("the server could not commit these results now; send them again") from None
        await send(P.Ack(rec.acked, rec.ignored))
    elif isinstance(msg, P.Heartbeat):
        await dispatcher.heartbeat(conn, msg.attempts)
    elif isinstance(msg, P.Progress):
        await dispatcher.heartbeat(conn, [msg.attempt])
    elif isinstance(msg, P.NeedCode):
        info = await storage.job_info(msg.job)
        if info is None or info.code_hash != msg.code_hash:
            raise P.ProtocolError(f"need_code: no job {msg.job} with that code hash")
        source = await storage.job_code(msg.job)
        await send(P.Code(msg.job, msg.code_hash, source, info.requirements))
    elif isinstance(msg, P.Throttle):
        conn.throttle = msg.state
        await storage.volunteer_throttle(conn.volunteer, msg.state)


def _type_of(data: str) -> str | None:
    match = re.search(r'"type"\s*:\s*"([a-z_]{1,20})"', data[:200]) if isinstance(data, str) else None
    return match.group(1) if match else None


async def events_socket(request: web.Request) -> web.WebSocketResponse:
    """Live status of the caller's jobs: ``{"type": "job", ...the job's status}`` as it changes."""
    who = await researcher(request)
    only = request.query.get("job")
    ws = await _open(request)
    dispatcher = request.app[K.dispatcher]
    pending: set[int] = set()
    wake = asyncio.Event()

    async def listen() -> None:
        async for event in dispatcher.bus.listen():
            if event.get("researcher") == who.id and (only is None or str(event.get("job")) == only):
                pending.add(int(event["job"]))
                wake.set()

    async def flush() -> None:
        while True:
            await wake.wait()
            wake.clear()
            jobs = list(pending)
            pending.clear()
            for job in jobs:
                with contextlib.suppress(NotFound):
                    await ws.send_json({"type": "job", **await dispatcher.job_status(who.id, job)})
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


async def close_sockets(app: web.Application) -> None:
    sockets: weakref.WeakSet[web.WebSocketResponse] = app[SOCKETS]
    for ws in list(sockets):
        await ws.close(code=1001, message=b"server shutdown")


def add_routes(app: web.Application) -> None:
    app[SOCKETS] = weakref.WeakSet()
    app.router.add_get("/ws/volunteer", volunteer_socket)
    app.router.add_get("/api/events", events_socket)
    app.on_shutdown.append(close_sockets)
