"""Prometheus metrics of one server process, in a registry of its own (never the global default one:
a test process runs several apps, and each must count only its own work).

Counters move where the work happens (dispatch); gauges are read fresh at each scrape
(``Metrics.refresh``) from the queue, the connected sockets and the jobs table. Label values come
from our own fixed sets only, never from what a volunteer sent, so nobody can grow the series.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, Metric
from prometheus_client.registry import Collector

from server.jobs.outage import is_outage
from server.protocol import JobState, ThrottleState
from server.store import stats

if TYPE_CHECKING:
    from server.jobs.dispatch import Dispatcher

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
THROTTLE_STATES = ("full", "throttled", "paused", "unreported")


class _LoopRestarts(Collector):
    """``uvm_loop_restarts_total{loop}``, read from the dispatcher's loop supervisor at each scrape."""

    def __init__(self, dispatcher: Dispatcher) -> None:
        self.dispatcher = dispatcher

    def collect(self) -> Iterator[Metric]:
        family = CounterMetricFamily("uvm_loop_restarts", "Background loops restarted after an error", labels=["loop"])
        for loop, n in sorted(loop_restarts(self.dispatcher).items()):
            family.add_metric([loop], n)
        yield family


def loop_restarts(dispatcher: Any) -> dict[str, int]:
    """Restarts per background loop, as the loop supervisor (server/jobs/supervise.py) counts them."""
    return {name: state.restarts for name, state in dispatcher.loops.items()}


class Metrics:
    """The series of one process; ``registry`` is what ``/metrics`` renders."""

    def __init__(self) -> None:
        r = self.registry = CollectorRegistry(auto_describe=True)
        self.handed_out = Counter("uvm_tasks_handed_out", "Tasks leased to volunteers (attempts started)", registry=r)
        self.affine = Counter(
            "uvm_tasks_handed_out_to_loaded_jobs",
            "Tasks leased to a volunteer that named their job as loaded (job affinity: no worker switch)",
            registry=r,
        )
        self.attempts = Counter(
            "uvm_attempts_finished",
            "Attempts ended, by outcome (done, error, timeout, late, expired, abandoned)",
            ["outcome"],
            registry=r,
        )
        self.commit_seconds = Histogram(
            "uvm_result_commit_seconds", "Time to commit one batch of results", buckets=LATENCY_BUCKETS, registry=r
        )
        self.strays = Counter(
            "uvm_tasks_restored", "Open tasks found neither ready nor leased, pushed again (should stay 0)", registry=r
        )
        self.held = Counter("uvm_result_messages_held", "Result messages answered `hold` (database away)", registry=r)
        self.socket_errors = Counter(
            "uvm_volunteer_message_errors",
            "Volunteer messages whose handling failed unexpectedly (logged; the volunteer got `error`, "
            "kept its socket)",
            registry=r,
        )
        self.waiting = Gauge(
            "uvm_volunteers_waiting", "Volunteers whose `ready` is held until work arrives", registry=r
        )
        self.requests = Histogram(
            "uvm_http_request_seconds",
            "HTTP request latency by route (websockets: the time until they are set up)",
            ["method", "route", "status"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.ready = Gauge("uvm_queue_ready", "Tasks waiting in the ready queue", registry=r)
        self.leases = Gauge("uvm_queue_leases", "Live leases (tasks being run) of running jobs", registry=r)
        self.connected = Gauge("uvm_volunteers_connected", "Volunteer sockets open on this server", registry=r)
        self.throttle = Gauge(
            "uvm_volunteers_by_throttle",
            "Connected volunteers by throttle state (full, throttled, paused, unreported)",
            ["state"],
            registry=r,
        )
        self.jobs = Gauge("uvm_jobs", "Jobs by state", ["state"], registry=r)
        self.tasks = Gauge(
            "uvm_tasks", "Tasks by job state and task state (done, failed, pending)", ["job_state", "task_state"],
            registry=r,
        )  # fmt: skip
        self.database_up = Gauge("uvm_database_up", "1 when the database answers, 0 during an outage", registry=r)
        self.database_down_seconds = Gauge(
            "uvm_database_down_seconds", "How long the current database outage has lasted (0: none)", registry=r
        )

    def attach(self, dispatcher: Dispatcher) -> None:
        """Export the restart counts of ``dispatcher``'s background loops."""
        self.registry.register(_LoopRestarts(dispatcher))

    async def refresh(self, dispatcher: Dispatcher) -> None:
        """Read the gauges: the queue and sockets always; the jobs table when the database answers."""
        self.connected.set(len(dispatcher.sockets))
        self.waiting.set(len(dispatcher.waiters))
        states = dict.fromkeys(THROTTLE_STATES, 0)
        for sock in dispatcher.sockets:
            states[throttle_state(sock.throttle)] += 1
        for state, n in states.items():
            self.throttle.labels(state).set(n)
        self.ready.set(await dispatcher.queue.ready_count())
        health = dispatcher.db_health
        self.database_up.set(0 if health.down_since else 1)
        self.database_down_seconds.set(time.time() - health.down_since if health.down_since else 0)
        if health.down_since:
            return  # the last values stay; asking the database now would only wait for it
        try:
            counts, running = await stats.job_counts(dispatcher.storage.engine)
        except Exception as exc:
            if not is_outage(exc):
                raise
            dispatcher.db_health.failed(exc)  # an outage starting now: the gauges say so
            self.database_up.set(0)
            return
        self._set_job_counts(counts)
        self.leases.set(sum((await dispatcher.queue.running(running)).values()))

    def _set_job_counts(self, counts: list[stats.JobCounts]) -> None:
        seen = {c.state for c in counts}
        for state in JobState:
            if state.value not in seen:
                self.jobs.labels(state.value).set(0)
        for c in counts:
            self.jobs.labels(c.state).set(c.jobs)
            self.tasks.labels(c.state, "done").set(c.done)
            self.tasks.labels(c.state, "failed").set(c.failed)
            self.tasks.labels(c.state, "pending").set(c.pending)


def throttle_state(state: ThrottleState | dict | None) -> str:
    """A volunteer's reported throttle as one of our fixed labels."""
    if not state:
        return "unreported"
    typed = ThrottleState.from_wire(state)
    if typed.paused:
        return "paused"
    workers, most = typed.workers, typed.max_workers
    if typed.reasons or (workers is not None and most is not None and workers < most):
        return "throttled"
    return "full"
