"""The volunteer runtime's static routes: pages and their CSP, vendored assets, Python sources,
the worker's CSP, and the path checks, tried with raw request lines as an attacker would send them."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import re
from pathlib import Path

import pytest
from aiohttp import web

from server.config import Config
from server.web import appkeys as K
from server.web import dashboard
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
    for name in ("protocol", "runner", "supervisor", "webapp/calls", "webapp/volunteer/main", "webapp/dashboard/io"):
        resp = await client.get(f"/py/{name}.py")
        assert resp.status == 200, name
        assert resp.headers["Content-Type"].startswith("text/x-python")
    assert await (await client.get("/py/protocol.py")).text() == (ROOT / "server" / "protocol.py").read_text()
    for name in ("config", "crypto", "storage", "__init__", "app", "sim", "volunteer", "workers/sim", "server/config"):
        assert (await client.get(f"/py/{name}.py")).status == 404, name
    for line in ("/py/webapp/../server/config.py", "/py/webapp/%2e%2e/server/config.py", "/py//etc/passwd.py"):
        assert (await raw_get(client, line))[0] == 404, line


async def test_pages_list_exactly_their_package_files(client) -> None:
    page = await (await client.get("/")).text()
    config = json.loads(re.search(r"<script type=\"py\" config='(.*?)'>", page, re.DOTALL).group(1))
    files = config["files"]
    assert files["/py/webapp/volunteer/main.py"] == "./webapp/volunteer/main.py"
    assert files["/py/protocol.py"] == "./protocol.py" and "/py/webapp/pyworker.py" in files
    assert not [url for url in files if "dashboard" in url or "runner" in url]
    for url in files:  # every file the page asks for is served
        assert (await client.get(url)).status == 200, url


async def raw_get(client, target: str, host: str | None = None) -> tuple[int, dict[str, str]]:  # noqa: ANN001
    """Send ``GET target`` exactly as written (no client-side normalisation); status and headers."""
    reader, writer = await asyncio.open_connection(client.server.host, client.server.port)
    writer.write(f"GET {target} HTTP/1.1\r\nHost: {host or 'localhost'}\r\nConnection: close\r\n\r\n".encode())
    await writer.drain()
    head = (await reader.read()).split(b"\r\n\r\n", 1)[0].decode("latin-1").split("\r\n")
    writer.close()
    headers = dict(line.split(": ", 1) for line in head[1:])
    return int(head[0].split()[1]), headers


NPM_TRICKS = (
    "/static/../server/config.py",
    "/static/%2e%2e/pyproject.toml",
    "/static/package.json",
    "/static/./package.json",
    "/static/%2e/package-lock.json",
    "/static/x/../package.json",
    "/static/worker.js/../package.json",
    "/static//package.json",
    "/static/node_modules/pyodide/package.json",
    "/static/./node_modules/pyodide/package.json",
    "/static/%6eode_modules/pyodide/package.json",
    "/static/node_modules%2fpyodide%2fpackage.json",
    "/static/x/../node_modules/.installed",
    "/static/NODE_MODULES/pyodide/package.json",
    "/vendor/pyodide/314.0.7/../../../pyproject.toml",
    "/vendor/pyodide/314.0.7/%2e%2e/%2e%2e/package.json",
    "/vendor/pyodide/0.0.1/pyodide.mjs",
)


@pytest.mark.parametrize("target", NPM_TRICKS)
async def test_no_escape_from_public(client, target: str) -> None:
    assert (await raw_get(client, target))[0] == 404, target


WORKER_SPELLINGS = ("/static/worker.js", "/static/./worker.js", "/static/x/../worker.js", "/static/%77orker.js")


@pytest.mark.parametrize("target", [*WORKER_SPELLINGS, "/static//worker.js"])
async def test_every_path_to_the_worker_script_carries_its_csp(client, target: str) -> None:
    status, headers = await raw_get(client, target, host="evil.example")
    assert status == 404 or "connect-src" in headers["Content-Security-Policy"], (target, status)
    if status == 200:
        assert "evil.example" not in headers["Content-Security-Policy"]  # not from the Host header


async def test_worker_script_has_a_restrictive_csp(client) -> None:
    resp = await client.get("/static/worker.js")
    assert resp.status == 200 and resp.headers["Content-Type"].startswith("text/javascript")
    csp = resp.headers["Content-Security-Policy"]
    host = f"http://{client.server.host}:{client.server.port}"  # no UVM_PUBLIC_URL: the listen address
    connect = next(d for d in csp.split("; ") if d.startswith("connect-src"))
    assert f"{host}/vendor/pyodide/314.0.7/" in connect
    assert f"{host}/py/runner.py" in connect
    assert "'self'" not in connect and f"{host} " not in connect + " " and "/api" not in connect
    assert "default-src 'none'" in csp and "worker-src 'none'" in csp
    assert "'unsafe-eval'" not in csp and "'wasm-unsafe-eval'" in csp
    assert "connect-src" not in (await client.get("/static/vault.js")).headers.get("Content-Security-Policy", "")


@pytest.fixture
async def configured(aiohttp_client):
    """The static routes and the dashboard page under a public URL and one embedding site."""
    app = web.Application()
    app[K.config] = Config(public_url="https://compute.example.edu", allowed_origins=("https://lab.example.org",))
    add_static_routes(app, PUBLIC, ROOT)
    app.router.add_get("/dashboard", dashboard.page)
    return await aiohttp_client(app)


async def test_worker_csp_names_the_public_url_whatever_the_host_header(configured) -> None:
    for host in ("evil.example", f"{configured.server.host}:{configured.server.port}"):
        status, headers = await raw_get(configured, "/static/worker.js", host=host)
        csp = headers["Content-Security-Policy"]
        assert status == 200 and "https://compute.example.edu/vendor/pyodide/314.0.7/" in csp, csp
        assert "evil.example" not in csp and str(configured.server.port) not in csp


def inline_hashes(page: str) -> set[str]:
    found = set()
    for attributes, body in re.findall(r"<script\b([^>]*)>(.*?)</script>", page, re.DOTALL):
        if "src=" not in attributes and 'type="py"' not in attributes:
            found.add("'sha256-" + base64.b64encode(hashlib.sha256(body.encode()).digest()).decode() + "'")
    return found


@pytest.mark.parametrize(("path", "ancestors"), [("/", "'self' https://lab.example.org"), ("/dashboard", "'none'")])
async def test_pages_have_a_csp_nosniff_and_who_may_frame_them(configured, path: str, ancestors: str) -> None:
    resp = await configured.get(path)
    page = await resp.text()
    assert resp.status == 200 and resp.headers["X-Content-Type-Options"] == "nosniff"
    csp = dict(d.split(" ", 1) for d in resp.headers["Content-Security-Policy"].split("; "))
    assert csp["frame-ancestors"] == ancestors
    assert ("X-Frame-Options" in resp.headers) == (ancestors == "'none'")
    script = csp["script-src"].split()
    assert "'unsafe-inline'" not in script and "'wasm-unsafe-eval'" in script
    assert "'unsafe-eval'" in script  # PyScript's core calls Function(): the page's Python needs it
    hashes = inline_hashes(page)
    assert hashes and hashes == {s for s in script if s.startswith("'sha256-")}  # each inline script, no other
    assert csp["object-src"] == "'none'" and csp["connect-src"] == "'self'"


async def test_every_response_says_nosniff(configured) -> None:
    for path in ("/static/worker.js", "/py/protocol.py", "/embed.js", "/vendor/pyscript/0.7.31/core.js", "/nowhere"):
        assert (await configured.get(path)).headers["X-Content-Type-Options"] == "nosniff", path


async def test_embed_script_is_cross_origin(client) -> None:
    resp = await client.get("/embed.js")
    assert resp.status == 200 and resp.headers["Access-Control-Allow-Origin"] == "*"


def test_serve_names_its_listen_address_as_the_public_url_unless_a_wildcard() -> None:
    from server.cli import listen_origin

    assert listen_origin("127.0.0.1", 8080) == "http://127.0.0.1:8080"
    assert listen_origin("::1", 8080) == "http://[::1]:8080"
    assert listen_origin("compute.example.edu", 80) == "http://compute.example.edu:80"
    for wildcard in ("0.0.0.0", "::", ""):  # each interface is its own origin: the socket's address is used
        assert listen_origin(wildcard, 8080) == ""
