"""Database outages: noticed once, shown in /api/health and /metrics, and ridden out without a storm.

While the database is away, volunteers' results are answered with ``hold`` (keep them, send them
again after ``retry_after`` seconds, spread at random so that they do not all come back at once),
and nothing is acknowledged: an acknowledgement only ever follows a commit.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time

from sqlalchemy.exc import InterfaceError, OperationalError
from sqlalchemy.ext.asyncio import AsyncEngine

from server.store import stats

logger = logging.getLogger(__name__)
HOLD_MIN, HOLD_MAX = 5.0, 10.0  # seconds a volunteer waits before sending held results again


class DatabaseAway(Exception):
    """Results cannot be committed now; ``retry_after`` says when to send them again."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason
        self.retry_after = round(random.uniform(HOLD_MIN, HOLD_MAX), 1)


def is_outage(exc: BaseException) -> bool:
    """Errors that mean "the database cannot be reached", not "this statement is wrong"."""
    return isinstance(exc, OperationalError | InterfaceError | OSError | asyncio.TimeoutError)


class DbHealth:
    """Whether the database answers; ``down_since`` is the time of the first failure of an outage."""

    def __init__(self) -> None:
        self.down_since: float | None = None
        self.error = ""
        self.outages = 0

    def failed(self, exc: BaseException) -> None:
        """A database call failed as in an outage: note when it began (logged once per outage)."""
        self.error = f"{type(exc).__name__}: {str(exc)[:200]}"
        if self.down_since is None:
            self.down_since = time.time()
            self.outages += 1
            logger.error("database unreachable (%s): holding volunteers' results until it returns", self.error)

    def ok(self) -> None:
        """A database call succeeded: any outage is over."""
        if self.down_since is not None:
            logger.warning("database back after %.1f s", time.time() - self.down_since)
        self.down_since = None
        self.error = ""

    async def probe(self, engine: AsyncEngine) -> bool:
        """During an outage, ask the database whether it is back; returns whether it answers."""
        try:
            async with asyncio.timeout(5):
                await stats.ping(engine)
        except Exception as exc:  # noqa: BLE001 - still away: the outage goes on
            self.failed(exc)
            return False
        self.ok()
        return True

    def check(self) -> None:
        """Raise ``DatabaseAway`` during an outage (so a caller does not wait on the database)."""
        if self.down_since is not None:
            raise DatabaseAway(f"database unreachable for {time.time() - self.down_since:.0f} s")

    def as_dict(self) -> dict:
        """For /api/health: ``{"state": "up"}`` or the outage's age and last error."""
        if self.down_since is None:
            return {"state": "up"}
        return {"state": "down", "down_seconds": round(time.time() - self.down_since, 1), "error": self.error}
