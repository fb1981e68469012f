"""The in-process queue of the embedded default: one process, so a method with no ``await`` is atomic."""

from __future__ import annotations

import heapq
import time
from collections.abc import Iterable, Sequence

from server.queue.base import (
    AFFINITY_SLACK,
    DEFAULT_SHARE,
    LEASE_SPAN,
    MAX_AFFINITY_JOBS,
    MAX_SKIPPED,
    Lease,
    Queue,
    ReadyItem,
    checked_shares,
    computing_entry,
    lease_limit,
    priority_band,
    summarize_computing,
)

Entry = tuple[int, str]  # (score, member) in a heap of ready tasks


class MemoryQueue(Queue):
    """In-process implementation for the embedded default: one process, so no await = atomic."""

    def __init__(self, grace: float = 30.0, affinity_slack: float = AFFINITY_SLACK) -> None:
        self.grace = grace
        self.affinity_slack = affinity_slack
        self._heaps: dict[int, list[Entry]] = {}  # researcher -> its ready tasks (stale entries skipped)
        self._job_heaps: dict[int, list[Entry]] = {}  # job -> its ready tasks, for job affinity (the same)
        self._job_ready: dict[int, int] = {}  # job -> its ready tasks: its heap goes with the last
        self._passes: dict[int, float] = {}  # active researcher -> pass (fair share, see Queue)
        self._owner: dict[int, int] = {}  # job -> researcher
        self._shares: dict[int, float] = {}
        self._ready: set[str] = set()
        self._leases: dict[str, tuple[int, str, str]] = {}  # attempt -> (score, member, volunteer)
        self._leased_tasks: dict[int, str] = {}
        self._deadlines: dict[str, float] = {}
        self._limits: dict[str, float] = {}  # attempt -> latest deadline heartbeats may reach
        self._cancelled: set[int] = set()
        self._running: dict[int, int] = {}
        self._excluded: dict[int, set[str]] = {}  # task -> volunteers and network tags it must avoid
        self._epoch = False
        self._computing: dict[int, dict[str, str]] = {}  # job -> connection key -> computing_entry

    def _add(self, score: int, member: str, researcher: int = 0) -> bool:
        job, task = (int(p) for p in member.split(":")[:2])
        if researcher:
            self._owner[job] = researcher
        if member in self._ready or task in self._leased_tasks:
            return False
        self._ready.add(member)
        heapq.heappush(self._job_heaps.setdefault(job, []), (score, member))
        self._job_ready[job] = self._job_ready.get(job, 0) + 1
        owner = self._owner.get(job, 0)
        if owner not in self._passes:  # becomes active at the lowest pass of those active
            self._passes[owner] = min(self._passes.values(), default=0.0)
        heapq.heappush(self._heaps.setdefault(owner, []), (score, member))
        return True

    def _unready(self, member: str) -> None:
        """Take a task out of the ready set (its heap entries are skipped from now on)."""
        if member in self._ready:
            self._ready.discard(member)
            job = int(member.split(":", 1)[0])
            self._job_ready[job] -= 1
            if not self._job_ready[job]:
                del self._job_ready[job]
                self._job_heaps.pop(job, None)

    def _head(self, heap: list[Entry]) -> Entry | None:
        """A heap's first ready entry (stale ones dropped on the way)."""
        while heap and heap[0][1] not in self._ready:
            heapq.heappop(heap)
        return heap[0] if heap else None

    def _next_owner(self, blocked: set[int]) -> int | None:
        """The active researcher with the lowest pass (ties: the lowest id), not in ``blocked``."""
        best = None
        for owner, value in self._passes.items():
            if owner not in blocked and (best is None or (value, owner) < (self._passes[best], best)):
                best = owner
        return best

    def _pop(self, owner: int) -> tuple[int, str] | None:
        """The owner's next ready task; None (and the owner made inactive) when it has none."""
        heap = self._heaps.get(owner, [])
        while heap:
            score, member = heapq.heappop(heap)
            if member in self._ready:
                return score, member
        self._heaps.pop(owner, None)
        self._passes.pop(owner, None)
        return None

    def _end(self, attempt: str) -> tuple[int, str, str] | None:
        value = self._leases.pop(attempt, None)
        if value is None:
            return None
        self._deadlines.pop(attempt, None)
        self._limits.pop(attempt, None)
        job, task = (int(p) for p in value[1].split(":")[:2])
        if self._leased_tasks.get(task) == attempt:
            del self._leased_tasks[task]
        self._running[job] = self._running.get(job, 1) - 1
        return value

    def _lease_of(self, attempt: str, value: tuple[int, str, str]) -> Lease:
        _score, member, volunteer = value
        return Lease.of(attempt, member, volunteer, self._deadlines.get(attempt, 0.0))

    async def push(self, items: Iterable[ReadyItem]) -> int:
        return sum(self._add(item.score, item.member, item.researcher) for item in items)

    async def lease(
        self, volunteer: str, attempts: list[str], now: float, network: str = "", jobs: Sequence[int] = ()
    ) -> list[Lease]:
        out: list[Lease] = []
        skipped: list[tuple[bool, Entry]] = []  # (from its job's heap, not its researcher's; entry)
        blocked: set[int] = set()  # researchers with nothing (more) for this volunteer
        loaded = [j for j in dict.fromkeys(jobs[:MAX_AFFINITY_JOBS]) if j not in self._cancelled]
        given = dict.fromkeys(loaded, 0)  # tasks of each loaded job leased in this call
        checked: set[int] = set()
        while len(out) < len(attempts) and len(skipped) < MAX_SKIPPED:
            best = self._next_owner(blocked)
            if best is None:
                break
            owner, from_job, entry = best, False, None
            job = self._affine(loaded, given, best, blocked, checked) if loaded else None
            if job is not None:
                owner, from_job = self._owner.get(job, 0), True
                entry = heapq.heappop(self._job_heaps[job])
            else:
                entry = self._pop(best)
            if entry is None:
                blocked.add(best)
                continue
            score, member = entry
            job_id, task, _index, timeout = member.split(":")
            excluded = self._excluded.get(int(task))
            if excluded and (volunteer in excluded or (network and network in excluded)):
                skipped.append((from_job, entry))
                continue
            self._unready(member)
            if int(job_id) in self._cancelled:
                continue
            if int(job_id) in given:
                given[int(job_id)] += 1
            self._passes[owner] += 1.0 / self._shares.get(owner, DEFAULT_SHARE)
            attempt = attempts[len(out)]
            self._leases[attempt] = (score, member, volunteer)
            self._leased_tasks[int(task)] = attempt
            self._deadlines[attempt] = now + float(timeout) + self.grace
            self._limits[attempt] = lease_limit(now, float(timeout), self.grace)
            self._running[int(job_id)] = self._running.get(int(job_id), 0) + 1
            out.append(self._lease_of(attempt, self._leases[attempt]))
        for from_job, entry in skipped:
            job = int(entry[1].split(":", 1)[0])
            owner = self._owner.get(job, 0)
            heapq.heappush(
                self._job_heaps.setdefault(job, []) if from_job else self._heaps.setdefault(owner, []), entry
            )
            if owner not in self._passes:
                self._passes[owner] = min(self._passes.values(), default=0.0)
        for owner in [o for o in self._passes if not self._heaps.get(o)]:
            del self._passes[owner]  # no ready task left: it rejoins at the lowest pass
            self._heaps.pop(owner, None)
        return out

    async def lease_more(
        self, volunteer: str, job: int, attempts: list[str], now: float, network: str = "", head: str = ""
    ) -> list[Lease]:
        out: list[Lease] = []
        if not attempts or job in self._cancelled:
            return out
        skipped: list[Entry] = []
        heap = self._job_heaps.get(job, [])
        span = len(attempts) + LEASE_SPAN
        while heap and len(out) < len(attempts) and len(skipped) < MAX_SKIPPED:
            score, member = heapq.heappop(heap)
            if member not in self._ready:
                continue
            task, timeout = int(member.split(":")[1]), float(member.split(":")[3])
            excluded = self._excluded.get(task)
            if excluded and (volunteer in excluded or (network and network in excluded)):
                skipped.append((score, member))
                continue
            self._unready(member)
            attempt = attempts[len(out)]
            self._leases[attempt] = (score, member, volunteer)
            self._leased_tasks[task] = attempt
            self._deadlines[attempt] = now + timeout + self.grace
            self._limits[attempt] = now + span * timeout + self.grace
            out.append(self._lease_of(attempt, self._leases[attempt]))
        for entry in skipped:
            heapq.heappush(self._job_heaps.setdefault(job, []), entry)
        if out:
            self._running[job] = self._running.get(job, 0) + len(out)
            if head in self._leases:
                self._limits[head] = self._limits[out[-1].attempt]
            owner = self._owner.get(job, 0)
            if owner in self._passes:
                self._passes[owner] += len(out) / self._shares.get(owner, DEFAULT_SHARE)
        return out

    def _affine(
        self, loaded: list[int], given: dict[int, int], best: int, blocked: set[int], checked: set[int]
    ) -> int | None:
        """The loaded job to lease from now (job affinity, see ``Queue``), or None; a loaded job with
        nothing ready, or whose researcher has a task of higher priority waiting, is dropped from
        ``loaded`` for the rest of the call. A job's tasks share one priority and nothing is pushed
        during a call, so ``checked`` (the jobs whose priority was found right) needs one check each."""
        low = self._passes[best] + self.affinity_slack
        order = sorted(
            (given[j], self._passes[r], i, j)
            for i, j in enumerate(loaded)
            if (r := self._owner.get(j, 0)) in self._passes and r not in blocked and self._passes[r] <= low
        )
        for *_, job in order:
            top = self._head(self._job_heaps.get(job, []))
            if top is not None and job in checked:
                return job
            first = self._head(self._heaps.get(self._owner.get(job, 0), []))
            if top is not None and first is not None and priority_band(first[0]) == priority_band(top[0]):
                checked.add(job)
                return job
            loaded.remove(job)
        return None

    async def set_shares(self, shares: dict[int, float]) -> None:
        self._shares.update(checked_shares(shares))

    async def exclude(self, pairs: list[tuple[int, str]]) -> None:
        for task, who in pairs:
            self._excluded.setdefault(task, set()).add(who)

    async def forget(self, tasks: list[int]) -> None:
        for task in tasks:
            self._excluded.pop(task, None)

    async def claim(self, volunteer: str, attempt: str, item: ReadyItem, now: float) -> Lease | None:
        if item.member not in self._ready or item.job in self._cancelled:
            return None
        self._unready(item.member)  # its heap entries are skipped when popped
        self._leases[attempt] = (item.score, item.member, volunteer)
        self._leased_tasks[item.task] = attempt
        self._deadlines[attempt] = now + item.timeout + self.grace
        self._limits[attempt] = lease_limit(now, item.timeout, self.grace)
        self._running[item.job] = self._running.get(item.job, 0) + 1
        return self._lease_of(attempt, self._leases[attempt])

    async def extend(self, attempts: list[str], now: float) -> int:
        n = 0
        for attempt in attempts:
            value = self._leases.get(attempt)
            if value is not None:
                timeout = float(value[1].split(":")[3])
                self._deadlines[attempt] = min(now + timeout + self.grace, self._limits.get(attempt, float("inf")))
                n += 1
        return n

    async def live(self, attempts: list[str]) -> dict[str, Lease]:
        return {a: self._lease_of(a, self._leases[a]) for a in attempts if a in self._leases}

    async def release(self, attempts: list[str]) -> list[Lease]:
        out = []
        for attempt in attempts:
            deadline = self._deadlines.get(attempt, 0.0)
            value = self._end(attempt)
            if value is not None:
                out.append(Lease.of(attempt, value[1], value[2], deadline))
        return out

    async def requeue(self, attempts: list[str]) -> list[Lease]:
        out = []
        for attempt in attempts:
            value = self._end(attempt)
            if value is not None:
                self._add(value[0], value[1])
                out.append(Lease.of(attempt, value[1], value[2]))
        return out

    async def expire(self, now: float, limit: int = 1000) -> list[Lease]:
        due = sorted((d, a) for a, d in self._deadlines.items() if d <= now)[:limit]
        return await self.requeue([a for _, a in due])

    async def drop(self, items: Iterable[ReadyItem]) -> None:
        dropped = 0
        for item in items:
            if item.member in self._ready:
                self._unready(item.member)
                dropped += 1
        if dropped > 1000:  # many (a cancelled job's window): free their heap entries now, not when popped
            for heap in [*self._heaps.values(), *self._job_heaps.values()]:
                heap[:] = [entry for entry in heap if entry[1] in self._ready]
                heapq.heapify(heap)

    async def cancel_job(self, job: int) -> None:
        self._cancelled.add(job)

    async def running(self, jobs: list[int]) -> dict[int, int]:
        return {job: max(0, self._running.get(job, 0)) for job in jobs}

    async def computing(
        self, key: str, volunteer: str, per_job: dict[int, int], gone: Iterable[int], ttl: float
    ) -> None:
        for job in gone:
            entries = self._computing.get(job, {})
            entries.pop(key, None)
            if not entries:
                self._computing.pop(job, None)
        expires = time.time() + ttl
        for job, n in per_job.items():
            self._computing.setdefault(job, {})[key] = computing_entry(volunteer, n, expires)

    async def computing_counts(self, jobs: list[int]) -> dict[int, tuple[int, int]]:
        now = time.time()
        return {job: summarize_computing(self._computing.get(job, {}).values(), now) for job in jobs}

    async def ready_count(self) -> int:
        return len(self._ready)

    async def needs_rebuild(self) -> bool:
        return not self._epoch

    async def rebuilt(self) -> None:
        self._epoch = True
