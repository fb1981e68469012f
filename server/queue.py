"""The ready queue and leases: one interface, a Redis and an in-process implementation.

The public methods are the contract that ``tests/test_queue_contract.py`` runs against both.
Every state change is atomic: a Lua script in Redis, a method with no ``await`` in-process.
Nothing here is the system of record; after a Redis flush ``rebuild`` refills it from the database.
"""

from __future__ import annotations

import asyncio
import dataclasses
import heapq
import json
from collections.abc import AsyncIterator, Iterable
from typing import Any

from server import keys

PRIORITY_SHIFT = 2**40


@dataclasses.dataclass(frozen=True)
class ReadyItem:
    job: int
    task: int
    index: int
    timeout: float
    priority: int = 0

    @property
    def member(self) -> str:
        return f"{self.job}:{self.task}:{self.index}:{self.timeout:g}"

    @property
    def score(self) -> int:
        return -self.priority * PRIORITY_SHIFT + self.task


@dataclasses.dataclass(frozen=True)
class Lease:
    attempt: str
    job: int
    task: int
    index: int
    timeout: float
    volunteer: str
    deadline: float = 0.0

    @classmethod
    def parse(cls, attempt: str, value: str, deadline: float = 0.0) -> Lease:
        _score, member, volunteer, _instance = value.split("|", 3)
        job, task, index, timeout = member.split(":")
        return cls(attempt, int(job), int(task), int(index), float(timeout), volunteer, deadline)


class Queue:
    """What dispatch needs: push ready tasks, lease them atomically, extend, release, requeue."""

    grace: float = 30.0

    async def push(self, items: Iterable[ReadyItem]) -> int:
        """Make tasks ready unless already ready or leased; returns how many were added."""
        raise NotImplementedError

    async def lease(self, volunteer: str, attempts: list[str], now: float) -> list[Lease]:
        """Lease up to ``len(attempts)`` tasks, naming the attempts with the given ids."""
        raise NotImplementedError

    async def extend(self, attempts: list[str], now: float) -> int:
        """Move the deadlines of live leases to now + timeout + grace; returns how many."""
        raise NotImplementedError

    async def claim(self, volunteer: str, attempt: str, item: ReadyItem, now: float) -> Lease | None:
        """Lease one given task under a given attempt id if it is waiting in the ready queue
        (a volunteer resuming, after a reconnect, a task it still holds); None if it is not."""
        raise NotImplementedError

    async def live(self, attempts: list[str]) -> dict[str, Lease]:
        """The live leases among ``attempts``."""
        raise NotImplementedError

    async def release(self, attempts: list[str]) -> list[Lease]:
        """End leases (a result was committed, or the task finished); returns those that were live."""
        raise NotImplementedError

    async def requeue(self, attempts: list[str]) -> list[Lease]:
        """End leases and make their tasks ready again; returns those that were live."""
        raise NotImplementedError

    async def expire(self, now: float, limit: int = 1000) -> list[Lease]:
        """Requeue the leases whose deadline passed; returns them (each to exactly one caller)."""
        raise NotImplementedError

    async def drop(self, items: Iterable[ReadyItem]) -> None:
        """Remove tasks from the ready queue (they failed or finished)."""
        raise NotImplementedError

    async def cancel_job(self, job: int) -> None:
        """Stop handing out a job's tasks (ready entries are skipped from now on)."""
        raise NotImplementedError

    async def running(self, jobs: list[int]) -> dict[int, int]:
        """Live leases per job."""
        raise NotImplementedError

    async def ready_count(self) -> int:
        raise NotImplementedError

    async def needs_rebuild(self) -> bool:
        """True when the queue state is missing (a new or flushed Redis) and nobody rebuilds it."""
        raise NotImplementedError

    async def rebuilt(self) -> None:
        """Mark the queue state as rebuilt from the database."""
        raise NotImplementedError

    async def close(self) -> None:
        return None


class MemoryQueue(Queue):
    """In-process implementation for the embedded default: one process, so no await = atomic."""

    def __init__(self, grace: float = 30.0) -> None:
        self.grace = grace
        self._heap: list[tuple[int, str]] = []
        self._ready: set[str] = set()
        self._leases: dict[str, tuple[int, str, str]] = {}  # attempt -> (score, member, volunteer)
        self._leased_tasks: dict[int, str] = {}
        self._deadlines: dict[str, float] = {}
        self._cancelled: set[int] = set()
        self._running: dict[int, int] = {}
        self._epoch = False

    def _add(self, score: int, member: str) -> bool:
        task = int(member.split(":")[1])
        if member in self._ready or task in self._leased_tasks:
            return False
        self._ready.add(member)
        heapq.heappush(self._heap, (score, member))
        return True

    def _end(self, attempt: str) -> tuple[int, str, str] | None:
        value = self._leases.pop(attempt, None)
        if value is None:
            return None
        self._deadlines.pop(attempt, None)
        job, task = (int(p) for p in value[1].split(":")[:2])
        if self._leased_tasks.get(task) == attempt:
            del self._leased_tasks[task]
        self._running[job] = self._running.get(job, 1) - 1
        return value

    def _lease_of(self, attempt: str, value: tuple[int, str, str]) -> Lease:
        score, member, volunteer = value
        return Lease.parse(attempt, f"{score}|{member}|{volunteer}|", self._deadlines.get(attempt, 0.0))

    async def push(self, items: Iterable[ReadyItem]) -> int:
        return sum(self._add(item.score, item.member) for item in items)

    async def lease(self, volunteer: str, attempts: list[str], now: float) -> list[Lease]:
        out: list[Lease] = []
        while self._heap and len(out) < len(attempts):
            score, member = heapq.heappop(self._heap)
            if member not in self._ready:
                continue  # dropped
            self._ready.discard(member)
            job, task, _index, timeout = member.split(":")
            if int(job) in self._cancelled:
                continue
            attempt = attempts[len(out)]
            self._leases[attempt] = (score, member, volunteer)
            self._leased_tasks[int(task)] = attempt
            self._deadlines[attempt] = now + float(timeout) + self.grace
            self._running[int(job)] = self._running.get(int(job), 0) + 1
            out.append(self._lease_of(attempt, self._leases[attempt]))
        return out

    async def claim(self, volunteer: str, attempt: str, item: ReadyItem, now: float) -> Lease | None:
        if item.member not in self._ready or item.job in self._cancelled:
            return None
        self._ready.discard(item.member)  # its heap entry is skipped when popped
        self._leases[attempt] = (item.score, item.member, volunteer)
        self._leased_tasks[item.task] = attempt
        self._deadlines[attempt] = now + item.timeout + self.grace
        self._running[item.job] = self._running.get(item.job, 0) + 1
        return self._lease_of(attempt, self._leases[attempt])

    async def extend(self, attempts: list[str], now: float) -> int:
        n = 0
        for attempt in attempts:
            value = self._leases.get(attempt)
            if value is not None:
                timeout = float(value[1].split(":")[3])
                self._deadlines[attempt] = now + timeout + self.grace
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
                out.append(Lease.parse(attempt, f"{value[0]}|{value[1]}|{value[2]}|", deadline))
        return out

    async def requeue(self, attempts: list[str]) -> list[Lease]:
        out = []
        for attempt in attempts:
            value = self._end(attempt)
            if value is not None:
                self._add(value[0], value[1])
                out.append(Lease.parse(attempt, f"{value[0]}|{value[1]}|{value[2]}|"))
        return out

    async def expire(self, now: float, limit: int = 1000) -> list[Lease]:
        due = sorted((d, a) for a, d in self._deadlines.items() if d <= now)[:limit]
        return await self.requeue([a for _, a in due])

    async def drop(self, items: Iterable[ReadyItem]) -> None:
        for item in items:
            self._ready.discard(item.member)

    async def cancel_job(self, job: int) -> None:
        self._cancelled.add(job)

    async def running(self, jobs: list[int]) -> dict[int, int]:
        return {job: max(0, self._running.get(job, 0)) for job in jobs}

    async def ready_count(self) -> int:
        return len(self._ready)

    async def needs_rebuild(self) -> bool:
        return not self._epoch

    async def rebuilt(self) -> None:
        self._epoch = True


# ----------------------------------------------------------------------------------- Redis
_LUA_LEASE = """
local n = #ARGV - 4
local now, grace, vol, inst = tonumber(ARGV[1]), tonumber(ARGV[2]), ARGV[3], ARGV[4]
local out = {}
local i = 0
while i < n do
  local popped = redis.call('ZPOPMIN', KEYS[1], 1)
  if #popped == 0 then break end
  local member, score = popped[1], popped[2]
  local job, task, idx, timeout = string.match(member, '^(%d+):(%d+):(%d+):(.+)$')
  if redis.call('SISMEMBER', KEYS[4], job) == 0 then
    i = i + 1
    local attempt = ARGV[4 + i]
    local deadline = now + tonumber(timeout) + grace
    redis.call('HSET', KEYS[2], attempt, score .. '|' .. member .. '|' .. vol .. '|' .. inst)
    redis.call('HSET', KEYS[6], task, attempt)
    redis.call('ZADD', KEYS[3], deadline, attempt)
    redis.call('HINCRBY', KEYS[5], job, 1)
    table.insert(out, attempt)
    table.insert(out, score .. '|' .. member .. '|' .. vol .. '|' .. inst)
    table.insert(out, tostring(deadline))
  end
end
return out
"""

# KEYS: ready, leases, deadlines, running, leased_tasks ; ARGV[1]: 1 = requeue, then attempts
_LUA_END = """
local requeue = ARGV[1] == '1'
local out = {}
for i = 2, #ARGV do
  local attempt = ARGV[i]
  local value = redis.call('HGET', KEYS[2], attempt)
  if value then
    local deadline = redis.call('ZSCORE', KEYS[3], attempt) or '0'
    redis.call('HDEL', KEYS[2], attempt)
    redis.call('ZREM', KEYS[3], attempt)
    local score, member = string.match(value, '^([^|]+)|([^|]+)|')
    local job, task = string.match(member, '^(%d+):(%d+):')
    if redis.call('HGET', KEYS[5], task) == attempt then redis.call('HDEL', KEYS[5], task) end
    redis.call('HINCRBY', KEYS[4], job, -1)
    if requeue then redis.call('ZADD', KEYS[1], 'NX', score, member) end
    table.insert(out, attempt)
    table.insert(out, value)
    table.insert(out, deadline)
  end
end
return out
"""

# KEYS: deadlines ; ARGV: now, limit -> attempts whose deadline passed
_LUA_DUE = """
return redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1], 'LIMIT', 0, tonumber(ARGV[2]))
"""

# KEYS: ready, leases, deadlines, cancelled, running, leased_tasks ; ARGV: member, score, attempt,
# volunteer, instance, deadline, job, task
_LUA_CLAIM = """
if redis.call('SISMEMBER', KEYS[4], ARGV[7]) == 1 then return 0 end
if redis.call('ZREM', KEYS[1], ARGV[1]) == 0 then return 0 end
redis.call('HSET', KEYS[2], ARGV[3], ARGV[2] .. '|' .. ARGV[1] .. '|' .. ARGV[4] .. '|' .. ARGV[5])
redis.call('HSET', KEYS[6], ARGV[8], ARGV[3])
redis.call('ZADD', KEYS[3], ARGV[6], ARGV[3])
redis.call('HINCRBY', KEYS[5], ARGV[7], 1)
return 1
"""

# KEYS: leases, deadlines ; ARGV: now, grace, attempts...
_LUA_EXTEND = """
local n = 0
for i = 3, #ARGV do
  local value = redis.call('HGET', KEYS[1], ARGV[i])
  if value then
    local timeout = string.match(value, '^[^|]+|%d+:%d+:%d+:([^|]+)|')
    redis.call('ZADD', KEYS[2], 'XX', tonumber(ARGV[1]) + tonumber(timeout) + tonumber(ARGV[2]), ARGV[i])
    n = n + 1
  end
end
return n
"""

# KEYS: ready, leased_tasks ; ARGV: score, member, score, member...
_LUA_PUSH = """
local n = 0
for i = 1, #ARGV, 2 do
  local task = string.match(ARGV[i + 1], '^%d+:(%d+):')
  if redis.call('HEXISTS', KEYS[2], task) == 0 then
    n = n + redis.call('ZADD', KEYS[1], 'NX', ARGV[i], ARGV[i + 1])
  end
end
return n
"""


class RedisQueue(Queue):
    """Redis implementation: atomic Lua scripts, safe with several server instances."""

    def __init__(self, redis: Any, instance: str, grace: float = 30.0) -> None:
        self.redis = redis
        self.instance = instance
        self.grace = grace
        self._lease = redis.register_script(_LUA_LEASE)
        self._end = redis.register_script(_LUA_END)
        self._due = redis.register_script(_LUA_DUE)
        self._extend = redis.register_script(_LUA_EXTEND)
        self._push = redis.register_script(_LUA_PUSH)
        self._claim = redis.register_script(_LUA_CLAIM)

    @staticmethod
    def _leases(flat: list) -> list[Lease]:
        return [Lease.parse(_s(flat[i]), _s(flat[i + 1]), float(_s(flat[i + 2]))) for i in range(0, len(flat), 3)]

    async def push(self, items: Iterable[ReadyItem]) -> int:
        args: list[Any] = []
        for item in items:
            args += [item.score, item.member]
        return int(await self._push(keys=[keys.READY, keys.LEASED_TASKS], args=args)) if args else 0

    async def lease(self, volunteer: str, attempts: list[str], now: float) -> list[Lease]:
        if not attempts:
            return []
        flat = await self._lease(
            keys=[keys.READY, keys.LEASES, keys.DEADLINES, keys.CANCELLED, keys.RUNNING, keys.LEASED_TASKS],
            args=[repr(now), repr(self.grace), volunteer, self.instance, *attempts],
        )
        return self._leases(flat)

    async def claim(self, volunteer: str, attempt: str, item: ReadyItem, now: float) -> Lease | None:
        deadline = now + item.timeout + self.grace
        claimed = await self._claim(
            keys=[keys.READY, keys.LEASES, keys.DEADLINES, keys.CANCELLED, keys.RUNNING, keys.LEASED_TASKS],
            args=[item.member, item.score, attempt, volunteer, self.instance, repr(deadline), item.job, item.task],
        )
        if not int(claimed):
            return None
        return Lease(attempt, item.job, item.task, item.index, item.timeout, volunteer, deadline)

    async def extend(self, attempts: list[str], now: float) -> int:
        if not attempts:
            return 0
        return int(
            await self._extend(keys=[keys.LEASES, keys.DEADLINES], args=[repr(now), repr(self.grace), *attempts])
        )

    async def live(self, attempts: list[str]) -> dict[str, Lease]:
        if not attempts:
            return {}
        values = await self.redis.hmget(keys.LEASES, attempts)
        return {a: Lease.parse(a, _s(v)) for a, v in zip(attempts, values, strict=True) if v is not None}

    async def _finish(self, attempts: list[str], requeue: bool) -> list[Lease]:
        if not attempts:
            return []
        flat = await self._end(
            keys=[keys.READY, keys.LEASES, keys.DEADLINES, keys.RUNNING, keys.LEASED_TASKS],
            args=["1" if requeue else "0", *attempts],
        )
        return self._leases(flat)

    async def release(self, attempts: list[str]) -> list[Lease]:
        return await self._finish(attempts, requeue=False)

    async def requeue(self, attempts: list[str]) -> list[Lease]:
        return await self._finish(attempts, requeue=True)

    async def expire(self, now: float, limit: int = 1000) -> list[Lease]:
        due = [_s(a) for a in await self._due(keys=[keys.DEADLINES], args=[repr(now), limit])]
        # _finish only returns leases that were still live, so with several instances reaping at
        # once each expired lease is requeued and reported by exactly one of them.
        return await self._finish(due, requeue=True)

    async def drop(self, items: Iterable[ReadyItem]) -> None:
        members = [item.member for item in items]
        if members:
            await self.redis.zrem(keys.READY, *members)

    async def cancel_job(self, job: int) -> None:
        await self.redis.sadd(keys.CANCELLED, job)

    async def running(self, jobs: list[int]) -> dict[int, int]:
        if not jobs:
            return {}
        values = await self.redis.hmget(keys.RUNNING, [str(j) for j in jobs])
        return {job: max(0, int(v or 0)) for job, v in zip(jobs, values, strict=True)}

    async def ready_count(self) -> int:
        return int(await self.redis.zcard(keys.READY))

    async def needs_rebuild(self) -> bool:
        if await self.redis.exists(keys.EPOCH):
            return False
        # One instance rebuilds; the lock expires if it dies half way.
        return bool(await self.redis.set(keys.REBUILD_LOCK, self.instance, nx=True, ex=120))

    async def rebuilt(self) -> None:
        await self.redis.set(keys.EPOCH, self.instance)
        await self.redis.delete(keys.REBUILD_LOCK)

    async def close(self) -> None:
        await self.redis.aclose()


def _s(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


# -------------------------------------------------------------------------------- events bus
class Bus:
    """Events between server instances (job progress, cancellations). Fan-out to local listeners."""

    def __init__(self) -> None:
        self._listeners: set[asyncio.Queue] = set()
        self._stop = asyncio.Event()

    def stop(self) -> None:
        """Ask ``run`` to return (redis-py's pub/sub read may swallow a cancellation)."""
        self._stop.set()

    async def publish(self, event: dict) -> None:
        self._deliver(event)

    def _deliver(self, event: dict) -> None:
        for q in list(self._listeners):
            if q.qsize() < 1000:  # a slow listener loses events rather than memory
                q.put_nowait(event)

    async def listen(self) -> AsyncIterator[dict]:
        q: asyncio.Queue = asyncio.Queue()
        self._listeners.add(q)
        try:
            while True:
                yield await q.get()
        finally:
            self._listeners.discard(q)

    async def run(self) -> None:
        """Background task: relay events from other instances (nothing to do in-process)."""
        await self._stop.wait()


class RedisBus(Bus):
    def __init__(self, redis: Any) -> None:
        super().__init__()
        self.redis = redis

    async def publish(self, event: dict) -> None:
        await self.redis.publish(keys.EVENTS, json.dumps(event))

    async def run(self) -> None:
        pubsub = self.redis.pubsub()
        await pubsub.subscribe(keys.EVENTS)
        try:
            while not self._stop.is_set():
                message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=0.2)
                if message is not None and message.get("type") == "message":
                    self._deliver(json.loads(message["data"]))
        finally:
            await pubsub.aclose()
