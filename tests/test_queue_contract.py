"""One contract, two queues: the in-process queue and the Redis queue pass the same tests."""

from __future__ import annotations

import asyncio

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
