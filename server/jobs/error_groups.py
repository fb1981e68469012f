"""Grouping failed tasks by what went wrong, not by the exact words.

``ValueError(f"bad value {x}")`` over 200 inputs is one problem, not 200: the group key is the
exception type and its message with quoted strings, hex ids and numbers masked.
"""

from __future__ import annotations

import re
from typing import Any

MAX_SIGNATURE = 300
GROUP_INPUTS = 5  # example inputs shown per group
GROUP_INDICES = 100  # task indices listed per group

_QUOTED = re.compile(r"'(?:[^'\\\n]|\\.)*'|\"(?:[^\"\\\n]|\\.)*\"")
_HEX = re.compile(
    r"\b0x[0-9a-fA-F]+\b"  # 0xdeadbeef
    r"|\b[0-9a-fA-F]{8}(?:-?[0-9a-fA-F]{4}){3}-?[0-9a-fA-F]{12}\b"  # UUIDs
    r"|\b(?=[0-9a-f]*[a-f])(?=[0-9a-f]*\d)[0-9a-f]{8,}\b"  # long lower-case hex ids with letters and digits
)
_NUMBER = re.compile(r"(?<![\w.])[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?(?![\w.])")


def last_line(error: str | None) -> str:
    """The exception line of a traceback (its last non-empty line); for a task whose volunteers never
    agreed, the ``NoAgreement: ...`` line (its first: the variants it lists follow it)."""
    lines = [line for line in (error or "").strip().splitlines() if line.strip()]
    if lines and lines[0].startswith("NoAgreement:"):
        return lines[0].strip()
    return lines[-1].strip() if lines else "error"


def signature(error: str | None) -> str:
    """``ValueError: bad value <n>`` for ``ValueError: bad value 17``: the key errors are grouped by."""
    line = last_line(error)
    kind, sep, message = line.partition(": ")
    message = _QUOTED.sub("<str>", message)
    message = _HEX.sub("<hex>", message)
    message = _NUMBER.sub("<n>", message)
    text = f"{kind}{sep}{message}"
    return text if len(text) <= MAX_SIGNATURE else text[: MAX_SIGNATURE - 1] + "…"


class ErrorGroups:
    """Failed rows (``index``, ``input``, ``error``) grouped by ``signature``, in constant memory
    per group: its ``count``, the first ``GROUP_INPUTS`` inputs and ``GROUP_INDICES`` indices, one
    full ``traceback`` and the first real ``example`` message."""

    def __init__(self) -> None:
        self._groups: dict[str, dict[str, Any]] = {}

    def add(self, row: dict[str, Any]) -> None:
        key = signature(row.get("error"))
        group = self._groups.get(key)
        if group is None:
            group = self._groups[key] = {
                "message": key,
                "type": key.partition(": ")[0],
                "example": last_line(row.get("error")),
                "count": 0,
                "inputs": [],
                "indices": [],
                "traceback": row.get("error") or "",
            }
        group["count"] += 1
        if len(group["inputs"]) < GROUP_INPUTS:
            group["inputs"].append(row.get("input"))
        if len(group["indices"]) < GROUP_INDICES:
            group["indices"].append(row["index"])

    def largest_first(self) -> list[dict[str, Any]]:
        return sorted(self._groups.values(), key=lambda g: -g["count"])
