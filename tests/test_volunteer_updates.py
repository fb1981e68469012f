"""The page's side of long tasks, in CPython: worker updates matched to their request, and the
page's own throttle (latest wins) before they go to the server."""

from __future__ import annotations

import asyncio
import json

from server import protocol as P
from webapp.calls import Calls
from webapp.volunteer.updates import Updates


def _update(state: object = None, progress: object = None, partials: list | None = None) -> str:
    text = None if state is None else json.dumps(state)
    return json.dumps({"state": text, "progress": progress, "partials": partials or []})


async def test_updates_reach_the_listener_of_their_open_request_only() -> None:
    calls = Calls(asyncio.get_running_loop())
    got: list[str] = []
    request_id, future = calls.open(got.append)
    other_id, _ = calls.open()  # no listener: its updates are dropped
    assert calls.settle({"id": request_id, "type": "update", "result": "u1"})
    assert not calls.settle({"id": other_id, "type": "update", "result": "u2"})
    assert not calls.settle({"id": request_id, "type": "update", "result": None})  # not text
    assert not calls.settle({"id": 999, "type": "update", "result": "u3"})  # no such request
    assert got == ["u1"] and calls.dropped == 3
    assert calls.settle({"id": request_id, "result": json.dumps({"result": 1, "output": "", "elapsed": 0})})
    assert (await future)["result"] == 1
    assert not calls.settle({"id": request_id, "type": "update", "result": "late"})  # answered: closed
    assert got == ["u1"]


def test_page_throttles_latest_wins_and_sends_the_last_partials() -> None:
    updates = Updates(P, every=5.0)
    assert updates.add("a", _update({"step": 1}, 0.1, [1])) == '{"step": 1}'
    [first] = updates.due(now=100.0)
    assert (first.attempt, first.state, first.progress, first.partials) == ("a", '{"step": 1}', 0.1, [1])
    updates.add("a", _update({"step": 2}, 0.2, [2]))
    updates.add("a", _update({"step": 3}, 0.3, [3]))
    assert updates.due(now=102.0) == []  # too soon: kept
    [second] = updates.due(now=105.0)
    assert (second.state, second.progress, second.partials) == ('{"step": 3}', 0.3, [2, 3])  # latest wins
    assert updates.progress == {"a": 0.3}
    updates.add("a", _update(partials=[4]))
    last = updates.finish("a")
    assert last is not None and (last.state, last.progress, last.partials) == (None, None, [4])
    assert updates.progress == {} and updates.due(now=200.0) == []


def test_page_drops_what_a_runner_never_sends() -> None:
    updates = Updates(P, every=0.0)
    bad = [
        "{not json",
        "[1]",
        json.dumps({"state": None, "progress": 2.0, "partials": []}),
        json.dumps({"state": "{oops", "progress": None, "partials": []}),
        json.dumps({"state": None, "progress": None, "partials": [], "attempt": "someone-else", "colour": 1}),
    ]
    for text in bad:
        assert updates.add("a", text) is None
    assert updates.dropped == len(bad) and updates.due(now=1.0) == []
    # an attempt named in the update cannot redirect it to another attempt
    updates.add("a", json.dumps({"state": None, "progress": 0.5, "partials": [], "attempt": "b"}))
    assert updates.progress == {"a": 0.5} and [u.attempt for u in updates.due(now=2.0)] == ["a"]
