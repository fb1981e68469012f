"""Who is calling: the client's address and scheme, believing ``X-Forwarded-*`` from trusted proxies only.

Behind a reverse proxy every request comes from the proxy's address. ``UVM_TRUSTED_PROXIES`` names
the proxies whose ``X-Forwarded-For`` and ``X-Forwarded-Proto`` headers are believed; from anyone
else those headers are ignored (a client could write anything in them). The address found here is
the one per-address limits and replica placement use, and the scheme decides the cookie's ``Secure``.
"""

from __future__ import annotations

import functools
import ipaddress
from collections.abc import Awaitable, Callable

from aiohttp import web

from server.web import appkeys as K

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


@functools.lru_cache(maxsize=16)
def _networks(names: tuple[str, ...]) -> tuple[Network, ...]:
    return tuple(ipaddress.ip_network(n, strict=False) for n in names)


def _within(address: str, networks: tuple[Network, ...]) -> bool:
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return False
    return any(ip in net for net in networks)


def in_networks(address: str, names: tuple[str, ...]) -> bool:
    """Whether ``address`` lies in one of the networks named (``10.0.0.0/8``, ``::1``...)."""
    return bool(names) and _within(address, _networks(names))


def client_address(request: web.Request) -> str:
    """The caller's address: ``request.remote``, or from a trusted proxy the nearest address in
    ``X-Forwarded-For`` that is not itself a trusted proxy (a client may prepend anything, so the
    list is read from the right)."""
    remote = request.remote or "?"
    trusted = _networks(request.app[K.config].trusted_proxies)
    if not trusted or not _within(remote, trusted):
        return remote
    hops = [h.strip() for value in request.headers.getall("X-Forwarded-For", []) for h in value.split(",")]
    for hop in reversed(hops):
        try:
            ipaddress.ip_address(hop)
        except ValueError:
            return remote  # a malformed hop: believe nothing beyond the proxy itself
        if not _within(hop, trusted):
            return hop
    return hops[0] if hops else remote


def client_scheme(request: web.Request) -> str:
    """``https`` when a trusted proxy says the client used TLS (``X-Forwarded-Proto``)."""
    trusted = _networks(request.app[K.config].trusted_proxies)
    if trusted and _within(request.remote or "", trusted):
        proto = request.headers.get("X-Forwarded-Proto", "").split(",")[-1].strip().lower()
        if proto in ("http", "https"):
            return proto
    return request.scheme


@web.middleware
async def proxy_middleware(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    """Behind a trusted proxy, handlers see the client's address and scheme (``request.remote``,
    ``request.secure``, the websocket ``Origin`` check), not the proxy's."""
    if request.app[K.config].trusted_proxies:
        address, scheme = client_address(request), client_scheme(request)
        if address != request.remote or scheme != request.scheme:
            request = request.clone(remote=address, scheme=scheme)
    return await handler(request)


def is_loopback(address: str) -> bool:
    """True for 127.0.0.0/8 and ::1: the same machine (tests, ``volunteer-sim``, benchmarks)."""
    try:
        return ipaddress.ip_address(address).is_loopback
    except ValueError:
        return False
