"""The storage layer's value types and errors (no SQL here)."""

from __future__ import annotations

import dataclasses
import time
from typing import Any

from server.queue import ReadyItem


class NotFound(Exception):
    """No such row, or not the caller's."""


class Conflict(Exception):
    """A unique value already exists, or the row is in a state that forbids the change."""


@dataclasses.dataclass(frozen=True)
class Researcher:
    id: int
    email: str
    approved: bool
    operator: bool


@dataclasses.dataclass(frozen=True)
class JobInfo:
    """What dispatch needs of a job, cached in memory (no plaintext code)."""

    id: int
    researcher_id: int
    state: str
    code_hash: str
    inputs_kind: str
    range_start: int
    range_step: int
    timeout: float
    priority: int
    max_attempts: int
    requirements: list

    def input_at(self, index: int) -> Any:
        return self.range_start + index * self.range_step if self.inputs_kind == "range" else None


@dataclasses.dataclass
class Recorded:
    """What committing a batch of outcomes did, for the dispatcher to act on in Redis."""

    acked: list[str] = dataclasses.field(default_factory=list)  # committed: tell the volunteer
    ignored: list[str] = dataclasses.field(default_factory=list)  # late or duplicate: drop it
    release: list[str] = dataclasses.field(default_factory=list)  # end these leases
    requeue: list[str] = dataclasses.field(default_factory=list)  # end and make ready again
    drop: list[ReadyItem] = dataclasses.field(default_factory=list)  # failed: out of the queue
    jobs: set[int] = dataclasses.field(default_factory=set)  # jobs whose counts changed
    push: list[ReadyItem] = dataclasses.field(default_factory=list)  # new tasks to make ready
    upstream: list[tuple] = dataclasses.field(default_factory=list)  # (job, task, idx, state, result) finished


def now() -> float:
    return time.time()


def inserted_id(result: Any) -> int:
    """The primary key a single-row INSERT generated."""
    key = result.inserted_primary_key
    if key is None:
        raise RuntimeError("the INSERT generated no primary key")
    return int(key[0])
