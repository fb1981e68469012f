"""The supervisor's pure decisions: worker count, throttling, backoff, batching."""

from __future__ import annotations

import pytest

from workers.supervisor import (
    BATCH_RESULTS,
    BATCH_SECONDS,
    Battery,
    Device,
    Network,
    Settings,
    backoff,
    clamp_cap,
    max_workers,
    plan,
    poll_delay,
    prefetch_per_worker,
    should_flush,
)


@pytest.mark.parametrize(
    ("cores", "cap", "expected"),
    [
        (1, 100, 1),  # at least one
        (2, 100, 1),  # leave one core to the volunteer
        (4, 100, 3),
        (8, 100, 7),
        (8, 50, 4),  # the cap is a share of all cores
        (8, 10, 1),
        (16, 25, 4),
        (4, 75, 3),
        (None, 100, 1),  # unknown core count: assume a small device
        (0, 100, 1),
    ],
)
def test_max_workers(cores: int | None, cap: int, expected: int) -> None:
    assert max_workers(cores, cap) == expected


@pytest.mark.parametrize(("value", "expected"), [(5, 10), (150, 100), ("60", 60), ("x", 100), (None, 100)])
def test_clamp_cap(value: object, expected: int) -> None:
    assert clamp_cap(value) == expected


def test_full_count_when_charging_or_unknown() -> None:
    charging = plan(Device(cores=8, battery=Battery(charging=True, level=0.1)), Settings())
    assert (charging.workers, charging.paused) == (7, False)
    unknown = plan(Device(cores=8), Settings())
    assert unknown.workers == 7
    assert any("not reported" in r for r in unknown.reasons)


def test_fewer_workers_on_battery_and_pause_when_low() -> None:
    on_battery = plan(Device(cores=8, battery=Battery(charging=False, level=0.8)), Settings())
    assert (on_battery.workers, on_battery.paused) == (3, False)
    low = plan(Device(cores=8, battery=Battery(charging=False, level=0.1)), Settings())
    assert (low.workers, low.paused, low.want(0)) == (0, True, 0)
    assert "Battery low (10%)" in low.pause_reason
    assert any("battery low" in r for r in low.reasons)
    small = plan(Device(cores=2, battery=Battery(charging=False, level=0.5)), Settings())
    assert small.workers == 1  # never below one while running


def test_slow_network_or_save_data_means_no_prefetch_and_batches() -> None:
    fast = plan(Device(cores=4, network=Network(effective_type="4g")), Settings())
    assert (fast.prefetch, fast.batch_results) == (3, False)
    assert fast.want(0) == 6 and fast.want(6) == 0
    for network in (Network(effective_type="2g"), Network(effective_type="slow-2g"), Network("4g", save_data=True)):
        slow = plan(Device(cores=4, network=network), Settings())
        assert (slow.workers, slow.prefetch, slow.batch_results) == (3, 0, True)
        assert slow.want(1) == 2


def test_hidden_tab_follows_the_setting() -> None:
    device = Device(cores=4, hidden=True)
    assert plan(device, Settings(when_hidden="continue")).workers == 3
    assert plan(device, Settings(when_hidden="one")).workers == 1
    paused = plan(device, Settings(when_hidden="pause"))
    assert paused.paused and paused.workers == 0
    assert plan(Device(cores=4, hidden=False), Settings(when_hidden="pause")).workers == 3


def test_stopped_by_the_volunteer() -> None:
    stopped = plan(Device(cores=4), Settings(paused=True))
    assert stopped.paused and stopped.workers == 0 and stopped.want(0) == 0


def test_state_is_json_ready_and_stable() -> None:
    a = plan(Device(cores=4, battery=Battery(False, 0.5)), Settings(cpu_cap=50)).state()
    b = plan(Device(cores=4, battery=Battery(False, 0.5)), Settings(cpu_cap=50)).state()
    assert a == b
    assert a["workers"] == 1 and a["max_workers"] == 2 and isinstance(a["reasons"], list)


def test_backoff_grows_with_jitter_and_is_capped() -> None:
    assert backoff(0, rand=0.999) < 0.5
    assert backoff(3, rand=0.999) == pytest.approx(4.0, rel=0.01)
    assert backoff(30, rand=0.999) == pytest.approx(30.0, rel=0.01)
    assert backoff(5, rand=0.0) == 0.25  # never zero: a refusing server is not hammered
    assert len({backoff(6) for _ in range(20)}) > 1


def test_poll_delay() -> None:
    assert [poll_delay(n) for n in (1, 2, 3, 4, 10)] == [0.5, 1.0, 2.0, 2.0, 2.0]


def test_should_flush() -> None:
    assert not should_flush(0, 100.0, batch=False)
    assert should_flush(1, 0.0, batch=False)
    assert not should_flush(1, 0.0, batch=True)
    assert should_flush(BATCH_RESULTS, 0.0, batch=True)
    assert should_flush(1, BATCH_SECONDS, batch=True)


def test_prefetch_grows_for_short_tasks_only() -> None:
    assert [prefetch_per_worker(t) for t in (None, 2.0, 0.5, 0.2, 0.1, 0.001, 0.0)] == [1, 1, 1, 4, 8, 8, 8]
    assert plan(Device(cores=3), Settings(), task_seconds=0.1).want(0) == 2 + 2 * 8
    slow = plan(Device(cores=3, network=Network(effective_type="2g")), Settings(), task_seconds=0.01)
    assert slow.prefetch == 0  # a slow connection still gets no prefetch


def test_assign_keeps_each_worker_on_one_job() -> None:
    from workers.supervisor import assign

    tasks = [("a1", "A"), ("b1", "B"), ("a2", "A"), ("c1", "C")]
    # A worker takes a task of its own job first, whatever the queue order.
    assert assign([("w1", "B")], tasks) == [("w1", "b1")]
    # Fresh workers take what is left before a worker of another job is switched.
    pairs = assign([("w1", "C"), ("w2", "A"), ("w3", None), ("w4", "Z")], tasks)
    assert sorted(pairs) == [("w1", "c1"), ("w2", "a1"), ("w3", "b1"), ("w4", "a2")]
    assert assign([("w1", "Z"), ("w2", None)], [("a1", "A")]) == [("w2", "a1")]
    assert assign([("w1", "Z")], [("a1", "A")]) == [("w1", "a1")]  # the pool switches w1
    assert assign([("w1", None)], []) == [] and assign([], tasks) == []


def test_loaded_jobs_name_idle_workers_jobs_first_distinct_and_bounded() -> None:
    """What ``ready.jobs`` names (job affinity): fresh workers (the spare) have none."""
    from workers.supervisor import loaded_jobs

    workers = [(3, False), (None, True), (5, True), (3, True), (7, False), (5, False)]
    assert loaded_jobs(workers, 16) == [5, 3, 7]
    assert loaded_jobs(workers, 2) == [5, 3]
    assert loaded_jobs([(None, True)], 16) == [] and loaded_jobs([], 16) == []
