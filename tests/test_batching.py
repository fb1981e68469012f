"""server/batching.py: calls made together go in one batch, and each caller gets its own answer."""

from __future__ import annotations

import asyncio

import pytest

from server.batching import MAX_KEYS, Batcher, Coalescer


class Recorder:
    """A ``run`` for a Batcher that records its batches; "boom" items fail alone, "all" fails the batch."""

    def __init__(self) -> None:
        self.batches: list[list[str]] = []
        self.gate = asyncio.Event()
        self.gate.set()

    async def run(self, items: list[str]) -> list[str | BaseException]:
        self.batches.append(list(items))
        await self.gate.wait()
        if "all" in items:
            raise ConnectionError("the connection dropped")
        return [ValueError(item) if item == "boom" else item.upper() for item in items]


async def test_calls_made_together_go_in_one_batch_and_each_gets_its_answer():
    rec = Recorder()
    batcher = Batcher(rec.run)
    got = await asyncio.gather(*(batcher.call(f"v{i}") for i in range(50)))
    assert got == [f"V{i}" for i in range(50)]
    assert rec.batches == [[f"v{i}" for i in range(50)]] and batcher.batches == 1
    assert await batcher.call("alone") == "ALONE"  # a lone call goes at once, in a batch of its own
    assert rec.batches[-1] == ["alone"]


async def test_calls_made_while_batches_are_under_way_wait_for_the_next():
    rec = Recorder()
    rec.gate.clear()
    batcher = Batcher(rec.run, flights=1)
    first = asyncio.ensure_future(batcher.call("a"))
    await asyncio.sleep(0.01)  # "a" is under way: the others wait
    later = [asyncio.ensure_future(batcher.call(x)) for x in ("b", "c", "d")]
    await asyncio.sleep(0.01)
    assert rec.batches == [["a"]]
    rec.gate.set()
    assert await first == "A" and await asyncio.gather(*later) == ["B", "C", "D"]
    assert rec.batches == [["a"], ["b", "c", "d"]]


async def test_an_error_goes_to_its_caller_and_a_failed_batch_to_all_of_its_callers():
    rec = Recorder()
    batcher = Batcher(rec.run)
    got = await asyncio.gather(batcher.call("x"), batcher.call("boom"), batcher.call("y"), return_exceptions=True)
    assert got[0] == "X" and got[2] == "Y" and isinstance(got[1], ValueError)
    got = await asyncio.gather(batcher.call("x"), batcher.call("all"), return_exceptions=True)
    assert all(isinstance(g, ConnectionError) for g in got)
    assert await batcher.call("z") == "Z"  # and it carries on


async def test_a_cancelled_caller_leaves_the_others_their_answers():
    rec = Recorder()
    rec.gate.clear()
    batcher = Batcher(rec.run)
    calls = [asyncio.ensure_future(batcher.call(x)) for x in ("a", "b", "c")]
    await asyncio.sleep(0.01)
    calls[1].cancel()
    rec.gate.set()
    assert await calls[0] == "A" and await calls[2] == "C"
    with pytest.raises(asyncio.CancelledError):
        await calls[1]


async def test_keyed_loads_share_one_fetch_and_a_key_asked_with_two_args_is_fetched_twice():
    fetches: list[dict] = []

    async def fetch(wanted: dict[int, str]) -> dict[int, str]:
        fetches.append(dict(wanted))
        return {key: f"{key}@{owner}" for key, owner in wanted.items() if key != 404}

    loads = Coalescer(fetch)
    got = await asyncio.gather(loads.load({1: "", 2: ""}), loads.load({3: "v", 404: ""}), loads.load({}))
    assert got == [{1: "1@", 2: "2@"}, {3: "3@v"}, {}] and fetches == [{1: "", 2: "", 3: "v", 404: ""}]
    # Task 7's checkpoint asked for two lineages at once (two volunteers' replicas): never one for both
    fetches.clear()
    got = await asyncio.gather(loads.load({7: "alice"}), loads.load({7: "bob"}), loads.load({8: "alice"}))
    assert got == [{7: "7@alice"}, {7: "7@bob"}, {8: "8@alice"}]
    assert fetches[0] == {7: "alice"} and {7: "bob", 8: "alice"} in fetches and len(fetches) == 2
    # at most MAX_KEYS keys a fetch
    fetches.clear()
    await asyncio.gather(*(loads.load({k: ""}) for k in range(MAX_KEYS + 5)))
    assert [len(f) for f in fetches] == [MAX_KEYS, 5]
