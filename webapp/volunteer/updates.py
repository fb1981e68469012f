"""Running tasks' updates (uvm.progress, uvm.checkpoint, uvm.partial) on their way to the server.

Pure Python, tested in CPython. A worker's runner already sends at most one update per task every
``every`` seconds; research code can post more itself (``import js``), so the page throttles again:
per attempt, the latest state and progress win and partials are appended (up to the protocol's
caps), and one ``update`` message goes out at most every ``every`` seconds.
"""

from __future__ import annotations

import json
from typing import Any


class Pending:
    """What one attempt reported since its last ``update`` went out."""

    def __init__(self) -> None:
        self.state: str | None = None
        self.progress: float | None = None
        self.partials: list[Any] = []
        self.sent_at: float | None = None

    @property
    def empty(self) -> bool:
        return self.state is None and self.progress is None and not self.partials


class Updates:
    """Per attempt: the pending update, the latest checkpoint and progress (for the vault and the page)."""

    def __init__(self, protocol: Any, every: float = 5.0) -> None:
        # ``protocol`` is the shared module (top-level in the browser, ``server.protocol`` in CPython).
        self.protocol = protocol
        self.every = every
        self.pending: dict[str, Pending] = {}
        self.progress: dict[str, float] = {}  # attempt -> latest fraction, shown on the page
        self.dropped = 0  # updates that were not what a runner sends

    def add(self, attempt: str, text: str) -> str | None:
        """Take one update posted by a worker for ``attempt``; returns its new checkpoint (JSON text) if any."""
        try:
            data = json.loads(text)
            message = self.protocol.from_dict({**data, "type": "update", "attempt": attempt})
        except (ValueError, TypeError):  # ProtocolError is a ValueError
            self.dropped += 1
            return None
        pending = self.pending.setdefault(attempt, Pending())
        if message.state is not None:
            pending.state = message.state
        if message.progress is not None:
            pending.progress = self.progress[attempt] = float(message.progress)
        room = self.protocol.MAX_PARTIALS_PER_UPDATE - len(pending.partials)
        pending.partials.extend(message.partials[: max(0, room)])
        return message.state

    def due(self, now: float) -> list:
        """The updates to send now: one per attempt, at most every ``every`` seconds each."""
        out = []
        for attempt, pending in self.pending.items():
            if pending.empty or (pending.sent_at is not None and now - pending.sent_at < self.every):
                continue
            out.append(self.protocol.Update(attempt, pending.state, pending.progress, pending.partials))
            pending.state, pending.progress, pending.partials, pending.sent_at = None, None, [], now
        return out

    def finish(self, attempt: str) -> object | None:
        """The attempt ended: its last partials (an update to send now, or None); its state no longer matters."""
        pending = self.pending.pop(attempt, None)
        self.progress.pop(attempt, None)
        if pending is None or not pending.partials:
            return None
        return self.protocol.Update(attempt, None, None, pending.partials)
