"""Logging set-up: plain text, or one JSON object a line (``UVM_LOG_FORMAT=json``) for log collectors.

The job, attempt and volunteer ids go in as fields wherever they are known: passed with
``logger.info(..., extra={"job": 3})``, or taken from the context of the volunteer's socket being
served (``volunteer_context``), so a log line from deep inside dispatch still names its volunteer.
"""

from __future__ import annotations

import contextvars
import json
import logging
import time

FIELDS = ("job", "attempt", "attempts", "volunteer", "task")
volunteer_context: contextvars.ContextVar[str | None] = contextvars.ContextVar("uvm_volunteer", default=None)


class JsonFormatter(logging.Formatter):
    """``{"time", "level", "logger", "message", job?, attempt?, volunteer?, task?, "exc"?}``."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, object] = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        for name in FIELDS:
            value = getattr(record, name, None)
            if value is not None:
                entry[name] = value
        if "volunteer" not in entry and (vid := volunteer_context.get()) is not None:
            entry["volunteer"] = vid
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


def setup(log_format: str = "text", level: int = logging.INFO) -> None:
    """Configure the root logger once, at start (the CLI calls it)."""
    handler = logging.StreamHandler()
    if log_format == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
