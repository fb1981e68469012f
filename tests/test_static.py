"""The volunteer runtime's static routes: page, vendored assets, Python sources, worker CSP."""

from __future__ import annotations

from pathlib import Path

import pytest
from aiohttp import web

from server.web.static import IMMUTABLE, add_static_routes, pinned_versions

ROOT = Path(__file__).resolve().parent.parent
PUBLIC = ROOT / "public"
needs_npm = pytest.mark.skipif(not (PUBLIC / "node_modules").is_dir(), reason="run `npm ci` in public/")


@pytest.fixture
async def client(aiohttp_client):
    app = web.Application()
    add_static_routes(app, PUBLIC, ROOT)
    return await aiohttp_client(app)


def test_versions_are_pinned_exactly() -> None:
    assert pinned_versions(PUBLIC) == {"pyodide": "314.0.7", "@pyscript/core": "0.7.31"}


async def test_page_points_at_versioned_assets(client) -> None:
    resp = await client.get("/")
    text = await resp.text()
    assert resp.status == 200 and resp.headers["Cache-Control"] == "no-cache"
    assert "/vendor/pyscript/0.7.31/core.js" in text
    assert '"interpreter": "/vendor/pyodide/314.0.7/pyodide.mjs"' in text
    assert "%" + "PYODIDE_URL%" not in text


@needs_npm
@pytest.mark.parametrize(
    ("path", "mime"),
    [
        ("/vendor/pyodide/314.0.7/pyodide.mjs", "text/javascript"),
        ("/vendor/pyodide/314.0.7/pyodide.asm.wasm", "application/wasm"),
        ("/vendor/pyodide/314.0.7/python_stdlib.zip", "application/zip"),
        ("/vendor/pyscript/0.7.31/core.js", "text/javascript"),
        ("/vendor/pyscript/0.7.31/core.css", "text/css"),
    ],
)
async def test_vendored_assets_are_immutable(client, path: str, mime: str) -> None:
    resp = await client.head(path) if path.endswith(".wasm") else await client.get(path)
    assert resp.status == 200
    assert resp.headers["Content-Type"].startswith(mime)
    assert resp.headers["Cache-Control"] == IMMUTABLE


async def test_python_sources_are_an_allow_list(client) -> None:
    for name in ("protocol", "runner", "supervisor", "volunteer", "volunteer_pool"):
        resp = await client.get(f"/py/{name}.py")
        assert resp.status == 200, name
        assert resp.headers["Content-Type"].startswith("text/x-python")
    for name in ("config", "crypto", "storage", "__init__", "app"):
        assert (await client.get(f"/py/{name}.py")).status == 404, name


async def test_no_escape_from_public(client) -> None:
    for path in (
        "/static/../server/config.py",
        "/static/%2e%2e/pyproject.toml",
        "/static/package.json",
        "/static/node_modules/pyodide/package.json",
        "/vendor/pyodide/314.0.7/../../../pyproject.toml",
        "/vendor/pyodide/0.0.1/pyodide.mjs",
    ):
        assert (await client.get(path)).status == 404, path


async def test_worker_script_has_a_restrictive_csp(client) -> None:
    resp = await client.get("/static/worker.js")
    assert resp.status == 200 and resp.headers["Content-Type"].startswith("text/javascript")
    csp = resp.headers["Content-Security-Policy"]
    host = f"http://{client.server.host}:{client.server.port}"
    connect = next(d for d in csp.split("; ") if d.startswith("connect-src"))
    assert f"{host}/vendor/pyodide/314.0.7/" in connect
    assert f"{host}/py/runner.py" in connect
    assert "'self'" not in connect and f"{host} " not in connect + " " and "/api" not in connect
    assert "default-src 'none'" in csp and "worker-src 'none'" in csp
    assert "'unsafe-eval'" not in csp and "'wasm-unsafe-eval'" in csp
    assert "Content-Security-Policy" not in (await client.get("/static/vault.js")).headers


async def test_embed_script_is_cross_origin(client) -> None:
    resp = await client.get("/embed.js")
    assert resp.status == 200 and resp.headers["Access-Control-Allow-Origin"] == "*"
