"""The dashboard's job inputs: what a researcher pastes or uploads, turned into the API's ``inputs``.

Pure Python (no browser imports), so the same functions run in the page and in the tests.
Each parser raises ``InputError`` with a message the page shows as it is.
"""

from __future__ import annotations

import csv
import io
import json
import math
from typing import Any

MAX_PREVIEW = 60


class InputError(ValueError):
    """Inputs that cannot become a job; the message says what to fix."""


def parse_json_list(text: str) -> list:
    if not text.strip():
        raise InputError("paste a JSON list of inputs, e.g. [1, 2, 3]")
    try:
        value = json.loads(text)
    except ValueError as exc:
        line = getattr(exc, "lineno", None)
        where = f" (line {line}, column {exc.colno})" if line else ""
        raise InputError(f"the inputs are not valid JSON: {getattr(exc, 'msg', exc)}{where}") from None
    if not isinstance(value, list):
        raise InputError(
            f"the inputs must be a JSON list [...], not {type(value).__name__ if value is not None else 'null'}"
        )
    if not value:
        raise InputError("the list of inputs is empty")
    return value


def _cell(text: str) -> Any:
    """A CSV cell: an int or float when it reads as one, otherwise the text."""
    stripped = text.strip()
    try:
        return int(stripped)
    except ValueError:
        pass
    try:
        number = float(stripped)
    except ValueError:
        return text
    return number if math.isfinite(number) else text


def parse_csv(text: str) -> list[dict]:
    """One task per row; the header row names the keys of each input dict."""
    if not text.strip():
        raise InputError("paste or upload a CSV file with a header row")
    rows = list(csv.reader(io.StringIO(text.strip("\ufeff"))))
    rows = [r for r in rows if any(cell.strip() for cell in r)]
    if len(rows) < 2:
        raise InputError("the CSV needs a header row and at least one data row")
    header = [h.strip() for h in rows[0]]
    if any(not h for h in header) or len(set(header)) != len(header):
        raise InputError("every CSV column needs a distinct name in the header row")
    out = []
    for number, row in enumerate(rows[1:], start=2):
        if len(row) != len(header):
            raise InputError(f"CSV row {number} has {len(row)} cells; the header has {len(header)}")
        out.append({key: _cell(cell) for key, cell in zip(header, row, strict=True)})
    return out


def parse_lines(text: str) -> list[str]:
    lines = [line.rstrip("\r") for line in text.split("\n") if line.strip()]
    if not lines:
        raise InputError("write one input per line")
    return lines


def parse_range(start: str, stop: str, step: str) -> dict:
    try:
        bounds = [int(str(v).strip() or "x") for v in (start, stop, step or "1")]
    except ValueError:
        raise InputError("start, stop and step must be whole numbers") from None
    if bounds[2] == 0:
        raise InputError("the step must not be zero")
    if len(range(*bounds)) == 0:
        raise InputError(f"range({bounds[0]}, {bounds[1]}, {bounds[2]}) is empty")
    return {"range": bounds}


def parse(mode: str, fields: dict) -> Any:
    """The API's ``inputs`` for one of the page's input modes and its fields."""
    if mode == "json":
        return parse_json_list(fields.get("json", ""))
    if mode == "csv":
        return parse_csv(fields.get("csv", ""))
    if mode == "lines":
        return parse_lines(fields.get("lines", ""))
    if mode == "range":
        return parse_range(fields.get("start", ""), fields.get("stop", ""), fields.get("step", "1"))
    if mode == "chain":
        job, kind = str(fields.get("job", "")).strip(), fields.get("kind", "results_of")
        if not job.isdigit():
            raise InputError("choose the job whose results become the inputs")
        if kind not in ("results_of", "after"):
            raise InputError(f"unknown chaining {kind!r}")
        return {kind: int(job)}
    raise InputError(f"unknown input mode {mode!r}")


def count(inputs: Any) -> int | None:
    """How many tasks the inputs make (``None`` when only the server knows: chained jobs)."""
    if isinstance(inputs, list):
        return len(inputs)
    if isinstance(inputs, dict) and "range" in inputs:
        return len(range(*inputs["range"]))
    return None


def first(inputs: Any) -> Any:
    """The first input, for Try (chained inputs are looked up by the page)."""
    if isinstance(inputs, list):
        return inputs[0]
    if isinstance(inputs, dict) and "range" in inputs:
        return inputs["range"][0]
    return None


def summary(inputs: Any) -> str:
    n = count(inputs)
    if n is not None:
        preview = json.dumps(first(inputs))
        preview = preview if len(preview) <= MAX_PREVIEW else preview[: MAX_PREVIEW - 1] + "…"
        return f"{n} task{'s' if n != 1 else ''}; the first input is {preview}"
    if isinstance(inputs, dict) and "results_of" in inputs:
        return f"one task per result of job {inputs['results_of']}"
    if isinstance(inputs, dict) and "after" in inputs:
        return f"one task per task of job {inputs['after']}, started as each finishes"
    return ""
