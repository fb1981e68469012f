"""The OpenAPI document of the researchers' API, served at ``/api/openapi.json``.

The document is data: ``COMPONENTS`` and ``PATHS`` here for the core API, and the paths each other
module documents (the dashboard's ``DASHBOARD_PATHS``) added with ``add_paths`` when its routes are
added. ``tests/test_units.py`` checks that every ``/api/`` route of the app is documented and vice versa.
"""

from __future__ import annotations

from aiohttp import web

from server.store.storage import THROUGHPUT_WINDOW

_JOB_ID = {"name": "job_id", "in": "path", "required": True, "schema": {"type": "integer"}}
_ERROR = {
    "description": "error",
    "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}},
}
_JSON = "application/json"


def _ok(description: str, schema: dict | None = None) -> dict:
    out: dict = {"description": description}
    if schema is not None:
        out["content"] = {_JSON: {"schema": schema}}
    return out


def _errors(*codes: int) -> dict:
    return {str(code): _ERROR for code in codes}


JOB_REF = {"$ref": "#/components/schemas/Job"}

COMPONENTS: dict = {
    "securitySchemes": {
        "bearer": {"type": "http", "scheme": "bearer"},
        "session": {"type": "apiKey", "in": "cookie", "name": "uvm_session"},
    },
    "schemas": {
        "Error": {
            "type": "object",
            "required": ["error"],
            "properties": {
                "error": {"type": "string"},
                "line": {"type": "integer", "description": "line of a syntax error"},
                "field": {"type": "string"},
            },
        },
        "NewJob": {
            "type": "object",
            "required": ["code"],
            "additionalProperties": False,
            "properties": {
                "code": {"type": "string", "description": "Python source defining main(x)"},
                "inputs": {
                    "nullable": True,
                    "description": 'a JSON list, {"range": [start, stop, step]}, or null (one task, x=None)',
                    "oneOf": [
                        {"type": "array", "items": {}},
                        {
                            "type": "object",
                            "description": "job B's inputs are job A's results: all at once once A has "
                            "finished (results_of), or each as soon as it completes (after: a pipeline)",
                            "properties": {"results_of": {"type": "integer"}, "after": {"type": "integer"}},
                            "minProperties": 1,
                            "maxProperties": 1,
                        },
                        {
                            "type": "object",
                            "required": ["range"],
                            "properties": {
                                "range": {
                                    "type": "array",
                                    "items": {"type": "integer"},
                                    "minItems": 1,
                                    "maxItems": 3,
                                }
                            },
                        },
                    ],
                },
                "name": {"type": "string", "maxLength": 200},
                "description": {
                    "type": "string",
                    "maxLength": 500,
                    "description": "public: shown to the volunteers who compute the job",
                },
                "timeout": {"type": "number", "description": "seconds per task", "default": 60},
                "max_attempts": {"type": "integer", "minimum": 1, "maximum": 20, "default": 3},
                "priority": {"type": "integer", "minimum": -100, "maximum": 100, "default": 0},
                "requirements": {"type": "array", "items": {"type": "string"}},
                "replication": {
                    "oneOf": [
                        {"type": "integer", "minimum": 1, "maximum": 10},
                        {"type": "string", "enum": ["adaptive"]},
                    ],
                    "description": "volunteers per task, or adaptive (trusted volunteers are spot-checked);"
                    " default UVM_DEFAULT_REPLICATION",
                },
                "quorum": {"type": "integer", "minimum": 1, "description": "agreeing results; default k//2+1"},
                "max_replicas": {"type": "integer", "maximum": 20, "description": "default k+3"},
                "tolerance": {
                    "type": "object",
                    "properties": {"rtol": {"type": "number"}, "atol": {"type": "number"}},
                    "additionalProperties": False,
                },
            },
        },
        "Counts": {
            "type": "object",
            "properties": {
                s: {"type": "integer"} for s in ("queued", "running", "leased", "done", "failed", "cancelled")
            },
            "description": "running: computed by a worker now; leased: handed out, waiting in a volunteer's prefetch",
        },
        "Job": {
            "type": "object",
            "properties": {
                "id": {"type": "integer"},
                "name": {"type": "string"},
                "description": {"type": "string"},
                "state": {"type": "string", "enum": ["queued", "running", "done", "failed", "cancelled"]},
                "n_tasks": {"type": "integer"},
                "counts": {"$ref": "#/components/schemas/Counts"},
                "throughput": {
                    "type": "number",
                    "description": f"tasks/s: over the last {THROUGHPUT_WINDOW:g} s while running; once ended,"
                    " tasks / (last finish - first start)",
                },
                "volunteers": {"type": "integer", "description": "distinct volunteers computing it now"},
                "created_at": {"type": "number"},
                "started_at": {"type": "number", "nullable": True},
                "finished_at": {"type": "number", "nullable": True},
            },
        },
    },
}

PATHS: dict = {
    "/api/jobs": {
        "post": {
            "summary": "Submit a job (429: a quota of yours, queued tasks or stored result bytes, "
            "would be passed; every endpoint answers 429 with Retry-After past your requests per second)",
            "requestBody": {
                "required": True,
                "content": {_JSON: {"schema": {"$ref": "#/components/schemas/NewJob"}}},
            },
            "responses": {
                "201": _ok(
                    "created",
                    {
                        "type": "object",
                        "properties": {"id": {"type": "integer"}, "n_tasks": {"type": "integer"}},
                    },
                ),
                **_errors(400, 401, 413, 429),
            },
        },
        "get": {
            "summary": "My jobs, newest first",
            "responses": {
                "200": _ok("jobs", {"type": "object", "properties": {"jobs": {"type": "array", "items": JOB_REF}}}),
                **_errors(401),
            },
        },
    },
    "/api/jobs/{job_id}": {
        "get": {
            "summary": "A job's status",
            "parameters": [_JOB_ID],
            "responses": {"200": _ok("job", JOB_REF), **_errors(401, 404)},
        }
    },
    "/api/jobs/{job_id}/cancel": {
        "post": {
            "summary": "Cancel a job",
            "parameters": [_JOB_ID],
            "responses": {"200": _ok("job", JOB_REF), **_errors(401, 404)},
        }
    },
    "/api/jobs/{job_id}/retry": {
        "post": {
            "summary": "Queue the failed tasks of a job again",
            "parameters": [_JOB_ID],
            "responses": {
                "200": _ok("retried", {"type": "object", "properties": {"retried": {"type": "integer"}}}),
                **_errors(401, 404, 409),
            },
        }
    },
    "/api/jobs/{job_id}/results": {
        "get": {
            "summary": "Results in input order (streamed)",
            "parameters": [
                _JOB_ID,
                {
                    "name": "format",
                    "in": "query",
                    "schema": {"type": "string", "enum": ["txt", "json", "ndjson", "csv"], "default": "json"},
                },
                {
                    "name": "start",
                    "in": "query",
                    "description": "first input index (paging)",
                    "schema": {"type": "integer", "minimum": 0, "default": 0},
                },
                {
                    "name": "limit",
                    "in": "query",
                    "description": "at most this many tasks",
                    "schema": {"type": "integer", "minimum": 0},
                },
            ],
            "responses": {"200": _ok("the results file"), **_errors(400, 401, 404)},
        }
    },
    "/api/jobs/{job_id}/errors": {
        "get": {
            "summary": "Failed attempts' errors with tracebacks, and grouped by message",
            "parameters": [_JOB_ID],
            "responses": {"200": _ok("errors", {"type": "object"}), **_errors(401, 404)},
        }
    },
    "/api/jobs/{job_id}/finished": {
        "get": {
            "summary": "Finished task indices from `start`, as runs [a, b): fetch each result once, by range",
            "parameters": [_JOB_ID, {"name": "start", "in": "query", "schema": {"type": "integer"}}],
            "responses": {"200": _ok("runs and where to go on", {"type": "object"}), **_errors(400, 401, 404)},
        }
    },
    "/api/events": {
        "get": {
            "summary": "Websocket: live status of my jobs ({type: job, ...Job})",
            "parameters": [{"name": "job", "in": "query", "schema": {"type": "integer"}}],
            "responses": {"101": _ok("switching protocols"), **_errors(401, 403)},
        }
    },
    "/api/volunteers/{volunteer_id}": {
        "get": {
            "summary": "A volunteer's all-time contribution: by its signed id (the volunteer itself, "
            "no credentials) or by its public id (signed-in researchers)",
            "parameters": [{"name": "volunteer_id", "in": "path", "required": True, "schema": {"type": "string"}}],
            "responses": {"200": _ok("stats", {"type": "object"}), **_errors(401, 403, 404)},
        }
    },
    "/api/health": {
        "get": {
            "summary": "Liveness, database state and queue depth",
            "security": [],
            "responses": {
                "200": _ok("ok", {"type": "object"}),
                "503": _ok("the database is unreachable (since when, and why)", {"type": "object"}),
            },
        }
    },
    "/api/openapi.json": {
        "get": {
            "summary": "This document",
            "security": [],
            "responses": {"200": _ok("OpenAPI 3 document", {"type": "object"})},
        }
    },
}

DOCUMENTED = web.AppKey("openapi_paths", dict)


def add_paths(app: web.Application, paths: dict) -> None:
    """Document routes a module adds to the app (path -> method -> OpenAPI operation)."""
    app.setdefault(DOCUMENTED, {}).update(paths)


def document(app: web.Application) -> dict:
    """The OpenAPI document of this app: the core API and what the other modules added."""
    return {
        "openapi": "3.0.3",
        "info": {"title": "UVM Compute researchers' API", "version": "1"},
        "components": COMPONENTS,
        "security": [{"bearer": []}, {"session": []}],
        "paths": app.get(DOCUMENTED, {}),
    }


async def serve(request: web.Request) -> web.Response:
    return web.json_response(document(request.app))


def add_routes(app: web.Application) -> None:
    app.router.add_get("/api/openapi.json", serve)
    add_paths(app, PATHS)
