"""The page's side of its workers' messages (``webapp/calls.py``), as research code would forge them."""

from __future__ import annotations

import asyncio
import json

from webapp.calls import Calls

OUTCOME = {"result": [1, 2], "output": "hi\n", "error": None, "elapsed": 0.25}


async def test_an_answer_settles_its_own_request_only() -> None:
    calls = Calls()
    first, first_future = calls.open()
    second, second_future = calls.open()
    assert first != second
    assert calls.settle({"id": second, "result": json.dumps(OUTCOME)})
    assert second_future.result() == OUTCOME and not first_future.done()
    assert calls.dropped == 0 and list(calls.pending) == [first]


async def test_messages_that_answer_nothing_asked_are_dropped_and_counted() -> None:
    calls = Calls()
    request, future = calls.open()
    forged = [
        {"id": request + 1000, "result": json.dumps(OUTCOME)},  # an id never asked
        {"id": str(request), "result": json.dumps(OUTCOME)},  # not an id
        {"id": True, "result": json.dumps(OUTCOME)},  # bool is not an id either
        {"id": None, "result": None},  # a bare string or number has no fields
        {"type": "ready", "id": request, "boot": 0.1},  # a "ready" is not an answer
    ]
    for fields in forged:
        assert not calls.settle(fields)
    assert not future.done() and calls.dropped == len(forged)
    assert calls.settle({"id": request, "result": json.dumps(OUTCOME)})
    assert not calls.settle({"id": request, "result": json.dumps({"result": "again"})})  # answered already
    assert future.result() == OUTCOME and calls.dropped == len(forged) + 1


async def test_an_answer_carries_only_what_an_outcome_holds() -> None:
    calls = Calls()
    request, future = calls.open()
    claims = {"result": 1, "output": 5, "error": ["x"], "elapsed": "fast", "stopped": True, "timeout": True}
    calls.settle({"id": request, "result": json.dumps(claims)})
    assert future.result() == {"result": 1, "output": "", "error": None, "elapsed": 0.0}  # the page decides the rest


async def test_a_garbled_or_failed_answer_is_a_crash() -> None:
    calls = Calls()
    answers = [{"result": "not json"}, {"result": "[1]"}, {"result": 7}, {"error": "RangeError: stack"}]
    futures = []
    for fields in answers:
        request, future = calls.open()
        futures.append(future)
        assert calls.settle({"id": request, **fields})
    for future in futures:
        assert future.result()["crashed"] is True and future.result()["error"].startswith("worker error")


async def test_a_stopped_worker_settles_what_was_open() -> None:
    calls = Calls()
    futures = [calls.open()[1] for _ in range(3)]
    futures[0].cancel()  # a caller that stopped waiting
    calls.fail_all({"error": "worker stopped", "stopped": True})
    assert [f.cancelled() or f.result()["stopped"] for f in futures] == [True, True, True]
    assert not calls.pending
    await asyncio.sleep(0)


async def test_a_chunks_answer_is_one_outcome_per_task_and_nothing_else() -> None:
    calls = Calls()
    request, future = calls.open()
    forged = {**OUTCOME, "timeout": True, "crashed": False, "evil": 1}
    many = {"outcomes": [OUTCOME, forged, {**OUTCOME, "error": "boom", "timeout": True}]}
    assert calls.settle({"id": request, "result": json.dumps(many)})
    first, second, third = future.result()["outcomes"]
    assert first == OUTCOME and second == OUTCOME  # a timeout without an error, and extra keys: dropped
    assert third == {**OUTCOME, "error": "boom", "timeout": True}
    bad, bad_future = calls.open()
    assert calls.settle({"id": bad, "result": json.dumps({"outcomes": [1, 2]})})
    assert bad_future.result()["crashed"] is True
