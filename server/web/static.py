"""Static routes of the volunteer runtime: the page, the embed script, pinned npm assets, Python;
and the one page templating (``render_page`` + ``page_response``) the dashboard uses too.

``add_static_routes`` is called by the app factory. Versions of the npm assets come from
``public/package.json`` (pinned exactly, installed with ``npm ci``), so a new version is a new URL
and every vendored file can be cached for a year. Everything else is revalidated on each load.

Every page gets a Content-Security-Policy (``page_csp``) and every response ``nosniff``. The
Pyodide worker script gets its own, stricter policy (``worker_csp``), naming the configured public
origin: research code running in a worker can ``import js`` and call ``fetch``; the policy limits
what it can reach to the Pyodide files and the package index, so it cannot talk to our API or
websocket with the page's cookies. Paths are checked after resolving them, never as typed.
"""

from __future__ import annotations

import base64
import hashlib
import json
import mimetypes
import re
from collections.abc import Mapping
from pathlib import Path

from aiohttp import web

from server.config import Config
from server.web import appkeys as K

DEFAULT_PACKAGE_INDEX_URL = "https://cdn.jsdelivr.net/pyodide/v{version}/full/"
IMMUTABLE = "public, max-age=31536000, immutable"
REVALIDATE = "no-cache"
# npm package name -> (URL prefix under /vendor/, folder inside the package that is served)
VENDORED = {"pyodide": ("pyodide", ""), "@pyscript/core": ("pyscript", "dist")}
WORKER_SCRIPT = "worker.js"
NPM_FILES = ("node_modules", "package.json", "package-lock.json")  # under public/, never served from /static/
TOP_LEVEL_MODULES = {
    "protocol.py": "server/protocol.py",
    "supervisor.py": "workers/supervisor.py",
    "runner.py": "workers/runner.py",
}
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
    """The Python the browser may fetch, by its path under ``/py/``: an explicit allow-list.

    ``protocol``, ``supervisor`` and ``runner`` are top-level modules in the browser; the
    ``webapp`` package keeps its layout (``webapp/volunteer/main.py``), so its relative imports
    work there as in CPython.
    """
    sources = {name: root / path for name, path in TOP_LEVEL_MODULES.items()}
    for path in sorted((root / "webapp").rglob("*.py")):
        sources[path.relative_to(root).as_posix()] = path
    return sources


def pyscript_files(sources: Mapping[str, str | Path], app_name: str) -> str:
    """PyScript's ``files`` (JSON) for a page running ``webapp.<app_name>``: URL -> place in its FS."""
    wanted = [
        name
        for name in sources
        if name in ("protocol.py", "supervisor.py")
        or (name.startswith("webapp/") and (name.count("/") == 1 or name.startswith(f"webapp/{app_name}/")))
    ]
    return json.dumps({f"/py/{name}": f"./{name}" for name in wanted})


def content_type(path: Path) -> str:
    """The MIME type to send for ``path``; ``.mjs`` and ``.wasm`` are not in every system table."""
    suffix = path.suffix.lower()
    if suffix in _MIME:
        return _MIME[suffix]
    guessed, _ = mimetypes.guess_type(path.name)
    return guessed or "application/octet-stream"


def worker_csp(origin: str, pyodide_url: str, package_index_url: str) -> str:
    """The Content-Security-Policy of the worker script: Pyodide and the package index, no API.

    ``origin`` is the configured public origin, never the request's ``Host`` header (which a
    client chooses). ``connect-src`` lists paths, not the origin: ``fetch("/api/...")`` or a
    websocket back to us is refused, while Pyodide can still fetch its wasm, stdlib, lock file
    and packages.
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


def inline_script_hashes(text: str) -> list[str]:
    """CSP hash sources of the page's inline JavaScript (``<script>`` without ``src``).

    Computed from the rendered page, so the policy always matches what is served; Python
    blocks (``type="py"``) are not JavaScript and are left out.
    """
    hashes = []
    for attributes, body in _INLINE_SCRIPT.findall(text):
        if _SCRIPT_SRC.search(attributes):
            continue
        kind = _SCRIPT_TYPE.search(attributes)
        if kind is None or kind.group(1).lower() in ("module", "text/javascript", "importmap"):
            digest = base64.b64encode(hashlib.sha256(body.encode()).digest()).decode()
            hashes.append(f"'sha256-{digest}'")
    return hashes


def page_csp(text: str, frame_ancestors: tuple[str, ...]) -> str:
    """The Content-Security-Policy of a page: our own files, its own inline scripts, no plugins.

    The page runs PyScript, which needs ``'wasm-unsafe-eval'`` (to compile Pyodide) and
    ``'unsafe-eval'`` (its core builds functions with ``Function(...)``; checked in Chromium:
    without it the page's Python never starts). No inline script runs but the ones hashed here,
    and nothing from another origin. Research code never runs on the page: workers have their
    own, stricter policy (``worker_csp``). ``frame_ancestors`` empty: no one may frame the page.
    """
    script = " ".join(["'self'", "'wasm-unsafe-eval'", "'unsafe-eval'", *inline_script_hashes(text)])
    return "; ".join(
        [
            "default-src 'self'",
            f"script-src {script}",
            "style-src 'self' 'unsafe-inline'",
            "img-src 'self' data:",
            "connect-src 'self'",
            "worker-src 'self'",
            "object-src 'none'",
            "base-uri 'none'",
            "form-action 'self'",
            "frame-ancestors " + (" ".join(frame_ancestors) or "'none'"),
        ]
    )


def page_vars(config: Config | None, public_dir: Path, root: Path, app_name: str) -> dict[str, str]:
    """The placeholders of a page template: vendored URLs, the package index, its Python files."""
    urls = vendor_urls(public_dir)
    return {
        "%PYODIDE_URL%": urls["pyodide"],
        "%PYSCRIPT_URL%": urls["pyscript"],
        "%PACKAGE_INDEX_URL%": package_index_url(config, public_dir),
        "%PACKAGE_LOCK%": config.package_lock if config is not None else "pinned",
        "%PYSCRIPT_FILES%": pyscript_files(python_sources(root), app_name),
    }


def package_index_url(config: Config | None, public_dir: Path) -> str:
    """Where workers load a job's requirements from: ``UVM_PACKAGE_INDEX_URL`` or the pinned CDN."""
    configured = config.package_index_url if config is not None else ""
    return configured or DEFAULT_PACKAGE_INDEX_URL.format(version=pinned_versions(public_dir)["pyodide"])


def render_page(public_dir: Path, name: str, values: dict[str, str]) -> str:
    """The page template ``public/<name>`` with its placeholders filled in."""
    text = (public_dir / name).read_text()
    for key, value in values.items():
        text = text.replace(key, value)
    return text


def page_response(text: str, frame_ancestors: tuple[str, ...] = ()) -> web.Response:
    """A rendered page with its CSP; ``frame_ancestors``: who may frame it (none by default)."""
    headers = {"Cache-Control": REVALIDATE, "Content-Security-Policy": page_csp(text, frame_ancestors)}
    if not frame_ancestors:
        headers["X-Frame-Options"] = "DENY"  # for browsers that predate frame-ancestors
    return web.Response(text=text, content_type="text/html", headers=headers)


def public_origin(request: web.Request) -> str:
    """The origin volunteers reach us at: ``UVM_PUBLIC_URL``, else the address the server listens on.

    The fallback is the socket's own address (``uvm-compute serve`` sets ``UVM_PUBLIC_URL`` from
    ``--host``/``--port`` unless that is a wildcard), never the ``Host`` header a client sends.
    """
    config = request.app.get(K.config)
    if config is not None and config.public_url:
        return config.public_url
    sockname = request.transport.get_extra_info("sockname") if request.transport is not None else None
    if not sockname:
        raise web.HTTPServiceUnavailable(text="the server's own address is unknown; set UVM_PUBLIC_URL")
    host, port = str(sockname[0]), int(sockname[1])
    return f"{request.scheme}://{f'[{host}]' if ':' in host else host}:{port}"


async def _security_headers(request: web.Request, response: web.StreamResponse) -> None:
    # No response of ours is to be read as another type than it says (scripts, JSON, wasm).
    response.headers.setdefault("X-Content-Type-Options", "nosniff")


def _file_response(path: Path, cache: str) -> web.FileResponse:
    return web.FileResponse(path, headers={"Content-Type": content_type(path), "Cache-Control": cache})


def _inside(base: Path, relative: str) -> Path:
    """``base / relative`` if it resolves to a file inside ``base``; 404 otherwise (no ``..`` escapes)."""
    base = base.resolve()
    path = (base / relative).resolve()
    if not path.is_relative_to(base) or not path.is_file():
        raise web.HTTPNotFound()
    return path


def add_static_routes(
    app: web.Application,
    public_dir: Path,
    root: Path,
    *,
    package_index_url: str | None = None,
) -> None:
    """Serve ``/``, ``/embed.js``, ``/static/...``, ``/vendor/...`` and ``/py/<path>.py``.

    ``package_index_url`` overrides where workers load a job's requirements from (by default
    ``UVM_PACKAGE_INDEX_URL``, else Pyodide's CDN for the pinned version).
    """
    public_dir, root = Path(public_dir), Path(root)
    config = app.get(K.config)
    versions = pinned_versions(public_dir)
    urls = vendor_urls(public_dir)
    sources = python_sources(root)
    app.on_response_prepare.append(_security_headers)

    def volunteer_vars() -> dict[str, str]:
        values = page_vars(config, public_dir, root, "volunteer")
        if package_index_url:
            values["%PACKAGE_INDEX_URL%"] = package_index_url
        return values

    async def page(request: web.Request) -> web.Response:
        # Embeddable (public/embed.js): framed by our own pages and the configured embedding sites.
        ancestors = ("'self'", *(config.allowed_origins if config is not None else ()))
        return page_response(render_page(public_dir, "index.html", volunteer_vars()), ancestors)

    async def embed(request: web.Request) -> web.FileResponse:
        response = _file_response(public_dir / "embed.js", REVALIDATE)
        response.headers["Access-Control-Allow-Origin"] = "*"
        return response

    async def static(request: web.Request) -> web.FileResponse:
        index = volunteer_vars()["%PACKAGE_INDEX_URL%"]
        return _public_file(request, public_dir, urls["pyodide"], index)

    async def python(request: web.Request) -> web.FileResponse:
        path = sources.get(request.match_info["path"] + ".py")
        if path is None or not path.is_file():
            raise web.HTTPNotFound()
        return _file_response(path, REVALIDATE)

    async def leaderboard(request: web.Request) -> web.Response:
        return page_response(render_page(public_dir, "leaderboard.html", {}))

    app.router.add_get("/", page)
    app.router.add_get("/leaderboard", leaderboard)
    app.router.add_get("/embed.js", embed)
    app.router.add_get("/static/{path:.+}", static)
    app.router.add_get("/py/{path:[A-Za-z_][A-Za-z0-9_/]*}.py", python)
    for name, (prefix, folder) in VENDORED.items():
        base = public_dir / "node_modules" / name / folder
        app.router.add_get(f"/vendor/{prefix}/{versions[name]}/{{path:.+}}", _vendor_handler(base))


def _public_file(request: web.Request, public_dir: Path, pyodide_url: str, index_url: str) -> web.FileResponse:
    """A file of ``public/``, never node_modules or the npm manifests; the worker gets its CSP.

    Both checks compare resolved paths, so no spelling of the URL (``./``, ``%2e``, ``x/../``,
    doubled slashes) reaches the npm files or serves the worker script without its policy.
    """
    base = public_dir.resolve()
    path = _inside(base, request.match_info["path"])
    if any(path == base / name or path.is_relative_to(base / name) for name in NPM_FILES):
        raise web.HTTPNotFound()
    response = _file_response(path, REVALIDATE)
    if path == base / WORKER_SCRIPT:
        response.headers["Content-Security-Policy"] = worker_csp(public_origin(request), pyodide_url, index_url)
    return response


def _vendor_handler(base: Path):  # noqa: ANN202
    async def handler(request: web.Request) -> web.FileResponse:
        return _file_response(_inside(base, request.match_info["path"]), IMMUTABLE)

    return handler


_INLINE_SCRIPT = re.compile(r"<script\b([^>]*)>(.*?)</script>", re.DOTALL | re.IGNORECASE)
_SCRIPT_SRC = re.compile(r"\bsrc\s*=", re.IGNORECASE)
_SCRIPT_TYPE = re.compile(r"""\btype\s*=\s*["']?([^"'\s>]+)""", re.IGNORECASE)
