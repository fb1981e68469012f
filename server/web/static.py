"""Static routes of the volunteer runtime: the page, the embed script, pinned npm assets, Python.

``add_static_routes`` is called by the app factory. Versions of the npm assets come from
``public/package.json`` (pinned exactly, installed with ``npm ci``), so a new version is a new URL
and every vendored file can be cached for a year. Everything else is revalidated on each load.

The Pyodide worker script gets its own Content-Security-Policy: research code running in a
worker can ``import js`` and call ``fetch``; the policy limits what it can reach to the Pyodide
files and the package index, so it cannot talk to our API or websocket with the page's cookies.
"""

from __future__ import annotations

import json
import mimetypes
from pathlib import Path

from aiohttp import web

from server.web import appkeys as K

DEFAULT_PACKAGE_INDEX_URL = "https://cdn.jsdelivr.net/pyodide/v{version}/full/"
IMMUTABLE = "public, max-age=31536000, immutable"
REVALIDATE = "no-cache"
# npm package name -> (URL prefix under /vendor/, folder inside the package that is served)
VENDORED = {"pyodide": ("pyodide", ""), "@pyscript/core": ("pyscript", "dist")}
WORKER_SCRIPT = "worker.js"
_MIME = {
    ".mjs": "text/javascript",
    ".js": "text/javascript",
    ".wasm": "application/wasm",
    ".json": "application/json",
    ".css": "text/css",
    ".html": "text/html",
    ".zip": "application/zip",
    ".map": "application/json",
    ".py": "text/x-python",
    ".svg": "image/svg+xml",
    ".png": "image/png",
    ".whl": "application/zip",
}


def pinned_versions(public_dir: Path) -> dict[str, str]:
    """The exact versions pinned in ``public/package.json``, by npm package name."""
    deps = json.loads((public_dir / "package.json").read_text())["dependencies"]
    return {name: deps[name] for name in VENDORED}


def vendor_urls(public_dir: Path) -> dict[str, str]:
    """URL prefixes (ending in ``/``) of the vendored packages: ``{"pyodide": ..., "pyscript": ...}``."""
    versions = pinned_versions(public_dir)
    return {prefix: f"/vendor/{prefix}/{versions[name]}/" for name, (prefix, _) in VENDORED.items()}


def python_sources(root: Path) -> dict[str, Path]:
    """The Python modules the browser may fetch from ``/py/<name>.py``: an explicit allow-list."""
    sources = {"protocol.py": root / "server" / "protocol.py"}
    for folder in ("workers", "webapp"):
        for path in sorted((root / folder).glob("*.py")):
            if path.name not in ("__init__.py", "sim.py"):  # sim.py is the headless volunteer, not browser code
                sources[path.name] = path
    return sources


def content_type(path: Path) -> str:
    """The MIME type to send for ``path``; ``.mjs`` and ``.wasm`` are not in every system table."""
    suffix = path.suffix.lower()
    if suffix in _MIME:
        return _MIME[suffix]
    guessed, _ = mimetypes.guess_type(path.name)
    return guessed or "application/octet-stream"


def worker_csp(origin: str, pyodide_url: str, package_index_url: str) -> str:
    """The Content-Security-Policy of the worker script: Pyodide and the package index, no API.

    ``connect-src`` lists paths, not the origin: ``fetch("/api/...")`` or a websocket back to
    us is refused, while Pyodide can still fetch its wasm, stdlib, lock file and packages.
    """
    pyodide = origin + pyodide_url
    runner = origin + "/py/runner.py"
    index = package_index_url if "://" in package_index_url else origin + package_index_url
    return "; ".join(
        [
            "default-src 'none'",
            "worker-src 'none'",
            f"script-src {pyodide} {index} 'wasm-unsafe-eval'",
            f"connect-src {pyodide} {runner} {index}",
            "base-uri 'none'",
            "form-action 'none'",
        ]
    )


def _file_response(path: Path, cache: str) -> web.FileResponse:
    return web.FileResponse(path, headers={"Content-Type": content_type(path), "Cache-Control": cache})


def _inside(base: Path, relative: str) -> Path:
    """``base / relative`` if it is a file inside ``base``; 404 otherwise (no ``..`` escapes)."""
    base = base.resolve()
    path = (base / relative).resolve()
    if not path.is_relative_to(base) or not path.is_file():
        raise web.HTTPNotFound()
    return path


def render_page(public_dir: Path, page_vars: dict[str, str]) -> str:
    """``public/index.html`` with the vendored URLs and the package index filled in."""
    text = (public_dir / "index.html").read_text()
    for key, value in page_vars.items():
        text = text.replace(key, value)
    return text


def add_static_routes(
    app: web.Application,
    public_dir: Path,
    root: Path,
    *,
    package_index_url: str | None = None,
) -> None:
    """Serve ``/``, ``/embed.js``, ``/static/...``, ``/vendor/...`` and ``/py/<name>.py``.

    ``package_index_url`` is where workers load a job's requirements from (Pyodide's CDN for
    the pinned version by default; a self-hosted full distribution in closed deployments).
    """
    public_dir = Path(public_dir)
    config = app.get(K.config)
    if package_index_url is None and config is not None:
        package_index_url = config.package_index_url or None  # set by UVM_PACKAGE_INDEX_URL
    versions = pinned_versions(public_dir)
    urls = vendor_urls(public_dir)
    index_url = package_index_url or DEFAULT_PACKAGE_INDEX_URL.format(version=versions["pyodide"])
    sources = python_sources(Path(root))
    page_vars = {"%PYODIDE_URL%": urls["pyodide"], "%PYSCRIPT_URL%": urls["pyscript"], "%PACKAGE_INDEX_URL%": index_url}

    async def page(request: web.Request) -> web.Response:
        text = render_page(public_dir, page_vars)
        return web.Response(text=text, content_type="text/html", headers={"Cache-Control": REVALIDATE})

    async def embed(request: web.Request) -> web.FileResponse:
        response = _file_response(public_dir / "embed.js", REVALIDATE)
        response.headers["Access-Control-Allow-Origin"] = "*"
        return response

    async def static(request: web.Request) -> web.FileResponse:
        return _public_file(request, public_dir, urls["pyodide"], index_url)

    async def python(request: web.Request) -> web.FileResponse:
        path = sources.get(request.match_info["name"] + ".py")
        if path is None or not path.is_file():
            raise web.HTTPNotFound()
        return _file_response(path, REVALIDATE)

    app.router.add_get("/", page)
    app.router.add_get("/embed.js", embed)
    app.router.add_get("/static/{path:.+}", static)
    app.router.add_get("/py/{name:[A-Za-z_][A-Za-z0-9_]*}.py", python)
    for name, (prefix, folder) in VENDORED.items():
        base = public_dir / "node_modules" / name / folder
        app.router.add_get(f"/vendor/{prefix}/{versions[name]}/{{path:.+}}", _vendor_handler(base))


def _public_file(request: web.Request, public_dir: Path, pyodide_url: str, index_url: str) -> web.FileResponse:
    """A file of ``public/`` (never node_modules or the npm manifests); CSP on the worker."""
    relative = request.match_info["path"]
    if relative.split("/", 1)[0] in ("node_modules", "package.json", "package-lock.json"):
        raise web.HTTPNotFound()
    response = _file_response(_inside(public_dir, relative), REVALIDATE)
    if relative == WORKER_SCRIPT:
        origin = f"{request.scheme}://{request.host}"
        response.headers["Content-Security-Policy"] = worker_csp(origin, pyodide_url, index_url)
    return response


def _vendor_handler(base: Path):
    async def handler(request: web.Request) -> web.FileResponse:
        return _file_response(_inside(base, request.match_info["path"]), IMMUTABLE)

    return handler
