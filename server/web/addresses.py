"""Who is calling: the client's address, used by per-address limits and the sign-in limiter.

One function so that every limit keys on the same thing. Today it is the socket's peer address;
behind a reverse proxy that is the proxy's (trusted proxies' forwarded headers are for this
function to read, and for nothing else).
"""

from __future__ import annotations

import ipaddress

from aiohttp import web


def client_address(request: web.Request) -> str:
    """The client's IP address as a string (``"?"`` when the transport does not know it)."""
    return request.remote or "?"


def is_loopback(address: str) -> bool:
    """True for 127.0.0.0/8 and ::1: the same machine (tests, ``volunteer-sim``, benchmarks)."""
    try:
        return ipaddress.ip_address(address).is_loopback
    except ValueError:
        return False
