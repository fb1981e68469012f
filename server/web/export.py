"""Results export, streamed in constant memory: .txt, JSON, NDJSON and CSV, in input order.

JSON, NDJSON and CSV say for each task how its result was accepted (``accepted``): by a quorum
("2/3": two of three volunteers' results agreed), by a trusted volunteer alone ("trusted,
spot-check 10%": the rate at which that volunteer's results were being re-checked), or "1/1"
(replication 1: one volunteer's word); and how many volunteers' results it took (``replicas``).
JSON and NDJSON also carry each task's ``partials`` (uvm.partial), available before it finishes.
"""

from __future__ import annotations

import csv
import functools
import io
import json
import re
from collections.abc import AsyncIterator

from server.store.download import ResultRow

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


async def render(pages: AsyncIterator[list[ResultRow]], fmt: str) -> AsyncIterator[bytes]:
    """Yield the export one chunk per page of rows. A failed task carries its error (txt: ``ERROR: ...``)."""
    if fmt == "json":
        yield b"["
        sep = "\n"
        async for page in pages:
            if page:
                yield (sep + ",\n".join(map(_json_line, page))).encode()
                sep = ",\n"
        yield b"\n]\n"
    elif fmt == "ndjson":
        async for page in pages:
            yield "".join([_json_line(row) + "\n" for row in page]).encode()
    elif fmt == "csv":
        buf = io.StringIO()
        writer = csv.writer(buf, lineterminator="\n")
        writer.writerow(["index", "input", "state", "result", "error", "accepted", "replicas"])
        async for page in pages:
            writer.writerows(map(_csv_cells, page))
            yield buf.getvalue().encode()
            buf.seek(0)
            buf.truncate()
        yield buf.getvalue().encode()
    else:  # txt: one result a line, as the original UVM Compute
        async for page in pages:
            yield "".join([_txt_line(row) + "\n" for row in page]).encode()


@functools.lru_cache(maxsize=256)
def _string(text: str | None) -> str:
    """A short string that repeats from row to row (a state, how a result was accepted) as JSON."""
    return _dumps(text)


def _json_line(row: ResultRow) -> str:
    """One task as a JSON object; the stored JSON texts are spliced in as they are."""
    error = _dumps(row.error) if row.error is not None and row.state != "done" else "null"
    output = _dumps(row.output) if row.output else '""'
    return (
        f'{{"index":{row.idx},"input":{row.input},"state":{_string(row.state)},'
        f'"result":{"null" if row.result is None else row.result},"error":{error},"output":{output},'
        f'"accepted":{_string(row.accepted)},"replicas":{row.replicas},"partials":[{",".join(row.partials)}]}}'
    )


def _csv_cells(row: ResultRow) -> list:
    result = ("null" if row.result is None else row.result) if row.state == "done" else ""
    cells = [row.input, row.state, result, _error_line(row.error), row.accepted or ""]
    return [row.idx, *(csv_cell(c) for c in cells), row.replicas]


def _txt_line(row: ResultRow) -> str:
    if row.state == "done":
        if row.result is None:
            return "null"
        # a string result is written as the string itself; anything else as its (one-line) JSON
        return json.loads(row.result).replace("\n", "\\n") if row.result.startswith('"') else row.result
    if row.state == "failed":
        return "ERROR: " + _error_line(row.error)
    return f"({row.state})"
