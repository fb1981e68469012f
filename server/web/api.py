"""The researchers' JSON API: thin handlers; domain errors become HTTP errors in one middleware."""

from __future__ import annotations

import json
import logging
from collections.abc import Awaitable, Callable

from aiohttp import web

from server import spec as job_spec
from server.crypto import hash_token
from server.jobs.error_groups import ErrorGroups
from server.jobs.outage import is_outage
from server.spec import InvalidJob
from server.store import download
from server.store.models import QuotaExceeded
from server.store.storage import Conflict, NotFound, Researcher
from server.web import appkeys as K
from server.web import export, quotas

logger = logging.getLogger(__name__)
SESSION_COOKIE = "uvm_session"

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def json_error(status: int, message: str, **extra: object) -> web.Response:
    """The one shape of every API error: ``{"error": message, ...}`` with its status."""
    return web.json_response({"error": message, **extra}, status=status)


def http_error(kind: type[web.HTTPException], message: str) -> web.HTTPException:
    """``json_error`` as an exception to raise from a helper (``raise http_error(web.HTTPForbidden, ...)``)."""
    return kind(text=json.dumps({"error": message}), content_type="application/json")


def own_origin(request: web.Request) -> str:
    """Our origin: ``UVM_PUBLIC_URL`` when set (it is what browsers see), else the request's."""
    return request.app[K.config].public_url or f"{request.scheme}://{request.host}"


UNSAFE_METHODS = frozenset({"POST", "PUT", "PATCH", "DELETE"})


@web.middleware
async def csrf_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Same-site CSRF defence for what a browser's cookie authenticates.

    A POST to ``/api/`` without ``Authorization`` (so the session cookie, or a sign-in that sets
    one) must say ``Content-Type: application/json`` (no HTML form can; a cross-site fetch that
    does needs a CORS preflight we never grant) and come from our own ``Origin``. Scripts with a
    bearer token are not affected: no browser attaches that on its own.
    """
    if (
        request.method in UNSAFE_METHODS
        and request.path.startswith("/api/")
        and "Authorization" not in request.headers
        and (SESSION_COOKIE in request.cookies or request.path == "/api/login")
    ):
        if request.content_type != "application/json":
            return json_error(403, "send Content-Type: application/json")
        if request.headers.get("Origin", "").rstrip("/") != own_origin(request):
            return json_error(403, "cross-site request refused (Origin is not this site)")
    return await handler(request)


@web.middleware
async def errors_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Every error answers JSON with a message a person can act on; the server stays up."""
    try:
        return await handler(request)
    except InvalidJob as exc:
        return web.json_response(exc.as_dict(), status=400)
    except NotFound as exc:
        return json_error(404, str(exc))
    except Conflict as exc:
        return json_error(409, str(exc))
    except QuotaExceeded as exc:
        return quotas.quota_response(exc)
    except web.HTTPRequestEntityTooLarge:
        limit = request.app[K.config].max_body_bytes
        return json_error(413, f"request body too large (limit {limit} bytes)")
    except web.HTTPException as exc:
        if exc.status >= 400 and request.path.startswith("/api/") and exc.content_type != "application/json":
            return json_error(exc.status, exc.reason)
        raise
    except Exception as exc:
        if not is_outage(exc):
            raise
        # The database is away: a transient 503 (the Python client and load balancers retry it).
        request.app[K.dispatcher].db_health.failed(exc)
        response = json_error(503, "the database is unavailable; try again shortly")
        response.headers["Retry-After"] = "5"
        return response


async def researcher(request: web.Request) -> Researcher:
    """The caller: ``Authorization: Bearer TOKEN`` or the dashboard's session cookie."""
    storage = request.app[K.storage]
    header = request.headers.get("Authorization", "")
    who: Researcher | None = None
    if header:
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise http_error(web.HTTPUnauthorized, "use Authorization: Bearer TOKEN")
        who = await storage.researcher_by_token(hash_token(token.strip()))
    elif SESSION_COOKIE in request.cookies:
        who = await storage.researcher_by_session(hash_token(request.cookies[SESSION_COOKIE]))
    if who is None:
        raise http_error(web.HTTPUnauthorized, "unknown or missing token")
    if not who.approved:
        raise http_error(web.HTTPForbidden, "this account is not approved")
    rate = who.max_requests_per_second
    request.app[quotas.BUDGET].take(
        who.id, request.app[K.config].researcher_requests_per_second if rate is None else rate
    )
    return who


async def read_json(request: web.Request) -> object:
    raw = await request.read()  # raises 413 past client_max_size
    try:
        return json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise http_error(web.HTTPBadRequest, f"malformed JSON: {exc}") from None
    except RecursionError:  # [[[[...]]]] thousands deep: a bad request, not a server error
        raise http_error(web.HTTPBadRequest, "malformed JSON: nested too deeply") from None


def job_id(request: web.Request) -> int:
    raw = request.match_info["job_id"]
    if not raw.isdigit() or len(raw) > 18:
        raise NotFound(f"no job {raw[:40]}")
    return int(raw)


# -------------------------------------------------------------------------------- handlers
async def create_job(request: web.Request) -> web.Response:
    who = await researcher(request)
    body = await read_json(request)
    parsed = job_spec.parse(body, request.app[K.config])
    new_id = await request.app[K.dispatcher].submit(who.id, parsed)
    n_tasks = parsed.n_tasks
    if parsed.inputs_kind in ("after", "list") and parsed.parent_job_id is not None:  # known once saved
        n_tasks = (await request.app[K.storage].get_job(who.id, new_id))["n_tasks"]
    return web.json_response({"id": new_id, "n_tasks": n_tasks}, status=201)


async def list_jobs(request: web.Request) -> web.Response:
    who = await researcher(request)
    return web.json_response({"jobs": await request.app[K.dispatcher].list_jobs(who.id)})


async def get_job(request: web.Request) -> web.Response:
    who = await researcher(request)
    return web.json_response(await request.app[K.dispatcher].job_status(who.id, job_id(request)))


async def cancel_job(request: web.Request) -> web.Response:
    who = await researcher(request)
    jid = job_id(request)
    changed = await request.app[K.dispatcher].cancel(who.id, jid)
    status = await request.app[K.dispatcher].job_status(who.id, jid)
    return web.json_response({"cancelled": changed, **status})


async def retry_job(request: web.Request) -> web.Response:
    who = await researcher(request)
    n = await request.app[K.dispatcher].retry_failed(who.id, job_id(request))
    return web.json_response({"retried": n})


async def job_results(request: web.Request) -> web.StreamResponse:
    who = await researcher(request)
    jid = job_id(request)
    fmt = request.query.get("format", "json")
    if fmt not in export.FORMATS:
        return json_error(400, f"unknown format {fmt[:20]!r}; use one of {', '.join(export.FORMATS)}")
    start, limit = _int_param(request, "start", 0) or 0, _int_param(request, "limit", None)
    storage = request.app[K.storage]
    await storage.get_job(who.id, jid)  # 404 for another researcher's job
    response = web.StreamResponse(
        headers={
            "Content-Type": export.FORMATS[fmt],
            "Content-Disposition": f'attachment; filename="job-{jid}-results.{fmt}"',
            "Cache-Control": "no-store",
        }
    )
    await response.prepare(request)
    async for chunk in export.render(download.result_pages(storage, jid, start, limit), fmt):
        await response.write(chunk)
    await response.write_eof()
    return response


def _int_param(request: web.Request, name: str, default: int | None) -> int | None:
    raw = request.query.get(name)
    if raw is None:
        return default
    if not raw.isdigit() or len(raw) > 9:
        raise http_error(web.HTTPBadRequest, f"'{name}' must be a whole number")
    return int(raw)


async def job_finished(request: web.Request) -> web.Response:
    """Which tasks are finished, as index runs: clients then download each result once, by range."""
    who = await researcher(request)
    jid = job_id(request)
    storage = request.app[K.storage]
    await storage.get_job(who.id, jid)  # 404 for another researcher's job
    start = _int_param(request, "start", 0) or 0
    runs, following = await storage.finished_runs(jid, start)
    return web.json_response({"start": start, "runs": runs, "next": None if following < 0 else following})


async def job_errors(request: web.Request) -> web.Response:
    """Failed tasks (the first 1,000) and every failure grouped by its masked message."""
    who = await researcher(request)
    jid = job_id(request)
    storage = request.app[K.storage]
    await storage.get_job(who.id, jid)
    errors: list[dict] = []
    groups = ErrorGroups()
    async for row in storage.iter_tasks(jid, only_errors=True):
        if len(errors) < 1000:
            errors.append({k: row[k] for k in ("index", "input", "state", "attempts", "error", "output")})
        groups.add(row)
    return web.json_response({"errors": errors, "groups": groups.largest_first()})


async def volunteer_stats(request: web.Request) -> web.Response:
    """A volunteer's contribution: to the volunteer itself (its signed id is the credential), or
    to a signed-in researcher (by public id). Anyone else learns nothing, not even existence."""
    vid = request.match_info["volunteer_id"][:64]
    public = request.app[K.volunteer_ids].verify(vid)
    if public is None:
        await researcher(request)  # 401 without credentials
        public = vid
    storage = request.app[K.storage]
    return web.json_response({**await storage.volunteer_stats(public), **await storage.volunteer_credit(public)})


async def health(request: web.Request) -> web.Response:
    """200 when this server can do its work; 503 during a database outage (and says since when).
    Also the queue depth (None while Redis is away) and each background loop's state."""
    dispatcher = request.app[K.dispatcher]
    if dispatcher.db_health.down_since is None:
        await dispatcher.db_health.probe(dispatcher.storage.engine)
    database = dispatcher.db_health.as_dict()
    up = database["state"] == "up"
    try:
        ready: int | None = await dispatcher.queue.ready_count()
    except Exception:  # Redis away: say so here rather than fail the health check itself
        ready = None
    return web.json_response(
        {
            "ok": up,
            "instance": request.app[K.config].instance,
            "database": database,
            "volunteers": len(dispatcher.sockets),
            "ready": ready,
            "loops": {name: loop.as_dict() for name, loop in dispatcher.loops.items()},
        },
        status=200 if up else 503,
    )


def add_routes(app: web.Application) -> None:
    app[quotas.BUDGET] = quotas.RequestBudget()
    app.router.add_post("/api/jobs", create_job)
    app.router.add_get("/api/jobs", list_jobs)
    app.router.add_get("/api/jobs/{job_id}", get_job)
    app.router.add_post("/api/jobs/{job_id}/cancel", cancel_job)
    app.router.add_post("/api/jobs/{job_id}/retry", retry_job)
    app.router.add_get("/api/jobs/{job_id}/results", job_results)
    app.router.add_get("/api/jobs/{job_id}/errors", job_errors)
    app.router.add_get("/api/jobs/{job_id}/finished", job_finished)
    app.router.add_get("/api/volunteers/{volunteer_id}", volunteer_stats)
    app.router.add_get("/api/health", health)
