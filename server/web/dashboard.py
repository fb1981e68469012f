"""The researchers' dashboard: the page at ``/dashboard``, sign-in sessions and operator endpoints.

``add_routes`` is called by the app factory when this module exists. The page itself
(``public/dashboard.html`` + ``webapp/dashboard/``) talks to the same JSON API as scripts; it
authenticates with the ``uvm_session`` cookie (HttpOnly, SameSite=Strict) set by ``/api/login``.
Every ``/api/...`` route here is documented in ``DASHBOARD_PATHS``, added to the OpenAPI
document (``server/web/openapi.py``) by the app factory.
"""

from __future__ import annotations

import asyncio
import collections
import json
import time
from pathlib import Path

import sqlalchemy as sa
from aiohttp import web

from server.crypto import check_password, hash_token, new_token
from server.protocol import Capabilities, ThrottleState
from server.store.storage import THROUGHPUT_WINDOW, NotFound, Researcher
from server.store.tables import tasks, volunteers
from server.web import appkeys as K
from server.web import quotas, static
from server.web.addresses import client_address
from server.web.api import SESSION_COOKIE, http_error, job_id, json_error, read_json, researcher

ROOT = Path(__file__).resolve().parents[2]
PUBLIC = ROOT / "public"
SESSION_TTL = 7 * 24 * 3600.0
LOGIN_LIMIT = 10  # attempts per email and client address ...
LOGIN_LIMIT_PER_ADDRESS = 30  # ... and per client address, whatever the emails ...
LOGIN_WINDOW = 60.0  # ... in this many seconds
LOGIN_KEYS_KEPT = 100_000  # limiter keys remembered (least recently used forgotten first)
# Compared against when the email is unknown, so that an unknown account costs the same scrypt
# as a known one (no timing difference reveals which emails have accounts).
DUMMY_PASSWORD_HASH = (  # of a random password, thrown away
    "scrypt$2b5057494d9b84223072c23b01efb8f5$bf115df9b7af8bd8550a012dee30f03143ac8783ef6d64cc76ca30d6058adf7c519dda49b9e9efb7e57ce10764ea529e1e9f85bd2c7df381cbc9ed066e4cf881"
)
RECENT_VOLUNTEER_SECONDS = 600.0  # the operator sees volunteers seen this recently


class LoginLimiter:
    """Sliding windows of sign-in attempts per (email, address) and per address: slows password
    guessing against one account and spraying from one address.

    Memory is bounded by forgetting the least recently used keys one at a time, never by
    clearing everything (which would hand a sprayer a fresh budget).
    """

    def __init__(
        self,
        limit: int = LOGIN_LIMIT,
        window: float = LOGIN_WINDOW,
        per_address: int = LOGIN_LIMIT_PER_ADDRESS,
        kept: int = LOGIN_KEYS_KEPT,
    ) -> None:
        self.limit, self.window, self.per_address, self.kept = limit, window, per_address, kept
        self._hits: collections.OrderedDict[tuple, collections.deque] = collections.OrderedDict()

    def _window(self, key: tuple, now: float) -> collections.deque:
        hits = self._hits.pop(key, None)
        if hits is None:
            hits = collections.deque()
        self._hits[key] = hits  # most recently used last
        while hits and hits[0] <= now - self.window:
            hits.popleft()
        while len(self._hits) > self.kept:
            self._hits.popitem(last=False)
        return hits

    def allow(self, email: str, address: str, now: float | None = None) -> bool:
        now = time.monotonic() if now is None else now
        mine, theirs = self._window(("email", email, address), now), self._window(("address", address), now)
        if len(mine) >= self.limit or len(theirs) >= self.per_address:
            return False
        mine.append(now)
        theirs.append(now)
        return True

    def retry_after(self, email: str, address: str, now: float | None = None) -> int:
        now = time.monotonic() if now is None else now
        firsts = [h[0] for h in (self._hits.get(("email", email, address)), self._hits.get(("address", address))) if h]
        return max(1, int(min(firsts) + self.window - now) + 1) if firsts else 1


LIMITER = web.AppKey("login_limiter", LoginLimiter)


# ---------------------------------------------------------------------------------- the page
def codemirror_modules(public_dir: Path = PUBLIC) -> dict[str, str]:
    """File names of the CodeMirror bundles that ship inside the pinned ``@pyscript/core``.

    PyScript's own editor is built from them; their names carry a content hash, so they are
    looked up here rather than written into the page.
    """
    dist = public_dir / "node_modules" / "@pyscript" / "core" / "dist"
    found = {}
    for key, pattern in (("%CODEMIRROR%", "codemirror-*.js"), ("%CODEMIRROR_PYTHON%", "codemirror_lang-python-*.js")):
        names = sorted(p.name for p in dist.glob(pattern))
        found[key] = names[0] if names else "missing-codemirror.js"
    return found


async def page(request: web.Request) -> web.Response:
    """The dashboard page; it cannot be framed (a framed sign-in form invites clickjacking)."""
    values = {**static.page_vars(request.app[K.config], PUBLIC, ROOT, "dashboard"), **codemirror_modules()}
    return static.page_response(static.render_page(PUBLIC, "dashboard.html", values))


# ------------------------------------------------------------------------------- sessions
async def login(request: web.Request) -> web.Response:
    body = await read_json(request)
    if not isinstance(body, dict):
        return json_error(400, "send a JSON object {email, password}")
    email, password = body.get("email"), body.get("password")
    if not isinstance(email, str) or not isinstance(password, str) or not email.strip() or not password:
        return json_error(400, "email and password are required", field="email" if not email else "password")
    email = email.strip().lower()[:254]
    limiter = request.app[LIMITER]
    address = client_address(request)
    if not limiter.allow(email, address):
        wait = limiter.retry_after(email, address)
        response = json_error(429, f"too many sign-in attempts; try again in {wait} s")
        response.headers["Retry-After"] = str(wait)
        return response
    storage = request.app[K.storage]
    found = await storage.researcher_by_email(email)
    if found is None and email != body["email"].strip():
        found = await storage.researcher_by_email(body["email"].strip())  # stored with capitals
    # scrypt takes tens of ms: in a thread, so sign-ins do not stall every socket on this server
    stored = found[1] if found is not None else DUMMY_PASSWORD_HASH
    matches = await asyncio.get_running_loop().run_in_executor(None, check_password, password, stored)
    if found is None or not matches:
        return json_error(401, "wrong email or password")
    who, _ = found
    if not who.approved:
        return json_error(403, "this account is not approved yet; ask an operator")
    token = new_token()
    await storage.add_session(hash_token(token), who.id, SESSION_TTL)
    response = web.json_response(_me(who, request))
    response.set_cookie(
        SESSION_COOKIE,
        token,
        max_age=int(SESSION_TTL),
        path="/",
        httponly=True,
        samesite="Strict",
        secure=request.secure or request.app[K.config].public_url.startswith("https://"),
    )
    return response


async def logout(request: web.Request) -> web.Response:
    token = request.cookies.get(SESSION_COOKIE)
    if token:
        await request.app[K.storage].drop_session(hash_token(token))
    response = web.json_response({"ok": True})
    response.del_cookie(SESSION_COOKIE, path="/")
    return response


def _me(who: Researcher, request: web.Request) -> dict:
    """The signed-in researcher, and the server's default ``replication`` (the new-job form's default)."""
    return {
        "id": who.id,
        "email": who.email,
        "approved": who.approved,
        "operator": who.operator,
        "default_replication": request.app[K.config].default_replication,
    }


async def me(request: web.Request) -> web.Response:
    return web.json_response(_me(await researcher(request), request))


# ------------------------------------------------------------------------------- operators
async def operator(request: web.Request) -> Researcher:
    who = await researcher(request)
    if not who.operator:
        raise http_error(web.HTTPForbidden, "operators only")
    return who


async def admin_researchers(request: web.Request) -> web.Response:
    await operator(request)
    return web.json_response({"researchers": await request.app[K.storage].list_researchers()})


def _researcher_id(request: web.Request) -> int:
    raw = request.match_info["researcher_id"]
    if not raw.isdigit() or len(raw) > 18:
        raise http_error(web.HTTPNotFound, f"no researcher {raw[:40]}")
    return int(raw)


async def _set_approved(request: web.Request, approved: bool) -> web.Response:
    who = await operator(request)
    target = _researcher_id(request)
    if target == who.id and not approved:
        return json_error(409, "you cannot revoke your own account")
    await request.app[K.storage].set_approved(target, approved)  # NotFound -> 404
    return web.json_response({"id": target, "approved": approved})


async def approve(request: web.Request) -> web.Response:
    return await _set_approved(request, True)


async def revoke(request: web.Request) -> web.Response:
    """Revoke: the account stops working, its sessions end, its unfinished jobs are cancelled
    and its open events sockets close (on every instance, over the bus)."""
    response = await _set_approved(request, False)
    if response.status == 200:
        target = _researcher_id(request)
        await request.app[K.storage].drop_sessions(target)
        cancelled = await request.app[K.dispatcher].revoke(target)
        response = web.json_response({"id": target, "approved": False, "jobs_cancelled": cancelled})
    return response


async def get_limits(request: web.Request) -> web.Response:
    """Operators: a researcher's fair-share weight and quotas (null: the server's default)."""
    await operator(request)
    target = _researcher_id(request)
    return web.json_response(quotas.limits_dict(target, await request.app[K.storage].limits(target)))


async def set_limits(request: web.Request) -> web.Response:
    """Operators: set some of a researcher's share and quotas; null puts one back to the default."""
    await operator(request)
    target = _researcher_id(request)
    try:
        values = quotas.parse_limits(await read_json(request))
    except ValueError as exc:
        return json_error(400, str(exc))
    limits = await request.app[K.dispatcher].set_limits(target, values)  # NotFound -> 404
    return web.json_response(quotas.limits_dict(target, limits))


async def cancel_any_job(request: web.Request) -> web.Response:
    """Operators: cancel any researcher's job."""
    await operator(request)
    jid = job_id(request)
    info = await request.app[K.storage].job_info(jid)
    if info is None:
        raise NotFound(f"no job {jid}")
    changed = await request.app[K.dispatcher].cancel(info.researcher_id, jid)
    status = await request.app[K.dispatcher].job_status(None, jid)
    return web.json_response({"cancelled": changed, **status})


def _loads(text: str | None) -> dict:
    try:
        value = json.loads(text or "{}")
    except ValueError:
        return {}
    return value if isinstance(value, dict) else {}


async def _volunteer_rows(engine, since: float) -> tuple[list[dict], float]:  # noqa: ANN001
    """Volunteers seen since ``since``, and tasks finished over the last 30 s (all jobs).

    Read-only queries kept here until the storage layer grows an operator section.
    """
    now = time.time()
    async with engine.connect() as conn:
        rows = (
            await conn.execute(
                sa.select(volunteers)
                .where(volunteers.c.last_seen > since)
                .order_by(volunteers.c.last_seen.desc())
                .limit(500)
            )
        ).all()
        recent = (
            await conn.execute(
                sa.select(sa.func.count()).select_from(tasks).where(tasks.c.finished_at > now - THROUGHPUT_WINDOW)
            )
        ).scalar()
    seen = [
        {
            "id": r.id,
            "first_seen": r.first_seen,
            "last_seen": r.last_seen,
            # re-typed on the way out: rows written before typing may hold anything
            "capabilities": Capabilities.from_wire(_loads(r.capabilities)).to_wire(),
            "throttle": ThrottleState.from_wire(_loads(r.throttle)).to_wire(),
            "tasks_done": r.tasks_done,
            "task_seconds": round(r.task_seconds, 3),
        }
        for r in rows
    ]
    return seen, round((recent or 0) / THROUGHPUT_WINDOW, 3)


async def admin_volunteers(request: web.Request) -> web.Response:
    await operator(request)
    dispatcher = request.app[K.dispatcher]
    connected = [
        {
            "id": c.volunteer,
            "address": c.address,
            "capabilities": c.capabilities.to_wire(),
            "throttle": c.throttle.to_wire() if c.throttle is not None else {},
            "held": len(c.held),
            "connected_at": c.connected_at,
        }
        for c in sorted(dispatcher.sockets, key=lambda c: c.connected_at)
    ]
    seen, throughput = await _volunteer_rows(request.app[K.storage].engine, time.time() - RECENT_VOLUNTEER_SECONDS)
    trust_after = request.app[K.config].trust_after
    for row in connected + seen:
        row["reputation"] = await request.app[K.storage].reputation_of(row["id"], trust_after)
    return web.json_response(
        {
            "instance": request.app[K.config].instance,
            "connected": connected,
            "recent": seen,
            "throughput": throughput,
            "ready": await dispatcher.queue.ready_count(),
        }
    )


def add_routes(app: web.Application) -> None:
    app[LIMITER] = LoginLimiter()
    app.router.add_get("/dashboard", page)
    app.router.add_post("/api/login", login)
    app.router.add_post("/api/logout", logout)
    app.router.add_get("/api/me", me)
    app.router.add_get("/api/admin/researchers", admin_researchers)
    app.router.add_post("/api/admin/researchers/{researcher_id}/approve", approve)
    app.router.add_post("/api/admin/researchers/{researcher_id}/revoke", revoke)
    app.router.add_get("/api/admin/volunteers", admin_volunteers)
    app.router.add_post("/api/admin/jobs/{job_id}/cancel", cancel_any_job)
    app.router.add_get("/api/admin/researchers/{researcher_id}/limits", get_limits)
    app.router.add_post("/api/admin/researchers/{researcher_id}/limits", set_limits)


# ---------------------------------------------------------------------------------- OpenAPI
def _resp(description: str, schema: dict | None = None) -> dict:
    out: dict = {"description": description}
    if schema is not None:
        out["content"] = {"application/json": {"schema": schema}}
    return out


_ERR = {
    "description": "error",
    "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}},
}
_ME: dict = {
    "type": "object",
    "properties": {
        "id": {"type": "integer"},
        "email": {"type": "string"},
        "approved": {"type": "boolean"},
        "operator": {"type": "boolean"},
    },
}
_ME_AND_DEFAULTS = {
    "type": "object",
    "properties": {
        **_ME["properties"],
        "default_replication": {
            "oneOf": [{"type": "integer"}, {"type": "string", "enum": ["adaptive"]}],
            "description": "a job's replication when it names none (UVM_DEFAULT_REPLICATION)",
        },
    },
}
_LIMITS = {
    "type": "object",
    "properties": {
        "id": {"type": "integer"},
        "share": {"type": "number", "nullable": True, "exclusiveMinimum": True, "minimum": 0, "maximum": 1e6},
        "max_queued_tasks": {"type": "integer", "nullable": True, "minimum": 0, "maximum": 1e12},
        "max_stored_bytes": {"type": "integer", "nullable": True, "minimum": 0, "maximum": 1e15},
        "max_requests_per_second": {
            "type": "number",
            "nullable": True,
            "exclusiveMinimum": True,
            "minimum": 0,
            "maximum": 1e6,
        },
    },
}
_RID = {"name": "researcher_id", "in": "path", "required": True, "schema": {"type": "integer"}}


def _errs(*codes: int) -> dict:
    return {str(code): _ERR for code in codes}


DASHBOARD_PATHS: dict = {
    "/api/login": {
        "post": {
            "summary": "Sign in: sets the uvm_session cookie (HttpOnly, SameSite=Strict)",
            "security": [],
            "requestBody": {
                "required": True,
                "content": {
                    "application/json": {
                        "schema": {
                            "type": "object",
                            "required": ["email", "password"],
                            "properties": {"email": {"type": "string"}, "password": {"type": "string"}},
                        }
                    }
                },
            },
            "responses": {"200": _resp("signed in", _ME_AND_DEFAULTS), **_errs(400, 401, 403, 429)},
        }
    },
    "/api/logout": {
        "post": {
            "summary": "Sign out: ends the session and clears the cookie",
            "security": [],
            "responses": {"200": _resp("signed out", {"type": "object"})},
        }
    },
    "/api/me": {
        "get": {
            "summary": "The signed-in researcher, and the server's default replication (UVM_DEFAULT_REPLICATION)",
            "responses": {"200": _resp("me", _ME_AND_DEFAULTS), **_errs(401, 403)},
        }
    },
    "/api/admin/researchers": {
        "get": {
            "summary": "Operators: every researcher account",
            "responses": {
                "200": _resp(
                    "researchers", {"type": "object", "properties": {"researchers": {"type": "array", "items": _ME}}}
                ),
                **_errs(401, 403),
            },
        }
    },
    "/api/admin/researchers/{researcher_id}/approve": {
        "post": {
            "summary": "Operators: approve a researcher",
            "parameters": [_RID],
            "responses": {"200": _resp("approved", {"type": "object"}), **_errs(401, 403, 404)},
        }
    },
    "/api/admin/researchers/{researcher_id}/revoke": {
        "post": {
            "summary": "Operators: revoke a researcher: their token and sessions stop working, their unfinished "
            "jobs are cancelled and their events sockets closed",
            "parameters": [_RID],
            "responses": {"200": _resp("revoked", {"type": "object"}), **_errs(401, 403, 404, 409)},
        }
    },
    "/api/admin/researchers/{researcher_id}/limits": {
        "get": {
            "summary": "Operators: a researcher's fair-share weight and quotas (null: the server's default)",
            "parameters": [_RID],
            "responses": {"200": _resp("limits", _LIMITS), **_errs(401, 403, 404)},
        },
        "post": {
            "summary": "Operators: set a researcher's share (weight in hand-out between researchers, default 1) and "
            "quotas: tasks not yet finished, stored result bytes, API requests per second (per instance). "
            "Fields left out stay; null puts one back to the server's default",
            "parameters": [_RID],
            "requestBody": {
                "required": True,
                "content": {"application/json": {"schema": {**_LIMITS, "required": [], "additionalProperties": False}}},
            },
            "responses": {"200": _resp("the limits now", _LIMITS), **_errs(400, 401, 403, 404, 413)},
        },
    },
    "/api/admin/jobs/{job_id}/cancel": {
        "post": {
            "summary": "Operators: cancel any researcher's job",
            "parameters": [{"name": "job_id", "in": "path", "required": True, "schema": {"type": "integer"}}],
            "responses": {"200": _resp("the job's status", {"type": "object"}), **_errs(401, 403, 404)},
        }
    },
    "/api/admin/volunteers": {
        "get": {
            "summary": "Operators: connected volunteers (this instance) with throttle states, recent ones, throughput",
            "responses": {"200": _resp("volunteers", {"type": "object"}), **_errs(401, 403)},
        }
    },
}
