"""Results export, streamed in constant memory: .txt, JSON, NDJSON and CSV, in input order.

JSON, NDJSON and CSV say for each task how its result was accepted (``accepted``): by a quorum
("2/3": two of three volunteers' results agreed), by a trusted volunteer alone ("trusted,
spot-check 10%": the rate at which that volunteer's results were being re-checked), or "1/1"
(replication 1: one volunteer's word); and how many volunteers' results it took (``replicas``).
JSON and NDJSON also carry each task's ``partials`` (uvm.partial), available before it finishes.
"""

from __future__ import annotations

import csv
import io
import json
import re
from collections.abc import AsyncIterator

FORMATS = {
    "txt": "text/plain; charset=utf-8",
    "json": "application/json",
    "ndjson": "application/x-ndjson",
    "csv": "text/csv; charset=utf-8",
}


def _dumps(value: object) -> str:
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False)


FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")
_NUMBER = re.compile(r"^[+-]?(\d+(\.\d*)?|\.\d+)([eE][+-]?\d+)?$")


def csv_cell(text: str) -> str:
    """A CSV cell a spreadsheet will not run: text starting with ``= + - @`` (or a tab or carriage
    return) gets a leading ``'``, unless it is a plain number such as ``-5``."""
    if text.startswith(FORMULA_STARTS) and not _NUMBER.match(text):
        return "'" + text
    return text


def _error_line(error: str | None) -> str:
    last = (error or "").strip().splitlines()
    return last[-1] if last else ""


async def render(rows: AsyncIterator[dict], fmt: str) -> AsyncIterator[bytes]:
    """Yield the export chunk by chunk. A failed task carries its error (txt: ``ERROR: ...``)."""
    if fmt == "json":
        yield b"["
        first = True
        async for row in rows:
            yield (("" if first else ",") + "\n" + _dumps(_public(row))).encode()
            first = False
        yield b"\n]\n"
    elif fmt == "ndjson":
        async for row in rows:
            yield (_dumps(_public(row)) + "\n").encode()
    elif fmt == "csv":
        buf = io.StringIO()
        writer = csv.writer(buf, lineterminator="\n")
        writer.writerow(["index", "input", "state", "result", "error", "accepted", "replicas"])
        async for row in rows:
            result = _dumps(row["result"]) if row["state"] == "done" else ""
            cells = [_dumps(row["input"]), row["state"], result, _error_line(row["error"]), row.get("accepted") or ""]
            writer.writerow([row["index"], *(csv_cell(c) for c in cells), row.get("replicas", 0)])
            if buf.tell() > 32768:
                yield buf.getvalue().encode()
                buf.seek(0)
                buf.truncate()
        yield buf.getvalue().encode()
    else:  # txt: one result a line, as the original UVM Compute
        async for row in rows:
            if row["state"] == "done":
                line = row["result"] if isinstance(row["result"], str) else _dumps(row["result"])
                line = line.replace("\n", "\\n")
            elif row["state"] == "failed":
                line = "ERROR: " + _error_line(row["error"])
            else:
                line = f"({row['state']})"
            yield (line + "\n").encode()


def _public(row: dict) -> dict:
    return {
        "index": row["index"],
        "input": row["input"],
        "state": row["state"],
        "result": row["result"],
        "error": row["error"] if row["state"] != "done" else None,
        "output": row["output"],
        "accepted": row.get("accepted"),
        "replicas": row.get("replicas", 0),
        "partials": row.get("partials", []),
    }
