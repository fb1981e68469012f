"""The volunteer's credit as the server counts it (``GET /api/volunteers/{signed id}``), and its
opt-in public nickname (``PUT .../nickname``). The signed id is the credential: no account needed.

Fetched now and then, not per task: what the page counts itself (tasks, time given this session) is
drawn every second; validated results need other volunteers' replicas and come in later anyway.
"""

from __future__ import annotations

import json
import time

import js
from pyscript import window

REFRESH_SECONDS = 20.0


class Credit:
    """The last credit fetched, and this session's start, to tell "this session" from "all time"."""

    def __init__(self) -> None:
        self.server: dict | None = None  # the last answer of /api/volunteers/{id}
        self.at_start: dict | None = None  # the first answer this session
        self.wait_until = 0.0  # tasks are asked for once at_start is in, or from this time (monotonic) on
        self.fetched_at = 0.0
        self.busy = False
        self.note = ""  # what the nickname form last said

    def due(self) -> bool:
        return not self.busy and time.monotonic() - self.fetched_at >= REFRESH_SECONDS

    async def refresh(self, volunteer: str) -> None:
        """Fetch the credit of ``volunteer`` (its signed id); errors leave the last one shown."""
        self.busy = True
        try:
            answer = await window.fetch(f"/api/volunteers/{js.encodeURIComponent(volunteer)}")
            if answer.ok:
                self.server = json.loads(await answer.text())
                if self.at_start is None:
                    self.at_start = dict(self.server)
            elif answer.status == 404 and self.at_start is None:
                # not known to the server yet (its hello is still being written): no credit before this session
                self.at_start = {"validated": 0, "tasks_done": 0, "task_seconds": 0.0}
        finally:
            self.fetched_at = time.monotonic()
            self.busy = False

    async def set_nickname(self, volunteer: str, nickname: str) -> None:
        """Ask the server to list this volunteer as ``nickname`` ("" = not listed)."""
        init = js.Object.fromEntries(
            js.Array.of(
                js.Array.of("method", "PUT"),
                js.Array.of("body", json.dumps({"nickname": nickname or None})),
            )
        )
        answer = await window.fetch(f"/api/volunteers/{js.encodeURIComponent(volunteer)}/nickname", init)
        body = json.loads(await answer.text())
        if answer.ok:
            self.note = ""  # the status line above the form says it
            if self.server is not None:
                self.server["nickname"] = body["nickname"]
        else:
            self.note = str(body.get("error") or f"the server answered {answer.status}")

    def snapshot(self) -> dict:
        """What the page shows: all-time numbers from the server, this session's by difference."""
        server, start = self.server or {}, self.at_start or {}
        validated = int(server.get("validated", 0))
        return {
            "known": self.server is not None,
            "validated": validated,
            "validated_session": validated - int(start.get("validated", validated)),
            "validated_seconds": float(server.get("validated_seconds", 0.0)),
            "tasks_all": int(server.get("tasks_done", 0)),
            "elapsed_all": float(server.get("task_seconds", 0.0)),
            # the server's all-time numbers when this session began: all time is never less than that
            # plus what this session did, whatever the age of the last fetch
            "tasks_at_start": int(start.get("tasks_done", 0)),
            "elapsed_at_start": float(start.get("task_seconds", 0.0)),
            "nickname": server.get("nickname"),
            "note": self.note,
        }
