"""The Redis queue and events bus: every state change one Lua script, so any server instance may lease."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Awaitable, Callable, Iterable, Sequence
from typing import Any

from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import NoScriptError

from server.batching import Batcher
from server.queue import redis_keys as keys
from server.queue.base import (
    AFFINITY_SLACK,
    DEFAULT_SHARE,
    LEASE_SPAN,
    MAX_AFFINITY_JOBS,
    MAX_SKIPPED,
    PRIORITY_SHIFT,
    Bus,
    Lease,
    Queue,
    ReadyItem,
    checked_shares,
    computing_entry,
    lease_limit,
    summarize_computing,
)

# ----------------------------------------------------------------------------------- Redis
# Every script starts with this prelude: the fair-share keys (one ready zset per researcher, the
# active researchers scored by their pass; one ready zset per job, holding the same members, for
# job affinity) and the helpers that file a job's task under its owner and its job.
_PRELUDE = f"""
local READY, ACTIVE, OWNERS, SHARES = '{keys.READY}', '{keys.ACTIVE}', '{keys.OWNERS}', '{keys.SHARES}'
local READY_JOB = '{keys.READY_JOB}'
local function owner_of(job) return redis.call('HGET', OWNERS, job) or '0' end
local function unready(r, job, member)
  redis.call('ZREM', READY_JOB .. job, member)
  return redis.call('ZREM', READY .. r, member)
end
local function make_ready(r, job, score, member)
  if redis.call('ZADD', READY .. r, 'NX', score, member) == 0 then return 0 end
  redis.call('ZADD', READY_JOB .. job, score, member)
  return 1
end
local function activate(r)
  if not redis.call('ZSCORE', ACTIVE, r) then
    local low = redis.call('ZRANGE', ACTIVE, 0, 0, 'WITHSCORES')
    redis.call('ZADD', ACTIVE, low[2] or 0, r)
  end
end
-- the lease scripts' record of one leased task (their KEYS: leases, deadlines, cancelled, running,
-- leased_tasks, limits), and its answer (attempt, entry, deadline) appended to ``out``
local function hold(out, attempt, score, member, task, vol, inst, deadline, limit)
  local entry = score .. '|' .. member .. '|' .. vol .. '|' .. inst
  redis.call('HSET', KEYS[6], attempt, tostring(limit))
  redis.call('HSET', KEYS[1], attempt, entry)
  redis.call('HSET', KEYS[5], task, attempt)
  redis.call('ZADD', KEYS[2], deadline, attempt)
  table.insert(out, attempt)
  table.insert(out, entry)
  table.insert(out, tostring(deadline))
end
"""

# KEYS: leases, deadlines, cancelled, running, leased_tasks, limits ; ARGV: now, grace, volunteer,
# instance, network tag ('' for none), excluded-set prefix, max skipped, affinity slack, the number of
# loaded jobs, the loaded jobs, then the attempt ids.
# Each task goes to the active researcher with the lowest pass (ties: the lowest id), whose pass then
# grows by 1/share -- unless a loaded job may take it (``affine``: see ``Queue``). A task with an
# exclusion set naming this volunteer (or network) is put back.
_LUA_LEASE = """
local now, grace, vol, inst, net = tonumber(ARGV[1]), tonumber(ARGV[2]), ARGV[3], ARGV[4], ARGV[5]
local excl, max_skipped, slack, nj = ARGV[6], tonumber(ARGV[7]), tonumber(ARGV[8]), tonumber(ARGV[9])
local first = 9 + nj
local n = #ARGV - first
local out, skipped, order, pass, blocked = {}, {}, {}, {}, {}
local cand = redis.call('ZRANGE', ACTIVE, 0, -1, 'WITHSCORES')
for j = 1, #cand, 2 do
  table.insert(order, cand[j])
  pass[cand[j]] = tonumber(cand[j + 1])
end
local loaded, given, owner = {}, {}, {}  -- loaded jobs of active researchers, not cancelled
for k = 10, first do
  local j = ARGV[k]
  local r = owner_of(j)
  if pass[r] and redis.call('SISMEMBER', KEYS[3], j) == 0 then
    table.insert(loaded, j)
    given[j], owner[j] = 0, r
  end
end
local function band(score) return math.floor(tonumber(score) / SHIFT) end
-- The loaded job to lease from now (fewest given in this call, then lowest pass, then order) and
-- its first ready task, taken out of the job's zset; or nil. A loaded job with nothing ready, or
-- whose researcher has a task of higher priority waiting, is dropped for the rest of the call.
-- (A job's tasks share one priority and nothing is pushed during the call: one check per job.)
local checked = {}
local function affine(best)
  while true do
    local pick = nil
    for _, j in ipairs(loaded) do
      local r = owner[j]
      if given[j] and not blocked[r] and pass[r] <= pass[best] + slack and (pick == nil
          or given[j] < given[pick] or (given[j] == given[pick] and pass[r] < pass[owner[pick]])) then
        pick = j
      end
    end
    if pick == nil then return nil end
    local top = redis.call('ZPOPMIN', READY_JOB .. pick, 1)
    if #top > 0 then
      if checked[pick] then return pick, top end
      local head = redis.call('ZRANGE', READY .. owner[pick], 0, 0, 'WITHSCORES')
      if #head > 0 and band(head[2]) == band(top[2]) then
        checked[pick] = true
        return pick, top
      end
      redis.call('ZADD', READY_JOB .. pick, top[2], top[1])
    end
    given[pick] = nil
  end
end
local i, wasted = 0, 0
while i < n and #skipped + wasted < max_skipped do
  local best = nil
  for _, r in ipairs(order) do
    if not blocked[r] and (best == nil or pass[r] < pass[best]
        or (pass[r] == pass[best] and tonumber(r) < tonumber(best))) then
      best = r
    end
  end
  if best == nil then break end
  local r, pick, popped, stale = best, nil, nil, false
  if #loaded > 0 then pick, popped = affine(best) end
  if pick then
    r = owner[pick]
    -- the researcher's zset decides what is ready: a job index entry it lacks is dropped, not leased
    stale = redis.call('ZREM', READY .. r, popped[1]) == 0
  else
    popped = redis.call('ZPOPMIN', READY .. best, 1)
  end
  if #popped == 0 then
    blocked[best] = true
  elseif stale then
    wasted = wasted + 1
  else
    local member, score = popped[1], popped[2]
    local job, task, idx, timeout = string.match(member, '^(%d+):(%d+):(%d+):(.+)$')
    if not pick then redis.call('ZREM', READY_JOB .. job, member) end
    local skip = redis.call('SISMEMBER', excl .. task, vol) == 1
      or (net ~= '' and redis.call('SISMEMBER', excl .. task, net) == 1)
    if skip then
      table.insert(skipped, {r, job, score, member})
    elseif redis.call('SISMEMBER', KEYS[3], job) == 0 then
      i = i + 1
      if given[job] then given[job] = given[job] + 1 end
      pass[r] = pass[r] + 1 / tonumber(redis.call('HGET', SHARES, r) or 'DEFAULT_SHARE')
      local attempt = ARGV[first + i]
      local deadline = now + tonumber(timeout) + grace
      hold(out, attempt, score, member, task, vol, inst, deadline, now + SPAN * tonumber(timeout) + grace)
      redis.call('HINCRBY', KEYS[4], job, 1)
    end
  end
end
for _, e in ipairs(skipped) do make_ready(e[1], e[2], e[3], e[4]) end
for _, r in ipairs(order) do
  if redis.call('EXISTS', READY .. r) == 0 then
    redis.call('ZREM', ACTIVE, r)
  else
    redis.call('ZADD', ACTIVE, 'XX', tostring(pass[r]), r)
  end
end
return out
"""

# KEYS: leases, deadlines, cancelled, running, leased_tasks, limits ; ARGV: now, grace, volunteer,
# instance, network tag, excluded-set prefix, max skipped, job, span (timeouts the chunk's leases may
# last), the chunk's first attempt, then the attempt ids. The job's next ready tasks in order (a task
# excluding this volunteer or network is put back); its researcher's pass grows by 1/share each.
_LUA_LEASE_MORE = """
local now, grace, vol, inst, net = tonumber(ARGV[1]), tonumber(ARGV[2]), ARGV[3], ARGV[4], ARGV[5]
local excl, max_skipped, job, span, head = ARGV[6], tonumber(ARGV[7]), ARGV[8], tonumber(ARGV[9]), ARGV[10]
local out, skipped = {}, {}
if redis.call('SISMEMBER', KEYS[3], job) == 1 then return out end
local r = owner_of(job)
local i, n, limit = 0, #ARGV - 10, nil
while i < n and #skipped < max_skipped do
  local popped = redis.call('ZPOPMIN', READY_JOB .. job, 1)
  if #popped == 0 then break end
  local member, score = popped[1], popped[2]
  if redis.call('ZREM', READY .. r, member) == 1 then  -- else a stale index entry: dropped
    local task, timeout = string.match(member, '^%d+:(%d+):%d+:(.+)$')
    if redis.call('SISMEMBER', excl .. task, vol) == 1
        or (net ~= '' and redis.call('SISMEMBER', excl .. task, net) == 1) then
      table.insert(skipped, {score, member})
    else
      i = i + 1
      local attempt = ARGV[10 + i]
      local deadline = now + tonumber(timeout) + grace
      limit = now + span * tonumber(timeout) + grace
      hold(out, attempt, score, member, task, vol, inst, deadline, limit)
    end
  end
end
for _, e in ipairs(skipped) do make_ready(r, job, e[1], e[2]) end
if i > 0 then
  redis.call('HINCRBY', KEYS[4], job, i)
  if redis.call('HEXISTS', KEYS[1], head) == 1 then redis.call('HSET', KEYS[6], head, tostring(limit)) end
  if redis.call('ZSCORE', ACTIVE, r) then
    local share = tonumber(redis.call('HGET', SHARES, r) or 'DEFAULT_SHARE')
    redis.call('ZINCRBY', ACTIVE, i / share, r)
  end
end
if redis.call('EXISTS', READY .. r) == 0 then redis.call('ZREM', ACTIVE, r) end
return out
"""

# KEYS: leases, deadlines, running, leased_tasks, limits ; ARGV[1]: 1 = requeue, then attempts
_LUA_END = """
local requeue = ARGV[1] == '1'
local out = {}
for i = 2, #ARGV do
  local attempt = ARGV[i]
  local value = redis.call('HGET', KEYS[1], attempt)
  if value then
    local deadline = redis.call('ZSCORE', KEYS[2], attempt) or '0'
    redis.call('HDEL', KEYS[1], attempt)
    redis.call('HDEL', KEYS[5], attempt)
    redis.call('ZREM', KEYS[2], attempt)
    local score, member = string.match(value, '^([^|]+)|([^|]+)|')
    local job, task = string.match(member, '^(%d+):(%d+):')
    if redis.call('HGET', KEYS[4], task) == attempt then redis.call('HDEL', KEYS[4], task) end
    redis.call('HINCRBY', KEYS[3], job, -1)
    if requeue then
      local r = owner_of(job)
      if make_ready(r, job, score, member) == 1 then activate(r) end
    end
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

# KEYS: leases, deadlines, cancelled, running, leased_tasks, limits ; ARGV: member, score, attempt,
# volunteer, instance, deadline, job, task, limit
_LUA_CLAIM = """
if redis.call('SISMEMBER', KEYS[3], ARGV[7]) == 1 then return 0 end
if unready(owner_of(ARGV[7]), ARGV[7], ARGV[1]) == 0 then return 0 end
redis.call('HSET', KEYS[1], ARGV[3], ARGV[2] .. '|' .. ARGV[1] .. '|' .. ARGV[4] .. '|' .. ARGV[5])
redis.call('HSET', KEYS[5], ARGV[8], ARGV[3])
redis.call('ZADD', KEYS[2], ARGV[6], ARGV[3])
redis.call('HSET', KEYS[6], ARGV[3], ARGV[9])
redis.call('HINCRBY', KEYS[4], ARGV[7], 1)
return 1
"""

# KEYS: leases, deadlines, limits ; ARGV: now, grace, attempts...
_LUA_EXTEND = """
local n = 0
for i = 3, #ARGV do
  local value = redis.call('HGET', KEYS[1], ARGV[i])
  if value then
    local timeout = string.match(value, '^[^|]+|%d+:%d+:%d+:([^|]+)|')
    local deadline = tonumber(ARGV[1]) + tonumber(timeout) + tonumber(ARGV[2])
    local limit = tonumber(redis.call('HGET', KEYS[3], ARGV[i]) or deadline)
    if deadline > limit then deadline = limit end
    redis.call('ZADD', KEYS[2], 'XX', deadline, ARGV[i])
    n = n + 1
  end
end
return n
"""

# KEYS: leased_tasks ; ARGV: score, member, researcher (0: the owner recorded for the job), ...
_LUA_PUSH = """
local n = 0
local owners = {}  -- job -> researcher, looked up (or recorded) once per job per call
for i = 1, #ARGV, 3 do
  local job, task = string.match(ARGV[i + 1], '^(%d+):(%d+):')
  if owners[job] == nil then
    if ARGV[i + 2] ~= '0' then redis.call('HSET', OWNERS, job, ARGV[i + 2]) end
    owners[job] = owner_of(job)
  end
  if redis.call('HEXISTS', KEYS[1], task) == 0 then
    local r = owners[job]
    if make_ready(r, job, ARGV[i], ARGV[i + 1]) == 1 then
      activate(r)
      n = n + 1
    end
  end
end
return n
"""

# ARGV: members to take out of the ready queue
_LUA_DROP = """
for i = 1, #ARGV do
  local job = string.match(ARGV[i], '^(%d+):')
  unready(owner_of(job), job, ARGV[i])
end
return 0
"""

# -> tasks ready over all researchers
_LUA_COUNT = """
local n = 0
for _, r in ipairs(redis.call('ZRANGE', ACTIVE, 0, -1)) do n = n + redis.call('ZCARD', READY .. r) end
return n
"""

_LEASE_KEYS = [keys.LEASES, keys.DEADLINES, keys.CANCELLED, keys.RUNNING, keys.LEASED_TASKS, keys.LIMITS]


class RedisQueue(Queue):
    """Redis implementation: atomic Lua scripts, safe with several server instances."""

    def __init__(self, redis: Any, instance: str, grace: float = 30.0, affinity_slack: float = AFFINITY_SLACK) -> None:
        self.redis = redis
        self.instance = instance
        self.grace = grace
        self.affinity_slack = affinity_slack
        lease = (
            _LUA_LEASE.replace("SPAN", str(LEASE_SPAN))
            .replace("DEFAULT_SHARE", repr(DEFAULT_SHARE))
            .replace("SHIFT", str(PRIORITY_SHIFT))
        )
        self._lease = redis.register_script(_PRELUDE + lease)
        more = _LUA_LEASE_MORE.replace("DEFAULT_SHARE", repr(DEFAULT_SHARE))
        self._lease_more = redis.register_script(_PRELUDE + more)
        self._end = redis.register_script(_PRELUDE + _LUA_END)
        self._due = redis.register_script(_LUA_DUE)
        self._extend = redis.register_script(_LUA_EXTEND)
        self._push = redis.register_script(_PRELUDE + _LUA_PUSH)
        self._claim = redis.register_script(_PRELUDE + _LUA_CLAIM)
        self._drop = redis.register_script(_PRELUDE + _LUA_DROP)
        self._count = redis.register_script(_PRELUDE + _LUA_COUNT)
        self._script_calls = Batcher(self._scripts_pipeline)  # script calls made together: one round trip
        self.reports = Batcher(self._reports_pipeline)  # `computing` reports made together: one round trip

    @staticmethod
    def _leases(flat: list) -> list[Lease]:
        return [Lease.parse(_s(flat[i]), _s(flat[i + 1]), float(_s(flat[i + 2]))) for i in range(0, len(flat), 3)]

    async def push(self, items: Iterable[ReadyItem]) -> int:
        args: list[Any] = []
        for item in items:
            args += [item.score, item.member, item.researcher]
        return int(await self._push(keys=[keys.LEASED_TASKS], args=args)) if args else 0

    async def set_shares(self, shares: dict[int, float]) -> None:
        if shares:
            mapping = {str(r): repr(v) for r, v in checked_shares(shares).items()}
            await self.redis.hset(keys.SHARES, mapping=mapping)

    async def lease(
        self, volunteer: str, attempts: list[str], now: float, network: str = "", jobs: Sequence[int] = ()
    ) -> list[Lease]:
        if not attempts:
            return []
        loaded = [str(int(j)) for j in dict.fromkeys(jobs[:MAX_AFFINITY_JOBS])]
        head = [repr(now), repr(self.grace), volunteer, self.instance, network, keys.EXCLUDED, MAX_SKIPPED]
        args = [*head, repr(self.affinity_slack), len(loaded), *loaded, *attempts]
        return self._leases(await self._script_calls.call((self._lease, _LEASE_KEYS, args)))

    async def _scripts_pipeline(self, calls: list[tuple[Any, list[str], list[Any]]]) -> list[Any]:
        """Script calls made together (a wake leases for many waiters at once; their heartbeats then
        come together): each script once per call, in order, in one pipeline. Each call stays atomic
        and gets its own answer or error."""
        if len(calls) == 1:
            script, names, args = calls[0]
            return [await script(keys=names, args=args)]
        async with self.redis.pipeline(transaction=False) as pipe:
            for script, names, args in calls:
                pipe.evalsha(script.sha, len(names), *names, *args)
            answers = await pipe.execute(raise_on_error=False)
        # Redis lost its scripts (a restart, SCRIPT FLUSH): nothing ran for those; once more, loading them
        return [
            await script(keys=names, args=args) if isinstance(answer, NoScriptError) else answer
            for (script, names, args), answer in zip(calls, answers, strict=True)
        ]

    async def lease_more(
        self, volunteer: str, job: int, attempts: list[str], now: float, network: str = "", head: str = ""
    ) -> list[Lease]:
        if not attempts:
            return []
        span = len(attempts) + LEASE_SPAN
        head_args = [repr(now), repr(self.grace), volunteer, self.instance, network, keys.EXCLUDED, MAX_SKIPPED]
        flat = await self._lease_more(keys=_LEASE_KEYS, args=[*head_args, job, span, head, *attempts])
        return self._leases(flat)

    async def exclude(self, pairs: list[tuple[int, str]]) -> None:
        if not pairs:
            return
        async with self.redis.pipeline(transaction=False) as pipe:
            for task, who in pairs:
                pipe.sadd(f"{keys.EXCLUDED}{task}", who)
                pipe.expire(f"{keys.EXCLUDED}{task}", keys.EXCLUDED_TTL)
            await pipe.execute()

    async def forget(self, tasks: list[int]) -> None:
        if tasks:
            await self.redis.delete(*[f"{keys.EXCLUDED}{task}" for task in tasks])

    async def claim(self, volunteer: str, attempt: str, item: ReadyItem, now: float) -> Lease | None:
        deadline = now + item.timeout + self.grace
        limit = lease_limit(now, item.timeout, self.grace)
        claimed = await self._claim(
            keys=_LEASE_KEYS,
            args=[
                item.member,
                item.score,
                attempt,
                volunteer,
                self.instance,
                repr(deadline),
                item.job,
                item.task,
                repr(limit),
            ],
        )
        if not int(claimed):
            return None
        return Lease(attempt, item.job, item.task, item.index, item.timeout, volunteer, deadline)

    async def extend(self, attempts: list[str], now: float) -> int:
        if not attempts:
            return 0
        names = [keys.LEASES, keys.DEADLINES, keys.LIMITS]
        return int(await self._script_calls.call((self._extend, names, [repr(now), repr(self.grace), *attempts])))

    async def live(self, attempts: list[str]) -> dict[str, Lease]:
        if not attempts:
            return {}
        values = await self.redis.hmget(keys.LEASES, attempts)
        return {a: Lease.parse(a, _s(v)) for a, v in zip(attempts, values, strict=True) if v is not None}

    async def _finish(self, attempts: list[str], requeue: bool) -> list[Lease]:
        if not attempts:
            return []
        flat = await self._end(
            keys=[keys.LEASES, keys.DEADLINES, keys.RUNNING, keys.LEASED_TASKS, keys.LIMITS],
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
            await self._drop(keys=[], args=members)

    async def cancel_job(self, job: int) -> None:
        await self.redis.sadd(keys.CANCELLED, job)

    async def running(self, jobs: list[int]) -> dict[int, int]:
        if not jobs:
            return {}
        values = await _read_twice(lambda: self.redis.hmget(keys.RUNNING, [str(j) for j in jobs]))
        return {job: max(0, int(v or 0)) for job, v in zip(jobs, values, strict=True)}

    async def computing(
        self, key: str, volunteer: str, per_job: dict[int, int], gone: Iterable[int], ttl: float
    ) -> None:
        await self.reports.call((key, volunteer, per_job, list(gone), ttl))

    async def computing_many(self, entries: list[tuple[str, str, dict[int, int], list[int]]], ttl: float) -> None:
        if entries:  # many connections' reports at once: one pipeline, with any made meanwhile
            await asyncio.gather(*(self.reports.call((*entry, ttl)) for entry in entries))

    async def _reports_pipeline(self, calls: list[tuple[str, str, dict[int, int], list[int], float]]) -> list[Any]:
        """The ``computing`` reports of many connections in one pipeline: 10,000 volunteers woken at
        once report together (each its own pipeline was a seventh of the server's time then)."""
        async with self.redis.pipeline(transaction=False) as pipe:
            for key, volunteer, per_job, gone, ttl in calls:
                expires = time.time() + ttl
                for job in gone:
                    pipe.hdel(f"{keys.COMPUTING}{job}", key)
                for job, n in per_job.items():
                    pipe.hset(f"{keys.COMPUTING}{job}", key, computing_entry(volunteer, n, expires))
                    pipe.expire(f"{keys.COMPUTING}{job}", int(ttl) + 1)  # a job nobody reports on goes away
            if len(pipe):
                await pipe.execute()
        return [None] * len(calls)

    async def computing_counts(self, jobs: list[int]) -> dict[int, tuple[int, int]]:
        if not jobs:
            return {}
        values = await _read_twice(lambda: self._hvals_each([f"{keys.COMPUTING}{job}" for job in jobs]))
        now = time.time()
        return {job: summarize_computing([_s(v) for v in vals], now) for job, vals in zip(jobs, values, strict=True)}

    async def _hvals_each(self, names: list[str]) -> list:
        async with self.redis.pipeline(transaction=False) as pipe:
            for name in names:
                pipe.hvals(name)
            return await pipe.execute()

    async def ready_count(self) -> int:
        return int(await _read_twice(lambda: self._count(keys=[], args=[])))

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


async def _read_twice(read: Callable[[], Awaitable[Any]]) -> Any:
    """A read that a status page depends on: once more on a fresh connection when Redis closed the
    pooled one (a restart, CLIENT KILL), instead of failing a researcher's request with a 500."""
    try:
        return await read()
    except RedisConnectionError:
        return await read()


def _s(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


class RedisBus(Bus):
    def __init__(self, redis: Any) -> None:
        super().__init__()
        self.redis = redis

    async def publish(self, event: dict) -> None:
        await self.redis.publish(keys.EVENTS, json.dumps(event))

    async def run(self, alive: Callable[[], None] | None = None) -> None:
        """Relay the events channel to local listeners; a lost connection raises (the supervisor restarts it)."""
        pubsub = self.redis.pubsub()
        await pubsub.subscribe(keys.EVENTS)
        try:
            while not self._stop.is_set():
                message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=0.2)
                if message is not None and message.get("type") == "message":
                    self._deliver(json.loads(message["data"]))
                if alive is not None:
                    alive()
        finally:
            await pubsub.aclose()
