"""One contract, two queues: the in-process queue and the Redis queue pass the same tests."""

from __future__ import annotations

import asyncio
import itertools
import random

import pytest
import redis.asyncio as aioredis

from server.queue import Bus, MemoryQueue, Queue, ReadyItem, RedisBus, RedisQueue
from server.queue import redis_keys as keys
from tests.conftest import REDIS_URL


@pytest.fixture(params=["memory", "redis"])
async def queue(request, redis_client):
    if request.param == "memory":
        yield MemoryQueue(grace=5.0)
    else:
        yield RedisQueue(redis_client, "test-instance", grace=5.0)


def test_the_contract_is_abstract():
    """``Queue`` carries the contract: a backend missing a method cannot even be made."""

    class HalfQueue(Queue):
        async def push(self, items):  # noqa: ANN001, ANN202
            return 0

    with pytest.raises(TypeError, match="abstract"):
        HalfQueue()
    with pytest.raises(TypeError, match="abstract"):
        Queue()


def items(job: int, n: int, start: int = 1, priority: int = 0, timeout: float = 10.0) -> list[ReadyItem]:
    return [ReadyItem(job, start + i, i, timeout, priority) for i in range(n)]


async def test_push_is_idempotent_and_lease_pops_in_order(queue):
    assert await queue.push(items(1, 5)) == 5
    assert await queue.push(items(1, 5)) == 0
    assert await queue.ready_count() == 5
    leases = await queue.lease("v1", ["a1", "a2"], now=1000.0)
    assert [(le.attempt, le.task, le.index, le.volunteer) for le in leases] == [("a1", 1, 0, "v1"), ("a2", 2, 1, "v1")]
    assert leases[0].deadline == pytest.approx(1000.0 + 10.0 + 5.0)
    assert await queue.ready_count() == 3
    assert await queue.running([1, 2]) == {1: 2, 2: 0}


async def test_priority_first_then_oldest(queue):
    await queue.push(items(1, 3, start=1, priority=0))
    await queue.push(items(2, 2, start=10, priority=5))
    got = [le.task for le in await queue.lease("v", [f"a{i}" for i in range(5)], now=0.0)]
    assert got == [10, 11, 1, 2, 3]


async def test_leased_task_is_not_pushed_again(queue):
    await queue.push(items(1, 2))
    (lease,) = await queue.lease("v", ["a1"], now=0.0)
    assert await queue.push(items(1, 2)) == 0  # task 1 leased, task 2 ready already
    assert await queue.ready_count() == 1
    assert lease.task == 1


async def test_release_requeue_and_live(queue):
    await queue.push(items(1, 3))
    await queue.lease("v", ["a1", "a2", "a3"], now=0.0)
    assert set(await queue.live(["a1", "a2", "zz"])) == {"a1", "a2"}
    released = await queue.release(["a1", "zz"])
    assert [le.attempt for le in released] == ["a1"]
    assert await queue.release(["a1"]) == []  # idempotent
    requeued = await queue.requeue(["a2"])
    assert [le.task for le in requeued] == [2]
    assert await queue.ready_count() == 1
    assert await queue.running([1]) == {1: 1}
    (again,) = await queue.lease("w", ["b1"], now=0.0)
    assert again.task == 2 and again.volunteer == "w"


async def test_expire_and_extend(queue):
    await queue.push(items(1, 2, timeout=10.0))
    await queue.lease("v", ["a1", "a2"], now=100.0)  # deadlines 115
    assert await queue.extend(["a2", "nope"], now=110.0) == 1  # a2 -> 125
    assert await queue.expire(now=114.0) == []
    expired = await queue.expire(now=116.0)
    assert [le.attempt for le in expired] == ["a1"]
    assert await queue.expire(now=116.0) == []  # each expiry reported once
    assert await queue.ready_count() == 1
    assert [le.attempt for le in await queue.expire(now=126.0)] == ["a2"]


async def test_cancelled_job_is_skipped_and_drop_removes(queue):
    await queue.push(items(1, 2, start=1) + items(2, 2, start=10))
    await queue.cancel_job(1)
    got = [le.task for le in await queue.lease("v", ["a", "b", "c"], now=0.0)]
    assert got == [10, 11]
    await queue.push(items(3, 3, start=20))
    await queue.drop(items(3, 2, start=20))
    assert [le.task for le in await queue.lease("v", ["d", "e"], now=0.0)] == [22]


async def test_rebuild_marker(queue):
    assert await queue.needs_rebuild() is True
    await queue.rebuilt()
    assert await queue.needs_rebuild() is False


async def test_concurrent_leases_never_share_a_task(queue):
    await queue.push(items(1, 500))
    batches = await asyncio.gather(*(queue.lease(f"v{i}", [f"{i}-{j}" for j in range(7)], now=0.0) for i in range(100)))
    tasks = [le.task for batch in batches for le in batch]
    assert len(tasks) == 500 and len(set(tasks)) == 500


async def test_leases_made_together_each_get_their_own_under_the_same_rules(queue):
    """Leases made at once (a wake: Redis sends them in one pipeline) are answered as if made one after
    another in that order: each caller gets its own attempts, fair share alternates, exclusions hold."""
    await queue.push(owned(1, researcher=7, n=20, start=1))
    await queue.push(owned(2, researcher=8, n=20, start=100))
    await queue.exclude([(1, "v0"), (100, "v1")])  # each of the first two takes the next task instead
    got = await asyncio.gather(*(queue.lease(f"v{i}", [f"v{i}-a", f"v{i}-b"], now=0.0) for i in range(8)))
    for i, leases in enumerate(got):
        assert [(le.attempt, le.volunteer) for le in leases] == [(f"v{i}-a", f"v{i}"), (f"v{i}-b", f"v{i}")]
    assert [le.job for leases in got for le in leases] == [1, 2] * 8
    assert 1 not in [le.task for le in got[0]] and 100 not in [le.task for le in got[1]]
    tasks = [le.task for leases in got for le in leases]
    assert len(set(tasks)) == 16 and {1, 100} <= set(tasks)


async def test_redis_leases_across_two_clients(redis_client):
    """Two server instances = two connections: the Lua lease is atomic between them."""
    other = aioredis.from_url(REDIS_URL)
    try:
        q1, q2 = RedisQueue(redis_client, "i1"), RedisQueue(other, "i2")
        await q1.push(items(1, 400))
        got = await asyncio.gather(
            *(q.lease(f"v{i}", [f"{i}-{j}" for j in range(5)], now=0.0) for i, q in enumerate([q1, q2] * 50))
        )
        tasks = [le.task for batch in got for le in batch]
        assert sorted(tasks) == list(range(1, 401))
        assert await redis_client.hlen(keys.LEASES) == 400
        # after a flush exactly one instance wins the right to rebuild
        assert [await q1.needs_rebuild(), await q2.needs_rebuild()] == [True, False]
    finally:
        await other.aclose()


@pytest.mark.parametrize("kind", ["memory", "redis"])
async def test_bus_delivers_events(kind, redis_client):
    bus = Bus() if kind == "memory" else RedisBus(redis_client)
    runner = asyncio.create_task(bus.run())
    got: list[dict] = []

    async def listen() -> None:
        async for event in bus.listen():
            got.append(event)
            return

    listener = asyncio.create_task(listen())
    await asyncio.sleep(0.3)  # let the subscription start
    await bus.publish({"type": "job", "job": 7})
    await asyncio.wait_for(listener, 5)
    assert got == [{"type": "job", "job": 7}]
    bus.stop()
    await asyncio.wait_for(runner, 5)


async def test_claim_leases_a_ready_task_under_a_given_attempt(queue):
    ready = items(1, 3)
    await queue.push(ready)
    lease = await queue.claim("v", "resumed-1", ready[1], now=10.0)
    assert (lease.task, lease.attempt, lease.deadline) == (2, "resumed-1", 10.0 + 10.0 + 5.0)
    assert await queue.claim("w", "other", ready[1], now=10.0) is None  # leased now: not ready
    assert [le.task for le in await queue.lease("w", ["a", "b", "c"], now=10.0)] == [1, 3]
    await queue.cancel_job(2)
    await queue.push(items(2, 1, start=50))
    assert await queue.claim("v", "x", items(2, 1, start=50)[0], now=0.0) is None  # cancelled job


async def test_excluded_tasks_are_skipped_for_that_volunteer_only(queue):
    await queue.push(items(1, 3))  # tasks 1, 2, 3
    await queue.exclude([(1, "v"), (2, "v")])
    (lease,) = await queue.lease("v", ["a1"], now=0.0)
    assert lease.task == 3  # 1 and 2 exclude v: they stay ready, in order, for the others
    assert await queue.ready_count() == 2
    assert [le.task for le in await queue.lease("v", ["a2"], now=0.0)] == []
    got = await queue.lease("w", ["b1", "b2"], now=0.0)
    assert [le.task for le in got] == [1, 2]


async def test_excluded_network_and_forget(queue):
    await queue.push(items(1, 2))
    await queue.exclude([(1, "net:10.0.0.0/24")])
    (lease,) = await queue.lease("v", ["a1"], now=0.0, network="net:10.0.0.0/24")
    assert lease.task == 2  # another volunteer of the same network must not take task 1
    assert await queue.lease("w", ["b1"], now=0.0, network="net:10.0.0.0/24") == []
    (other,) = await queue.lease("x", ["c1"], now=0.0, network="net:10.0.1.0/24")
    assert other.task == 1
    await queue.requeue(["c1"])
    await queue.forget([1])
    (again,) = await queue.lease("w", ["b2"], now=0.0, network="net:10.0.0.0/24")
    assert again.task == 1


async def test_a_requeued_task_does_not_come_back_to_an_excluded_volunteer(queue):
    await queue.push(items(1, 1))
    await queue.lease("v", ["a1"], now=0.0)
    await queue.exclude([(1, "v")])
    await queue.requeue(["a1"])
    assert await queue.lease("v", ["a2"], now=0.0) == []
    assert await queue.ready_count() == 1
    assert [le.task for le in await queue.lease("w", ["b1"], now=0.0)] == [1]


async def test_heartbeats_cannot_keep_a_lease_past_its_limit(queue):
    """A hoarder's heartbeats move the deadline only up to start + LEASE_SPAN * timeout + grace."""
    from server.queue.base import LEASE_SPAN

    await queue.push(items(1, 1, timeout=10.0))
    (lease,) = await queue.lease("hoarder", ["a1"], now=1000.0)
    limit = 1000.0 + LEASE_SPAN * 10.0 + 5.0
    assert await queue.extend(["a1"], now=1004.0) == 1
    assert await queue.expire(now=1004.0 + 10.0 + 5.0 - 0.01) == []  # moved to 1019
    for now in (1010.0, 1020.0, 1030.0, 1100.0):  # heartbeats keep coming
        await queue.extend(["a1"], now=now)
    assert await queue.expire(now=limit - 0.01) == []
    (expired,) = await queue.expire(now=limit + 0.01)
    assert expired.attempt == "a1" and await queue.ready_count() == 1
    claimed = await queue.claim("v2", "a2", items(1, 1, timeout=10.0)[0], now=2000.0)
    assert claimed is not None
    await queue.extend(["a2"], now=2100.0)
    assert [le.attempt for le in await queue.expire(now=2000.0 + LEASE_SPAN * 10.0 + 5.0 + 0.01)] == ["a2"]


# ------------------------------------------------------------------------------ fair share
def owned(job: int, researcher: int, n: int, start: int, priority: int = 0) -> list[ReadyItem]:
    return [ReadyItem(job, start + i, i, 10.0, priority, researcher) for i in range(n)]


async def lease_n(queue, n: int, volunteer: str = "v") -> list:
    return await queue.lease(volunteer, [f"{volunteer}-{i}" for i in range(n)], now=0.0)


async def test_fair_share_a_new_small_job_is_handed_out_at_once(queue):
    await queue.push(owned(1, researcher=7, n=1000, start=1))
    assert len(await lease_n(queue, 100, "early")) == 100  # researcher 7 alone: its pass grows
    await queue.push(owned(2, researcher=8, n=6, start=5000))
    got = [le.job for le in await lease_n(queue, 10)]
    # researcher 8 joins at the lowest pass of those active (not at 0, not behind 7's backlog): turns alternate
    assert got == [1, 2, 1, 2, 1, 2, 1, 2, 1, 2]
    assert [le.job for le in await lease_n(queue, 4, "w")] == [1, 2, 1, 1]  # ties: the lower id


async def test_fair_share_is_weighted_by_shares(queue):
    await queue.set_shares({7: 3.0, 8: 1.0})
    await queue.push(owned(1, researcher=7, n=100, start=1))
    await queue.push(owned(2, researcher=8, n=100, start=1000))
    got = [le.job for le in await lease_n(queue, 40)]
    assert (got.count(1), got.count(2)) == (30, 10)


async def test_fair_share_priority_within_a_researcher_and_owner_remembered(queue):
    await queue.push(owned(1, researcher=7, n=2, start=1))
    await queue.push(owned(3, researcher=7, n=2, start=10, priority=5))
    await queue.push(owned(2, researcher=8, n=2, start=20))
    got = [le.task for le in await lease_n(queue, 6)]
    assert got == [10, 20, 11, 21, 1, 2]  # 7's priority job first, turns with 8 alternate
    # a requeue (researcher unknown to the caller) goes back to the owner's queue
    assert [le.task for le in await queue.requeue(["v-0"])] == [10]
    await queue.push([ReadyItem(2, 22, 2, 10.0)])  # researcher 0 = "the job's recorded owner"
    assert {le.task for le in await lease_n(queue, 2, "w")} == {10, 22}


async def test_fair_share_exclusions_look_past_a_researcher(queue):
    await queue.push(owned(1, researcher=7, n=3, start=1))
    await queue.push(owned(2, researcher=8, n=1, start=10))
    await queue.exclude([(1, "v"), (2, "v"), (3, "v")])
    assert [le.task for le in await lease_n(queue, 4)] == [10]
    assert await queue.ready_count() == 3  # the excluded tasks stay for the others
    assert sorted(le.task for le in await lease_n(queue, 4, "w")) == [1, 2, 3]


@pytest.mark.parametrize("bad", [0, -1.0, float("nan"), float("inf"), "2"])
async def test_set_shares_refuses_bad_values(queue, bad):
    with pytest.raises(ValueError, match="share must be a number > 0"):
        await queue.set_shares({7: bad})


# ------------------------------------------------------------------------------ job affinity
_attempts = itertools.count()


async def lease_for(queue, n: int, volunteer: str = "v", jobs: tuple = (), network: str = "") -> list:
    """Lease ``n`` for a volunteer whose workers have ``jobs`` loaded."""
    attempts = [f"{volunteer}-{next(_attempts)}" for _ in range(n)]
    return await queue.lease(volunteer, attempts, now=0.0, network=network, jobs=list(jobs))


async def test_affinity_a_loaded_job_goes_first_then_age(queue):
    await queue.push(owned(1, researcher=7, n=5, start=1))  # the older job
    await queue.push(owned(2, researcher=7, n=5, start=100))
    assert [le.task for le in await lease_for(queue, 2, jobs=(2,))] == [100, 101]
    assert [le.task for le in await lease_for(queue, 2, "w")] == [1, 2]  # nothing loaded: by age
    # two loaded jobs: each gets its turn (a worker of each), the one named first first
    assert [le.task for le in await lease_for(queue, 2, jobs=(2, 1))] == [102, 3]
    assert [le.task for le in await lease_for(queue, 1, jobs=(424242,))] == [4]  # an unknown job: by age
    await queue.cancel_job(2)
    assert [le.task for le in await lease_for(queue, 1, jobs=(2,))] == [5]  # a cancelled job: ignored
    assert await lease_for(queue, 1, jobs=(2,)) == []


async def test_affinity_spreads_a_lease_over_the_loaded_jobs(queue):
    await queue.push(owned(1, researcher=7, n=10, start=1))
    await queue.push(owned(2, researcher=8, n=10, start=100))
    await queue.push(owned(3, researcher=9, n=10, start=200))
    got = [le.job for le in await lease_for(queue, 6, jobs=(3, 2))]
    assert sorted(got) == [2, 2, 2, 3, 3, 3]  # job 1 is not loaded: it waits (within the slack)


async def test_affinity_keeps_a_researchers_priority_first(queue):
    await queue.push(owned(1, researcher=7, n=3, start=1))
    await queue.push(owned(3, researcher=7, n=2, start=10, priority=5))
    assert [le.task for le in await lease_for(queue, 4, jobs=(1,))] == [10, 11, 1, 2]


@pytest.mark.parametrize("slack", [0.0, 4.0])
async def test_affinity_stays_within_fair_share_by_the_slack(queue, slack):
    """A volunteer with researcher 8's job loaded takes it while 8 is at most ``slack`` tasks ahead
    of researcher 7 (whose job it has not loaded); never more than ``slack + 1`` ahead."""
    queue.affinity_slack = slack
    await queue.push(owned(1, researcher=7, n=100, start=1))
    await queue.push(owned(2, researcher=8, n=100, start=1000))
    counts = {1: 0, 2: 0}
    ahead = []
    for _ in range(40):
        (lease,) = await lease_for(queue, 1, jobs=(2,))
        counts[lease.job] += 1
        ahead.append(counts[2] - counts[1])
    assert max(ahead) == slack + 1 and min(ahead) >= 0
    assert ahead[: int(slack) + 1] == list(range(1, int(slack) + 2))  # the loaded job first, up to the slack
    # a volunteer with nothing loaded takes the researcher behind
    assert [le.job for le in await lease_for(queue, 1, "fresh")] == [1]


async def test_affinity_respects_exclusions(queue):
    await queue.push(owned(1, researcher=7, n=3, start=1))
    await queue.push(owned(2, researcher=8, n=3, start=10))
    await queue.exclude([(1, "v"), (2, "net:10.0.0.0/24")])
    got = await lease_for(queue, 1, "v", jobs=(1,), network="net:10.0.0.0/24")
    assert [le.task for le in got] == [3]  # task 1 excludes v, task 2 its network
    assert [le.task for le in await lease_for(queue, 1, "v", jobs=(1,), network="net:10.0.0.0/24")] == [10]
    assert await queue.ready_count() == 4  # the excluded tasks stay ready, for the others
    assert [le.task for le in await lease_for(queue, 2, "w", jobs=(1,), network="net:10.0.1.0/24")] == [1, 2]


async def test_affinity_follows_claims_drops_and_requeues(queue):
    ready = owned(1, researcher=7, n=4, start=1)
    await queue.push(ready + owned(2, researcher=7, n=2, start=50))
    assert await queue.claim("x", "resumed", ready[1], now=0.0) is not None
    await queue.drop([ready[2]])
    assert [le.task for le in await lease_for(queue, 3, jobs=(1,))] == [1, 4, 50]  # not 2 (claimed), not 3
    await queue.requeue(["resumed"])
    assert [le.task for le in await lease_for(queue, 2, jobs=(1,))] == [2, 51]
    assert await queue.ready_count() == 0


async def test_affinity_makes_job_switches_rare_and_shares_stay_fair(queue):
    """Twelve one-worker volunteers ask in a random (seeded) order for one task at a time, over three
    researchers' jobs: with their loaded job named, far fewer tasks need a worker switch, and no
    researcher gets more than ``slack + 1`` tasks ahead of another."""

    async def run(affinity: bool, seed: int) -> tuple[int, int]:
        offset = 0 if affinity else 10  # other jobs and researchers for the second run
        pushed = [owned(offset + r, offset + r + 6, n=150, start=100_000 * (offset + r)) for r in (1, 2, 3)]
        for job in pushed:
            await queue.push(job)
        rng = random.Random(seed)
        loaded: dict[str, int] = {}
        counts = dict.fromkeys(range(offset + 1, offset + 4), 0)
        switches = spread = 0
        for _ in range(300):
            volunteer = f"v{rng.randrange(12)}"
            job = loaded.get(volunteer)
            (lease,) = await lease_for(queue, 1, volunteer, jobs=(job,) if affinity and job else ())
            switches += job is not None and lease.job != job
            loaded[volunteer] = lease.job
            counts[lease.job] += 1
            spread = max(spread, max(counts.values()) - min(counts.values()))
            await queue.release([lease.attempt])
        await queue.drop([item for job in pushed for item in job])  # what is left: not for the next run
        return switches, spread

    with_affinity, spread = await run(True, seed=1)
    without, spread_without = await run(False, seed=1)
    assert spread_without <= 1 and spread <= queue.affinity_slack + 1
    assert with_affinity * 5 < without, (with_affinity, without)


async def test_redis_affinity_trusts_the_researchers_zset_not_the_job_index(redis_client):
    """The job index only points the way: an entry its researcher's zset lacks (never the case
    unless Redis was written by hand) is dropped, not leased twice; tasks made ready before the index
    existed (an upgrade) are still leased, in fair-share order."""
    queue = RedisQueue(redis_client, "test-instance", grace=5.0)
    ready = owned(1, researcher=7, n=3, start=1)
    await queue.push(ready)
    (first,) = await lease_for(queue, 1, "x")
    await redis_client.zadd(f"{keys.READY_JOB}1", {ready[0].member: ready[0].score})  # a stale entry
    await redis_client.zrem(f"{keys.READY_JOB}1", ready[2].member)  # as if pushed before the index
    got = await lease_for(queue, 3, "v", jobs=(1,))
    assert first.task == 1 and [le.task for le in got] == [2, 3]
    assert await queue.live([first.attempt]) != {} and await queue.ready_count() == 0


async def test_computing_reports_made_together_are_each_counted(queue):
    """10,000 woken volunteers report what they compute at once: on Redis in one round trip (not one
    pipeline each), and every report counts, as does every one withdrawn."""
    await asyncio.gather(*(queue.computing(f"k{i}", f"v{i}", {1: 2}, [], 30.0) for i in range(100)))
    assert await queue.computing_counts([1]) == {1: (100, 200)}
    if isinstance(queue, RedisQueue):
        assert 1 <= queue.reports.batches <= 2
    await asyncio.gather(*(queue.computing(f"k{i}", f"v{i}", {}, [1], 30.0) for i in range(60)))
    assert await queue.computing_counts([1]) == {1: (40, 80)}


# ----------------------------------------------------------------------- chunked hand-out
async def test_lease_more_takes_the_jobs_next_tasks_in_order_skipping_exclusions(queue):
    await queue.push(owned(1, researcher=7, n=20, start=1))
    await queue.push(owned(2, researcher=8, n=5, start=100))
    (head,) = await lease_n(queue, 1)
    assert head.task == 1
    await queue.exclude([(3, "v")])
    more = await queue.lease_more("v", 1, ["m1", "m2", "m3"], now=0.0, head=head.attempt)
    assert [le.task for le in more] == [2, 4, 5]  # consecutive, but never an excluded task
    assert all(le.volunteer == "v" and le.job == 1 for le in more)
    assert (await queue.running([1]))[1] == 4 and await queue.ready_count() == 16 + 5
    assert [le.task for le in await queue.lease_more("w", 1, ["w1"], now=0.0)] == [3]  # another may take it
    # fair share counts tasks: researcher 7 had 5 (1 + 3 + 1), so researcher 8's 5 go first
    assert [le.job for le in await lease_n(queue, 6, "x")] == [2, 2, 2, 2, 2, 1]
    await queue.cancel_job(1)
    assert await queue.lease_more("v", 1, ["m4"], now=0.0) == []


async def test_a_chunks_leases_may_last_its_tasks_one_after_another(queue):
    """Heartbeats keep a chunk of k tasks alive up to start + (k + LEASE_SPAN) * timeout + grace, the head
    included; requeueing them makes every task ready again."""
    from server.queue.base import LEASE_SPAN

    await queue.push(items(1, 6, timeout=10.0))
    (head,) = await queue.lease("v", ["h"], now=1000.0)
    more = await queue.lease_more("v", 1, ["m1", "m2", "m3"], now=1000.0, head="h")
    chunk = ["h"] + [le.attempt for le in more]
    limit = 1000.0 + (3 + LEASE_SPAN) * 10.0 + 5.0
    for now in range(1010, int(limit), 10):  # past a single task's limit (1025): still alive
        await queue.extend(chunk, now=float(now))
    assert await queue.expire(now=limit - 0.01) == []
    assert sorted(le.attempt for le in await queue.expire(now=limit + 0.01)) == sorted(chunk)
    assert await queue.ready_count() == 6
