"""Background loops under supervision: one that fails is logged by name and restarted with backoff.

``Supervisor.run`` starts every loop and keeps it running until it is cancelled (the server stops):
a loop that raises is logged with its name, waits (exponential backoff, capped) and starts again;
the others carry on meanwhile. A loop that returns has finished on purpose (the bus after
``Bus.stop``) and is not restarted.

Each loop's ``LoopState`` is a plain dataclass in ``Supervisor.loops``: ``/api/health`` shows them
and ``/metrics`` may read ``restarts``. A loop calls ``ok()`` on its state after each unit of work;
a loop that did work since its last start restarts after the shortest delay again.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

logger = logging.getLogger(__name__)

Loop = Callable[[], Awaitable[None]]


@dataclasses.dataclass
class LoopState:
    """What is known of one background loop."""

    name: str
    state: str = "starting"  # starting | running | restarting | stopped
    restarts: int = 0
    last_error: str | None = None
    last_error_at: float | None = None
    delay: float = 0.0  # seconds the supervisor waits before restarting it if it fails now
    started_at: float | None = None  # Unix time of the last (re)start
    last_ok: float | None = None  # Unix time of the last unit of work done

    def ok(self) -> None:
        """The loop did a unit of work: it is healthy now."""
        self.last_ok = time.time()

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


class Supervisor:
    """Runs named loops; restarts a failed one after ``first_delay`` doubling up to ``max_delay``."""

    def __init__(self, first_delay: float = 0.1, max_delay: float = 30.0) -> None:
        self.first_delay = first_delay
        self.max_delay = max_delay
        self.loops: dict[str, LoopState] = {}
        self._factories: dict[str, Loop] = {}

    def add(self, name: str, loop: Loop) -> LoopState:
        """Register a loop (before ``run``); its state is visible at once, as "starting"."""
        self._factories[name] = loop
        self.loops[name] = LoopState(name)
        return self.loops[name]

    def restarts(self) -> dict[str, int]:
        """Restarts per loop since the server started."""
        return {name: state.restarts for name, state in self.loops.items()}

    async def run(self) -> None:
        """Run every registered loop until cancelled."""
        tasks = [asyncio.create_task(self._keep_running(name), name=f"loop:{name}") for name in self._factories]
        try:
            await asyncio.gather(*tasks)
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    async def _keep_running(self, name: str) -> None:
        state, loop = self.loops[name], self._factories[name]
        state.delay = self.first_delay
        while True:
            state.state, state.started_at = "running", time.time()
            try:
                await loop()
            except Exception as exc:
                if state.last_ok is not None and state.last_ok >= state.started_at:
                    state.delay = self.first_delay  # it worked since it started: a fresh failure, not a streak
                state.state, state.restarts = "restarting", state.restarts + 1
                state.last_error, state.last_error_at = f"{type(exc).__name__}: {exc}"[:500], time.time()
                logger.exception("background loop %r failed; restarting in %.3g s", name, state.delay)
                await asyncio.sleep(state.delay)
                state.delay = min(state.delay * 2, self.max_delay)
            else:
                state.state = "stopped"
                return
