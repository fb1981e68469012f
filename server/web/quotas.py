"""Per-researcher request rate (a token bucket per researcher on this instance) and the operators'
endpoint that sets a researcher's fair-share weight and quotas."""

from __future__ import annotations

import math
import time
from typing import Any

from aiohttp import web

from server.store.models import LIMIT_FIELDS, Limits, QuotaExceeded

BURST = 2.0  # a bucket holds this many seconds of a researcher's rate
MAX_BUCKETS = 100_000  # researchers remembered; the oldest idle ones are forgotten first
# What an operator may set, and the largest value each accepts (a typo of six zeros is refused)
BOUNDS: dict[str, tuple[type, float]] = {
    "share": (float, 1e6),
    "max_queued_tasks": (int, 1e12),
    "max_stored_bytes": (int, 1e15),
    "max_requests_per_second": (float, 1e6),
}


class RequestBudget:
    """Token buckets: ``rate`` requests a second per researcher, bursts of ``BURST * rate``."""

    def __init__(self) -> None:
        self._buckets: dict[int, tuple[float, float]] = {}  # researcher -> (tokens, when)

    def take(self, researcher_id: int, rate: float, now: float | None = None) -> None:
        """Spend one request, or raise ``QuotaExceeded`` saying when the next one is allowed."""
        now = time.monotonic() if now is None else now
        size = max(1.0, BURST * rate)  # at least one request, however low the rate
        tokens, at = self._buckets.pop(researcher_id, (size, now))
        tokens = min(size, tokens + (now - at) * rate)
        if tokens < 1.0:
            self._buckets[researcher_id] = (tokens, now)
            wait = (1.0 - tokens) / rate
            raise QuotaExceeded(
                f"request-rate quota: at most {rate:g} requests per second (bursts of {size:g}); "
                f"try again in {wait:.2f} s",
                retry_after=wait,
            )
        self._buckets[researcher_id] = (tokens - 1.0, now)  # re-inserted: dict order = least recent first
        while len(self._buckets) > MAX_BUCKETS:
            del self._buckets[next(iter(self._buckets))]


BUDGET = web.AppKey("request_budget", RequestBudget)


def parse_limits(body: object) -> dict[str, Any]:
    """The operator's JSON object: known fields only; each a number in range, or null (the default)."""
    if not isinstance(body, dict) or not body:
        raise ValueError(f"send a JSON object with some of: {', '.join(LIMIT_FIELDS)}")
    unknown = sorted(set(body) - set(LIMIT_FIELDS))
    if unknown:
        raise ValueError(f"unknown field {unknown[0][:40]!r}; known: {', '.join(LIMIT_FIELDS)}")
    out: dict[str, Any] = {}
    for name, value in body.items():
        kind, top = BOUNDS[name]
        if value is None:
            out[name] = None
            continue
        if (
            isinstance(value, bool)
            or not isinstance(value, int | float)
            or (kind is int and not isinstance(value, int))
        ):
            raise ValueError(f"{name}: expected {'an integer' if kind is int else 'a number'} or null")
        positive = name in ("share", "max_requests_per_second")
        if not math.isfinite(value) or value > top or value < 0 or (positive and value == 0):
            raise ValueError(f"{name}: must be {'> 0' if positive else '>= 0'} and at most {top:g}")
        out[name] = kind(value)
    return out


def limits_dict(researcher_id: int, limits: Limits) -> dict:
    return {"id": researcher_id, **{name: getattr(limits, name) for name in LIMIT_FIELDS}}


def quota_response(exc: QuotaExceeded) -> web.Response:
    """429 with the message; ``Retry-After`` when waiting helps."""
    response = web.json_response({"error": str(exc)}, status=429)
    if exc.retry_after is not None:
        response.headers["Retry-After"] = str(max(1, math.ceil(exc.retry_after)))
    return response
