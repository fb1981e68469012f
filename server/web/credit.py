"""Volunteers' credit at the edge: their nickname (opt-in, set with their signed id) and the public
leaderboard (its page, ``public/leaderboard.html``, is served with the other pages)."""

from __future__ import annotations

import json

from aiohttp import web

from server.store.credit import InvalidNickname, clean_nickname
from server.web import appkeys as K
from server.web import openapi
from server.web.api import json_error

MAX_NICKNAME_BODY = 1024  # bytes: {"nickname": "<32 characters>"} needs far less


async def set_nickname(request: web.Request) -> web.Response:
    """``PUT /api/volunteers/{signed id}/nickname {"nickname": str | null}``: only the volunteer
    itself (its signed id is the credential) names itself; null or "" takes it off the leaderboard."""
    public = request.app[K.volunteer_ids].verify(request.match_info["volunteer_id"][:64])
    if public is None:
        return json_error(404, "no such volunteer (present the signed id from your page)")
    if request.content_length is not None and request.content_length > MAX_NICKNAME_BODY:
        return json_error(413, f"the body must be at most {MAX_NICKNAME_BODY} bytes")
    raw = await request.content.read(MAX_NICKNAME_BODY + 1)
    if len(raw) > MAX_NICKNAME_BODY:
        return json_error(413, f"the body must be at most {MAX_NICKNAME_BODY} bytes")
    try:
        body = json.loads(raw)
    except ValueError:
        return json_error(400, 'the body must be JSON: {"nickname": "..."}')
    if not isinstance(body, dict) or set(body) != {"nickname"}:
        return json_error(400, 'the body must be {"nickname": "..."} (or null to stop being listed)')
    try:
        nickname = clean_nickname(body["nickname"])
    except InvalidNickname as exc:
        return json_error(400, str(exc), field="nickname")
    await request.app[K.storage].set_nickname(public, nickname)
    return web.json_response({"nickname": nickname, "listed": nickname is not None})


async def leaderboard(request: web.Request) -> web.Response:
    """``GET /api/leaderboard``: public; volunteers with a nickname, by validated CPU time."""
    return web.json_response({"volunteers": await request.app[K.storage].leaderboard()})


_VOLUNTEER_ID = {"name": "volunteer_id", "in": "path", "required": True, "schema": {"type": "string"}}
PATHS = {
    "/api/volunteers/{volunteer_id}/nickname": {
        "put": {
            "summary": 'A volunteer\'s opt-in public nickname (by its signed id; null or "" = not listed)',
            "security": [],
            "parameters": [_VOLUNTEER_ID],
            "requestBody": {
                "required": True,
                "content": {
                    "application/json": {
                        "schema": {
                            "type": "object",
                            "properties": {"nickname": {"type": "string", "maxLength": 32, "nullable": True}},
                            "required": ["nickname"],
                            "additionalProperties": False,
                        }
                    }
                },
            },
            "responses": {
                "200": {"description": "set"},
                **{str(c): {"description": "refused: {error}"} for c in (400, 404, 409, 413)},
            },
        }
    },
    "/api/leaderboard": {
        "get": {
            "summary": "Public: volunteers with a nickname, ranked by the CPU time of their validated results",
            "security": [],
            "responses": {"200": {"description": "the top 50: {volunteers: [{rank, nickname, ...}]}"}},
        }
    },
}


def add_routes(app: web.Application) -> None:
    app.router.add_put("/api/volunteers/{volunteer_id}/nickname", set_nickname)
    app.router.add_get("/api/leaderboard", leaderboard)
    openapi.add_paths(app, PATHS)
