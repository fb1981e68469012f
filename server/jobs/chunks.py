"""Chunked hand-out: how many consecutive tasks of a job go out as one chunk.

A job's tasks are handed out one at a time until their run times are known. From then on, a chunk
holds about ``target`` seconds of work, from the median of the job's recent measured run times
(``elapsed``, a volunteer's claim, clamped to [0, the job's timeout] before it reaches here, so a
minority of liars moves the median little), at most ``MAX_CHUNK_TASKS``. A job's chunks at most
double from one hand-out to the next, so a wrong first estimate costs little; a task of the job that
timed out sends it back to single tasks (a chunk is no place for a task that may hang).
"""

from __future__ import annotations

import collections
import dataclasses
import statistics

from server.protocol import MAX_CHUNK_TASKS

SAMPLES = 64  # recent run times kept per job
MIN_SAMPLES = 3  # measured tasks before a job's tasks go out in chunks
JOBS_KEPT = 10_000  # jobs whose run times are remembered (the least recently reported forgotten first)
FLOOR = 1e-6  # seconds: a run time of 0 (a clamped lie, a timer's resolution) counts as this


@dataclasses.dataclass(slots=True)
class _Job:
    samples: collections.deque = dataclasses.field(default_factory=lambda: collections.deque(maxlen=SAMPLES))
    size: int = 1  # the size of its last chunk
    wanted: int = 1  # what the median asks for, recomputed every few samples
    fresh: int = 0  # samples since ``wanted`` was computed


class ChunkSizer:
    """Per job: its recent run times and the size of its next chunk (on this server instance)."""

    def __init__(self, target: float) -> None:
        self.target = target
        self._jobs: collections.OrderedDict[int, _Job] = collections.OrderedDict()

    def measured(self, job: int, elapsed: float, timed_out: bool = False) -> None:
        """A task of ``job`` ran for ``elapsed`` seconds (clamped already); ``timed_out``: it was stopped."""
        if self.target <= 0:
            return
        state = self._jobs.pop(job, None) or _Job()
        self._jobs[job] = state
        if len(self._jobs) > JOBS_KEPT:
            self._jobs.popitem(last=False)
        if timed_out:
            state.samples.clear()
            state.size = state.wanted = 1
            return
        state.samples.append(max(FLOOR, elapsed))
        state.fresh += 1
        if len(state.samples) >= MIN_SAMPLES and (state.fresh >= 8 or state.wanted == 1):
            state.fresh = 0
            state.wanted = max(1, min(MAX_CHUNK_TASKS, int(self.target / statistics.median(state.samples))))

    def size(self, job: int) -> int:
        """Tasks in the next chunk of ``job``: 1 until its run times are known, then growing (at most
        doubling each time) toward ``target`` seconds of work."""
        state = self._jobs.get(job)
        if state is None or self.target <= 0:
            return 1
        state.size = max(1, min(state.wanted, 2 * state.size))
        return state.size

    def forget(self, job: int) -> None:
        self._jobs.pop(job, None)
