"""The supervisor's decisions: how many workers, how much prefetch, when to pause, how to back off.

Pure functions of plain values, so they run the same in CPython (unit tests) and in the page's
Python, which feeds them what the browser reports (``navigator.hardwareConcurrency``, the
Battery Status and Network Information APIs, page visibility) and the volunteer's settings.
Every decision carries its reasons in words, shown on the page and sent to the server in the
``throttle`` message.
"""

from __future__ import annotations

import dataclasses
import math
import random
from typing import TypeVar

LOW_BATTERY = 0.20  # discharging below this: pause
SLOW_CONNECTIONS = frozenset({"slow-2g", "2g"})
PREFETCH_PER_WORKER = 1  # one task waiting per busy worker hides the round trip...
PREFETCH_COVER_SECONDS = 0.5  # ...unless tasks are short: then hold enough to cover this long
MAX_PREFETCH_PER_WORKER = 8
S = TypeVar("S")  # a worker slot, whatever the caller uses
T = TypeVar("T")  # a task
BATCH_RESULTS = 8  # on a slow connection results go in batches of this many...
BATCH_SECONDS = 20.0  # ...or after this long, whichever comes first
HIDDEN_POLICIES = ("continue", "one", "pause")
DEFAULT_CPU_CAP = 100
MIN_CPU_CAP = 10


@dataclasses.dataclass(frozen=True)
class Battery:
    """What the Battery Status API says; ``None`` in its place means the API is missing."""

    charging: bool
    level: float  # 0..1


@dataclasses.dataclass(frozen=True)
class Network:
    """What the Network Information API says; ``None`` in its place means the API is missing."""

    effective_type: str = ""  # "slow-2g", "2g", "3g", "4g" or "" when unknown
    save_data: bool = False
    downlink: float | None = None  # Mbit/s


@dataclasses.dataclass(frozen=True)
class Settings:
    """The volunteer's choices, saved in the browser."""

    cpu_cap: int = DEFAULT_CPU_CAP  # percent of the device's cores we may use
    when_hidden: str = "continue"  # one of HIDDEN_POLICIES
    paused: bool = False  # the volunteer pressed Stop


@dataclasses.dataclass(frozen=True)
class Device:
    """What the browser reports about the device right now."""

    cores: int | None  # navigator.hardwareConcurrency; None when missing
    battery: Battery | None = None
    network: Network | None = None
    hidden: bool = False


@dataclasses.dataclass(frozen=True)
class Plan:
    """What the supervisor should do now, and why."""

    workers: int
    max_workers: int  # before battery, network and visibility
    prefetch: int  # tasks to hold beyond one per running worker
    batch_results: bool
    paused: bool
    reasons: tuple[str, ...]
    pause_reason: str = ""  # the first reason to pause, shown as the page's headline detail

    def state(self) -> dict:
        """The ``throttle`` message's ``state``: JSON-ready and stable for comparison."""
        return {
            "workers": self.workers,
            "max_workers": self.max_workers,
            "prefetch": self.prefetch,
            "batch_results": self.batch_results,
            "paused": self.paused,
            "reasons": list(self.reasons),
            "pause_reason": self.pause_reason,
        }

    def want(self, held: int) -> int:
        """How many tasks to ask for when holding ``held`` (running or waiting)."""
        if self.paused:
            return 0
        return max(0, self.workers + self.prefetch - held)


def clamp_cap(value: object) -> int:
    """A saved CPU cap (percent) made valid: an integer in MIN_CPU_CAP..100."""
    try:
        cap = int(value)  # type: ignore[call-overload]
    except (TypeError, ValueError):
        return DEFAULT_CPU_CAP
    return max(MIN_CPU_CAP, min(100, cap))


def max_workers(cores: int | None, cpu_cap: int) -> int:
    """hardwareConcurrency − 1 (one core left for the volunteer), at least 1, within the cap.

    The cap is a percentage of all cores: 50 % of 8 cores allows 4 workers.
    """
    cores = cores if isinstance(cores, int) and cores > 0 else 2  # missing: assume a small device
    by_cores = max(1, cores - 1)
    by_cap = max(1, cores * clamp_cap(cpu_cap) // 100)
    return min(by_cores, by_cap)


def prefetch_per_worker(task_seconds: float | None) -> int:
    """Tasks to hold per worker beyond the running one: more when tasks are short, so that a
    round trip to the server (tens of ms) does not leave a worker idle between tiny tasks."""
    if task_seconds is None or task_seconds >= PREFETCH_COVER_SECONDS:
        return PREFETCH_PER_WORKER
    wanted = math.ceil(PREFETCH_COVER_SECONDS / max(task_seconds, 0.001))
    step = 1 << (wanted - 1).bit_length()  # powers of two: the plan does not flap with the average
    return max(PREFETCH_PER_WORKER, min(MAX_PREFETCH_PER_WORKER, step))


def plan(device: Device, settings: Settings, task_seconds: float | None = None) -> Plan:
    """Decide the worker count, prefetch and batching from the device and the settings.

    ``task_seconds`` is the recent average time of one task here (None before the first).
    """
    top = max_workers(device.cores, settings.cpu_cap)
    cores_text = f"{device.cores} cores" if device.cores else "core count unknown (assumed 2)"
    reasons = [f"{cores_text}, CPU cap {clamp_cap(settings.cpu_cap)} % → at most {top}"]
    workers, pause_reasons = top, []
    if settings.paused:
        pause_reasons.append("not running: press Start to compute")
        reasons.append("not running: press Start to compute")
    battery = device.battery
    if battery is None:
        reasons.append("battery: not reported by this browser")
    elif battery.charging:
        reasons.append(f"battery: charging ({battery.level:.0%})")
    elif battery.level < LOW_BATTERY:
        pause_reasons.append(f"Battery low ({battery.level:.0%}): paused until the device is charging.")
        reasons.append(f"battery low ({battery.level:.0%}): paused until charging")
    else:
        workers = max(1, top // 2)
        reasons.append(f"on battery ({battery.level:.0%}): {workers} worker(s)")
    prefetch, batch = prefetch_per_worker(task_seconds), False
    network = device.network
    if network is None:
        reasons.append("network: not reported by this browser")
    elif network.save_data or network.effective_type in SLOW_CONNECTIONS:
        prefetch, batch = 0, True
        why = "data saver on" if network.save_data else f"slow connection ({network.effective_type})"
        reasons.append(f"{why}: no prefetch, results sent in batches")
    if device.hidden:
        if settings.when_hidden == "pause":
            pause_reasons.append("This tab is in the background: paused, as you chose.")
            reasons.append("tab hidden: paused, as you chose")
        elif settings.when_hidden == "one":
            workers = 1
            reasons.append("tab hidden: 1 worker, as you chose")
    paused = bool(pause_reasons)
    if paused:
        workers = 0
    return Plan(
        workers=workers,
        max_workers=top,
        prefetch=0 if paused else prefetch * max(workers, 1),
        batch_results=batch,
        paused=paused,
        reasons=tuple(reasons),
        pause_reason=pause_reasons[0] if pause_reasons else "",
    )


def backoff(failures: int, base: float = 0.5, cap: float = 30.0, rand: float | None = None) -> float:
    """Reconnect delay after ``failures`` consecutive failures: exponential, full jitter.

    ``rand`` in [0, 1) fixes the jitter (tests); by default it is random. Never below base/2,
    so a server that refuses at once is not hammered.
    """
    ceiling = min(cap, base * 2 ** max(0, failures))
    r = random.random() if rand is None else rand
    return max(base / 2, ceiling * r)


def poll_delay(empty_replies: int) -> float:
    """How long to wait before asking again after ``empty_replies`` empty ``tasks`` in a row: only
    from a server of protocol 3 (one of version 4 holds the ready and pushes the tasks)."""
    return min(2.0, 0.5 * 2 ** max(0, empty_replies - 1))


def should_flush(pending: int, oldest_age: float, batch: bool) -> bool:
    """Whether results waiting to be sent should go now."""
    if pending <= 0:
        return False
    if not batch:
        return True
    return pending >= BATCH_RESULTS or oldest_age >= BATCH_SECONDS


def assign(workers: list[tuple[S, object]], tasks: list[tuple[T, object]]) -> list[tuple[S, T]]:
    """Pair idle workers with waiting tasks so that a worker runs the tasks of one job only.

    ``workers`` are ``(worker, owner)``: ``owner`` is the job whose code ran in it, None for a
    fresh one; ``tasks`` are ``(task, job)`` in queue order. A worker first takes a task of its
    own job; fresh workers then take the first tasks left; a worker of another job takes one
    only after them, and the pool gives it a fresh interpreter before the task runs (a switch).
    """
    left = list(tasks)
    pairs: list[tuple[S, T]] = []
    others = []
    for worker, owner in workers:
        mine = next((i for i, (_, job) in enumerate(left) if owner is not None and job == owner), None)
        if mine is None:
            others.append((worker, owner))
        else:
            pairs.append((worker, left.pop(mine)[0]))
    others.sort(key=lambda pair: pair[1] is not None)  # fresh workers first: no switch needed
    pairs.extend((worker, task) for (worker, _), (task, _) in zip(others, left, strict=False))
    return pairs


def loaded_jobs(workers: list[tuple[object, bool]], limit: int) -> list:
    """The jobs to name in ``ready`` as loaded (job affinity), from ``(owner, idle)`` per worker.

    ``owner`` is the job whose code ran in the worker (None for a fresh one, such as the spare,
    which is not listed). Distinct jobs, those of idle workers first (they take the next tasks),
    at most ``limit``: the server then prefers their tasks, so a worker seldom has to be replaced.
    """
    ordered = [owner for owner, idle in workers if idle] + [owner for owner, idle in workers if not idle]
    return list(dict.fromkeys(owner for owner in ordered if owner is not None))[:limit]
