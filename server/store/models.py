"""The storage layer's value types and errors (no SQL here)."""

from __future__ import annotations

import dataclasses
import time
from typing import Any

from server.protocol import AttemptOutcome, Outcome, TaskState
from server.queue import ReadyItem
from server.spec import Verification


class NotFound(Exception):
    """No such row, or not the caller's."""


class Conflict(Exception):
    """A unique value already exists, or the row is in a state that forbids the change."""


class QuotaExceeded(Exception):
    """A researcher's quota (queued tasks, stored bytes, requests per second) would be passed;
    ``str(exc)`` says which, the limit and what to do. ``retry_after``: seconds, when waiting helps."""

    def __init__(self, message: str, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after


LIMIT_FIELDS = ("share", "max_queued_tasks", "max_stored_bytes", "max_requests_per_second")


@dataclasses.dataclass(frozen=True)
class Limits:
    """A researcher's fair-share weight and quotas as an operator set them; None: the server default."""

    share: float | None = None
    max_queued_tasks: int | None = None
    max_stored_bytes: int | None = None
    max_requests_per_second: float | None = None


@dataclasses.dataclass(frozen=True)
class Researcher:
    id: int
    email: str
    approved: bool
    operator: bool
    max_requests_per_second: float | None = None  # None: the server's default (Config)


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
    verification: Verification = Verification(1, 1, 4, None)

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
    exclude: list[tuple[int, str]] = dataclasses.field(default_factory=list)  # (task, volunteer): never again
    settled: list[int] = dataclasses.field(default_factory=list)  # tasks decided: their exclusions can go


@dataclasses.dataclass
class TaskDecision:
    """The validator's verdict on a task: it becomes ``state`` (done or failed)."""

    task: Any  # the locked row (id, job_id, idx, state, attempts, replicas)
    state: TaskState
    volunteer: str
    result: Any
    how: str  # how the result was accepted, e.g. "2/3"
    replicas: int
    error: str | None = None
    output: str | None = None  # None: keep the task's output as it is
    elapsed: float = 0.0
    failures: int = 0  # errors and timeouts so far (tasks.attempts)


@dataclasses.dataclass
class OutcomeWrites:
    """What the validator tells the store to write for one batch of outcomes (no decisions here)."""

    attempts: list[dict] = dataclasses.field(default_factory=list)
    verdicts: dict[str, str] = dataclasses.field(default_factory=dict)  # attempt -> verdict
    credit: dict[str, float] = dataclasses.field(default_factory=dict)  # attempt -> CPU s credited (validated)
    decisions: list[TaskDecision] = dataclasses.field(default_factory=list)
    progress: list[tuple[Any, Outcome, str]] = dataclasses.field(default_factory=list)  # still queued
    counts: dict[int, dict[str, int]] = dataclasses.field(default_factory=dict)  # job -> column -> delta
    # volunteer -> (consecutive, validated, invalid, last_invalid_at): the new values
    reputation: dict[str, tuple] = dataclasses.field(default_factory=dict)
    stats: dict[str, list[float]] = dataclasses.field(default_factory=dict)  # volunteer -> [results, elapsed seconds]
    reopen: list[str] = dataclasses.field(default_factory=list)  # volunteers whose trusted results go back

    def attempt(self, o: Outcome, task: Any, volunteer: str, outcome: AttemptOutcome, reported: Any) -> None:
        """Record the attempt; ``reported`` ({"result": v} or {"error": key}) is kept for later replicas."""
        row = {"outcome": o, "task": task, "volunteer": volunteer, "kind": outcome, "reported": reported}
        self.attempts.append(row)
        if outcome is not AttemptOutcome.LATE:
            stats = self.stats.setdefault(volunteer, [0, 0.0])
            stats[0] += outcome is AttemptOutcome.DONE
            stats[1] += max(0.0, float(o.elapsed))

    def count(self, job: int, column: str, delta: int = 1) -> None:
        per_job = self.counts.setdefault(job, {})
        per_job[column] = per_job.get(column, 0) + delta

    def decide(self, decision: TaskDecision) -> None:
        self.decisions.append(decision)


def now() -> float:
    return time.time()


def inserted_id(result: Any) -> int:
    """The primary key a single-row INSERT generated."""
    key = result.inserted_primary_key
    if key is None:
        raise RuntimeError("the INSERT generated no primary key")
    return int(key[0])
