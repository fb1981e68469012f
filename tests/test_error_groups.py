"""Errors grouped by exception type and masked message: one problem over many inputs is one group."""

from __future__ import annotations

import pytest

from server.jobs.error_groups import GROUP_INPUTS, ErrorGroups, signature


@pytest.mark.parametrize(
    ("error", "expected"),
    [
        ("Traceback (most recent call last):\n  ...\nValueError: bad value 17\n", "ValueError: bad value <n>"),
        ("ValueError: bad value -3.5e-7 at 0xdeadbeef", "ValueError: bad value <n> at <hex>"),
        ("KeyError: 'alpha'", "KeyError: <str>"),
        ('RuntimeError: run "x-1" of 3f2a9c1b0e7d4a11 failed', "RuntimeError: run <str> of <hex> failed"),
        ("LookupError: 123e4567-e89b-12d3-a456-426614174000", "LookupError: <hex>"),
        (
            "TypeError: f() takes 2 positional arguments but 3 were given",
            "TypeError: f() takes <n> positional arguments but <n> were given",
        ),
        ("ZeroDivisionError: division by zero", "ZeroDivisionError: division by zero"),
        ("NameError: name 'item2' is not defined", "NameError: name <str> is not defined"),
        ("ValueError: item2 and v1.2 stay", "ValueError: item2 and v1.2 stay"),  # numbers inside words are words
        ("", "error"),
        (  # the validator's "no agreement": grouped by its headline, not by the last variant it lists
            'NoAgreement: no quorum after 3 replicas; the variants:\n  2x {"sq":4}\n  1x 0.8123',
            "NoAgreement: no quorum after <n> replicas; the variants:",
        ),
    ],
)
def test_signature_masks_values(error, expected):
    assert signature(error) == expected


def test_groups_count_inputs_and_one_traceback():
    groups = ErrorGroups()
    for x in range(200):
        groups.add({"index": x, "input": x, "error": f"Traceback ...\n  line 3\nValueError: bad value {x}"})
    groups.add({"index": 200, "input": "z", "error": "ZeroDivisionError: division by zero"})
    first, second = groups.largest_first()
    assert first["message"] == "ValueError: bad value <n>" and first["type"] == "ValueError"
    assert first["count"] == 200 and first["inputs"] == list(range(GROUP_INPUTS))
    assert first["example"] == "ValueError: bad value 0" and first["traceback"].startswith("Traceback")
    assert second["count"] == 1 and second["inputs"] == ["z"]


async def test_two_hundred_failures_make_one_group(serve, volunteers):
    api, _ = await serve()
    code = "def main(x):\n    raise ValueError(f'bad value {x}')\n"
    job = await api.submit(code, {"range": [0, 200]}, max_attempts=2)
    volunteers(api.url, 3)
    status = await api.wait(job, 120)
    assert status["counts"]["failed"] == 200
    async with api.session.get(f"{api.url}/api/jobs/{job}/errors", headers=api.headers()) as resp:
        body = await resp.json()
    (group,) = body["groups"]
    assert group["message"] == "ValueError: bad value <n>" and group["count"] == 200
    assert len(group["inputs"]) == GROUP_INPUTS and "line 2, in main" in group["traceback"]
