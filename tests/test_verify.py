"""Verified results (the validator): corroborated errors, replication with a quorum, tolerance,
adaptive replication by reputation. Hostile volunteers are scripted websocket clients or
simulated volunteers that forge results (``lie_rate``)."""

from __future__ import annotations

import asyncio
import json

import pytest
import sqlalchemy as sa

from server import protocol as P
from server.jobs.validator import Replica, agree, decide, error_key, groups, spot_rate
from server.spec import Verification
from server.store.tables import reputation, tasks
from server.web import appkeys as K
from workers.sim import SimVolunteer

SQUARE = "def main(x):\n    return x * x\n"
FLOAT = "def main(x):\n    return x\n"


# ------------------------------------------------------------------------- scripted volunteers
class Scripted:
    """A websocket volunteer that answers as it is told."""

    def __init__(self, ws, token: str) -> None:  # noqa: ANN001
        self.ws = ws
        self.token = token  # the signed id the server issued (presented in a later hello)
        self.volunteer = token.split("-", 1)[0]  # its public part: what the server stores

    @classmethod
    async def connect(cls, api, volunteer: str) -> Scripted:  # noqa: ANN001
        ws = await api.session.ws_connect(api.url.replace("http", "ws") + "/ws/volunteer")
        # protocol 3: a ready with nothing for it is answered at once with an empty `tasks` (what these
        # tests look at), not held as protocol 4 holds it (tests/test_idle.py)
        await ws.send_str(P.encode(P.Hello(volunteer, {"cores": 1}, protocol=3)))
        welcome = json.loads((await ws.receive(timeout=10)).data)
        assert welcome["type"] == "welcome"
        return cls(ws, welcome["volunteer"])

    async def lease(self, n: int) -> list[dict]:
        await self.ws.send_str(P.encode(P.Ready(n)))
        return await self._next("tasks", "tasks")

    async def report(self, outcomes: list[P.Outcome]) -> dict:
        await self.ws.send_str(P.encode(P.Results(outcomes)))
        return await self._next("ack")

    async def _next(self, kind: str, field: str | None = None):  # noqa: ANN202
        while True:
            msg = json.loads((await self.ws.receive(timeout=10)).data)
            if msg["type"] == kind:
                return msg[field] if field else msg

    async def close(self) -> None:
        await self.ws.close()


def result(task: dict, value: object) -> P.Outcome:
    return P.Outcome(task["attempt"], task["task"], result=value)


def error(task: dict, message: str = "RuntimeError: sabotage") -> P.Outcome:
    return P.Outcome(task["attempt"], task["task"], error=f"Traceback (most recent call last):\n{message}\n")


async def rows_of(api, job: int) -> list[dict]:  # noqa: ANN001
    return json.loads(await api.results(job))


# --------------------------------------------------------------------------- pure decisions
def test_tolerance_compares_floats_element_wise_through_lists_and_dicts():
    tol = (1e-9, 0.0)
    assert agree({"a": [1.0, 2.0 + 1e-12]}, {"a": [1.0, 2.0]}, tol)
    assert not agree({"a": [1.0, 2.0 + 1e-6]}, {"a": [1.0, 2.0]}, tol)
    assert not agree({"a": [1.0, 2.0 + 1e-12]}, {"a": [1.0, 2.0]}, None)  # exact without a tolerance
    assert agree({"b": 1, "a": 2}, {"a": 2, "b": 1}, None)  # canonical JSON: key order is no difference
    assert not agree([1, 2], [1, 2, 3], tol) and not agree({"a": 1}, {"b": 1}, tol)
    assert not agree(True, 1, tol) and not agree("1", 1, tol) and not agree(None, 0.0, tol)
    assert agree(1e-12, 0.0, (0.0, 1e-9))  # atol for values near zero


def test_errors_compare_by_type_and_message():
    a = "Traceback (most recent call last):\n  File x, line 3\nValueError: bad input\n"
    b = 'Traceback (most recent call last):\n  File "<job>", line 9\nValueError: bad input'
    assert error_key(a) == error_key(b) == "ValueError: bad input"
    assert error_key(a) != error_key(a.replace("bad", "odd"))
    assert error_key("", timeout=True) == "timeout"


def test_decide_quorum_disagreement_and_no_agreement():
    three = Verification.of(3, None, None, None)
    assert (three.quorum, three.max_replicas) == (2, 6)
    r = [Replica("a", "v1", 4), Replica("b", "v2", 4)]
    assert decide(three, r, 0, 3).kind == "more"  # three replicas are asked for
    d = decide(three, [*r, Replica("c", "v3", 666)], 0, 3)
    assert (d.kind, d.value, d.how, d.disagreement) == ("accept", 4, "2/3", True)
    assert [x.volunteer for x in d.invalid] == ["v3"] and len(d.valid) == 2
    split = [Replica("a", "v1", 1), Replica("b", "v2", 2), Replica("c", "v3", 3)]
    assert decide(three, split, 0, 3).kind == "more"
    more = [*split, Replica("d", "v4", 5), Replica("e", "v5", 6), Replica("f", "v6", 2)]
    d = decide(three, more, 0, 3)  # six replicas, max_replicas 6: "2" has two but the quorum needs 2 > runner-up
    assert d.kind == "accept" and d.value == 2
    none = [Replica(str(i), f"v{i}", i) for i in range(6)]
    d = decide(three, none, 0, 3)
    assert d.kind == "fail" and "NoAgreement" in d.error and "1x 0" in d.error and "1x 5" in d.error


def test_one_volunteers_error_is_not_enough():
    one = Verification.of(1, None, None, None)
    assert decide(one, [Replica("a", "v1", error="E: x")], 1, 3).kind == "more"
    d = decide(one, [Replica("a", "v1", error="E: x"), Replica("b", "v2", error="E: x")], 2, 3)
    assert d.kind == "fail" and d.error == "E: x"  # corroborated by a second volunteer
    d = decide(one, [Replica("a", "v1", error="E: x"), Replica("b", "v2", 7)], 1, 3)
    assert (d.kind, d.value, [x.volunteer for x in d.invalid]) == ("accept", 7, ["v1"])
    mixed = [Replica("a", "v1", error="E: x"), Replica("b", "v2", error="F: y")]
    assert decide(one, mixed, 2, 3).kind == "more"  # two different errors do not corroborate
    assert decide(one, [*mixed, Replica("c", "v3", error="G: z")], 3, 3).kind == "fail"  # max_attempts
    assert decide(one, [Replica("a", "v1", error="E: x")], 1, 1).kind == "fail"  # max_attempts 1 says so


def test_spot_checks_are_higher_while_trust_is_new():
    assert spot_rate(10, 10, 0.1) == pytest.approx(0.2)
    assert spot_rate(15, 10, 0.1) == pytest.approx(0.1333, abs=1e-3)
    assert spot_rate(20, 10, 0.1) == spot_rate(500, 10, 0.1) == 0.1
    assert len(groups([Replica("a", "v", 1), Replica("b", "w", error="1")], None)) == 2


# ---------------------------------------------------------------- errors need corroboration
async def test_an_attempt_reported_three_times_counts_once(serve):
    api, app = await serve()
    job = await api.submit(SQUARE, [3], max_attempts=2)
    saboteur = await Scripted.connect(api, "saboteur")
    (task,) = await saboteur.lease(1)
    ack = await saboteur.report([error(task)] * 3)
    assert ack["attempts"] == [task["attempt"]]
    again = await saboteur.report([error(task)])  # and across messages
    assert again["attempts"] == [] and again["ignored"] == [task["attempt"]]
    status = await api.job(job)
    assert status["counts"]["failed"] == 0 and status["validation"]["replicas"] == 1
    assert await saboteur.lease(1) == []  # never back to the volunteer whose error it was
    second = await Scripted.connect(api, "second")
    (retry,) = await second.lease(1)
    assert retry["task"] == task["task"]
    await second.report([error(retry)])  # the same error from a second volunteer: corroborated
    final = await api.wait(job, timeout=10)
    assert final["state"] == "failed" and final["counts"]["failed"] == 1
    async with app[K.storage].engine.connect() as sock:
        assert (await sock.execute(sa.select(tasks.c.attempts))).scalar() == 2
    await saboteur.close()
    await second.close()


async def test_an_erroring_volunteer_cannot_fail_a_job(serve, volunteers):
    """A scripted socket answers every task with an error, beside two honest simulated volunteers."""
    api, _ = await serve()
    job = await api.submit(SQUARE, list(range(400)), replication=1)
    saboteur = await Scripted.connect(api, "saboteur")
    sabotaged = 0

    async def sabotage() -> None:
        nonlocal sabotaged
        while True:
            got = await saboteur.lease(16)
            if got:
                await saboteur.report([error(t) for t in got])
                sabotaged += len(got)
            else:
                await asyncio.sleep(0.01)

    running = asyncio.create_task(sabotage())
    await asyncio.sleep(0.2)  # the saboteur takes the first tasks before anyone else
    volunteers(api.url, 2)
    final = await api.wait(job, timeout=60)
    running.cancel()
    assert sabotaged > 0
    assert final["state"] == "done"
    assert [r["result"] for r in await rows_of(api, job)] == [x * x for x in range(400)]
    await saboteur.close()


# -------------------------------------------------------------------- replication + quorum
async def test_replication_3_outvotes_two_forgers(serve, volunteers):
    api, app = await serve()
    job = await api.submit(SQUARE, list(range(300)), replication=3)
    liars = volunteers(api.url, 2, lie_rate=1.0, prefetch=4)
    volunteers(api.url, 3, prefetch=4)
    final = await api.wait(job, timeout=120)
    assert final["state"] == "done"
    rows = await rows_of(api, job)
    assert [r["result"] for r in rows] == [x * x for x in range(300)]  # no forged result accepted
    assert all(r["accepted"] in ("3/3", "3/4", "3/5", "2/3", "2/4", "2/5") for r in rows)
    validation = final["validation"]
    assert validation["validated"] == 300 and validation["pending_validation"] == 0
    forged = sum(len(s.lies) for s in liars)
    assert forged > 0 and validation["disagreements"] > 0
    async with app[K.storage].engine.connect() as sock:
        bad = {r.volunteer: r for r in (await sock.execute(sa.select(reputation))).all()}
    assert all(bad[s.volunteer].invalid > 0 and bad[s.volunteer].consecutive == 0 for s in liars)


async def test_tolerance_agrees_within_and_no_agreement_lists_the_variants(serve):
    api, _ = await serve()
    job = await api.submit(FLOAT, [1.0, 2.0], replication=2, max_replicas=3, tolerance={"rtol": 1e-6})
    a, b, c = [await Scripted.connect(api, name) for name in ("a", "b", "c")]
    first, second = await a.lease(2)
    await a.report([result(first, 1.0), result(second, 2.0)])
    got = {t["index"]: t for t in await b.lease(2)}
    assert set(got) == {0, 1}  # a's tasks went to another volunteer
    await b.report([result(got[0], 1.0 + 1e-9), result(got[1], 2.5)])  # within; outside the tolerance
    (third,) = await c.lease(2)
    assert third["index"] == 1
    await c.report([result(third, 3.5)])
    final = await api.wait(job, timeout=10)
    assert final["state"] == "failed" and final["counts"]["done"] == 1
    done, failed = await rows_of(api, job)
    assert done["result"] == 1.0 and done["accepted"] == "2/2"
    assert "NoAgreement" in failed["error"] and "1x 2.0" in failed["error"] and "1x 2.5" in failed["error"]
    assert final["validation"]["disagreements"] == 1 and final["validation"]["replicas"] == 5
    for s in (a, b, c):
        await s.close()


# ------------------------------------------------------------------ adaptive + reputation
async def test_reputation_survives_a_reconnect_and_a_new_id_starts_untrusted(serve):
    api, app = await serve(trust_after=3, spot_check=0.0)
    warmup = await api.submit(SQUARE, list(range(30)), replication="adaptive")
    sims = [SimVolunteer(api.url, prefetch=1) for _ in range(2)]
    stop = asyncio.Event()
    runs = [asyncio.create_task(sim.run(api.session, stop)) for sim in sims]
    assert (await api.wait(warmup, timeout=60))["state"] == "done"
    stop.set()
    await asyncio.gather(*runs)
    async with app[K.storage].engine.connect() as sock:
        known = {r.volunteer: r.consecutive for r in (await sock.execute(sa.select(reputation))).all()}
    trusted_sim = next(s for s in sims if known.get(s.volunteer, 0) >= 3)
    trusted = trusted_sim.volunteer
    shown = await app[K.storage].reputation_of(trusted, 3)  # as /api/admin/volunteers shows it
    assert shown["trusted"] and shown["validated"] >= 3 and shown["invalid"] == 0
    job = await api.submit(SQUARE, [5, 6], replication="adaptive")
    back = await Scripted.connect(api, trusted_sim.token)  # the same signed id, on a new connection
    newcomer = await Scripted.connect(api, "forged-or-new")
    assert back.volunteer == trusted
    for socket in (back, newcomer):
        (task,) = await socket.lease(1)
        await socket.report([result(task, task["input"] ** 2)])
    rows = await rows_of(api, job)
    accepted = sorted(r["accepted"] or "" for r in rows)
    assert accepted[1].startswith("trusted"), rows  # the returning volunteer's result stood alone
    assert accepted[0] == "" and (await api.job(job))["validation"]["pending_validation"] == 1
    await back.close()
    await newcomer.close()


async def test_adaptive_trust_is_earned_inside_a_job_and_costs_little(serve, volunteers):
    """Four honest volunteers, 1,200 tasks under "adaptive": at most 1.35 results per task."""
    api, _ = await serve()
    job = await api.submit(SQUARE, list(range(1200)), replication="adaptive")
    volunteers(api.url, 4, prefetch=4)
    final = await api.wait(job, timeout=240)
    assert final["state"] == "done"
    rows = await rows_of(api, job)
    assert [r["result"] for r in rows] == [x * x for x in range(1200)]
    per_task = final["validation"]["replicas"] / 1200
    assert per_task <= 1.35, final["validation"]
    assert sum(1 for r in rows if (r["accepted"] or "").startswith("trusted")) > 600  # trust was earned


async def test_adaptive_with_a_liar_ends_almost_no_task_wrong(serve, volunteers):
    """One volunteer forging 30 % of its results beside three honest ones: <= 0.5 % of tasks wrong."""
    api, _ = await serve()
    job = await api.submit(SQUARE, list(range(1200)), replication="adaptive")
    (liar,) = volunteers(api.url, 1, prefetch=4, lie_rate=0.3, seed=7)
    volunteers(api.url, 3, prefetch=4)
    final = await api.wait(job, timeout=240)
    assert final["state"] == "done"
    rows = await rows_of(api, job)
    wrong = sum(1 for r in rows if r["result"] != r["input"] ** 2)
    assert liar.lies and wrong <= 6, (wrong, len(liar.lies), final["validation"])


def test_the_client_says_when_results_wait_for_a_second_volunteer():
    from uvm_compute.client import waiting_note

    assert waiting_note({"validation": {"pending_validation": 3}}) == (
        "3 results waiting for a second volunteer to confirm"
    )
    assert waiting_note({"validation": {"pending_validation": 0}}) == ""


@pytest.mark.parametrize("backend", ["mariadb"])
async def test_after_a_redis_flush_a_replica_still_never_goes_back_to_its_reporter(serve, redis_client):
    api, app = await serve()
    job = await api.submit(SQUARE, [4], replication=2)
    a = await Scripted.connect(api, "reporter")
    (task,) = await a.lease(1)
    await a.report([result(task, 16)])
    await redis_client.flushdb()  # the ready queue, leases and exclusions: gone
    assert await app[K.dispatcher].rebuild_if_needed() == 1  # rebuilt from the database
    assert await a.lease(1) == []
    b = await Scripted.connect(api, "confirmer")
    (again,) = await b.lease(1)
    await b.report([result(again, 16)])
    assert (await api.wait(job, timeout=10))["state"] == "done"
    await a.close()
    await b.close()


def test_replicas_avoid_the_network_of_a_reporter_when_others_are_connected(tmp_path):
    from server.config import Config
    from server.jobs.dispatch import Dispatcher, VolunteerSocket, network_of

    assert network_of("192.0.2.77") == "net:192.0.2.0/24"
    assert network_of("::ffff:192.0.2.5") == "net:192.0.2.0/24"
    assert network_of("2001:db8:1:2:3:4:5:6") == "net:2001:db8:1:2::/64"
    assert network_of("127.0.0.1") == network_of("::1") == network_of("") == ""  # loopback: by id alone
    dispatcher = Dispatcher(Config(data_dir=tmp_path), None, None, None)  # type: ignore[arg-type]
    home, neighbour = VolunteerSocket("a", None, address="192.0.2.1"), VolunteerSocket("b", None, address="192.0.2.9")
    elsewhere = VolunteerSocket("c", None, address="10.1.1.1")
    dispatcher.connect(home)
    dispatcher.connect(neighbour)
    assert dispatcher._network_rule(home) == ""  # one network only: distinct volunteers will do
    dispatcher.connect(elsewhere)
    assert dispatcher._network_rule(neighbour) == "net:192.0.2.0/24"


async def test_a_second_report_from_the_same_volunteer_never_orphans_its_task(serve):
    """Should a volunteer get a task again that it already reported on (its exclusion lost), its
    second report is ignored and the task goes back to the ready queue for someone else."""
    api, app = await serve()
    job = await api.submit(SQUARE, [3], replication=2)
    a = await Scripted.connect(api, "twice")
    (task,) = await a.lease(1)
    await a.report([result(task, 9)])
    await app[K.dispatcher].queue.forget([task["task"]])  # as if the exclusion were lost
    (again,) = await a.lease(1)
    ack = await a.report([result(again, 9)])
    assert ack["ignored"] == [again["attempt"]]
    b = await Scripted.connect(api, "other")
    (third,) = await b.lease(1)
    await b.report([result(third, 9)])
    assert (await api.wait(job, timeout=10))["state"] == "done"
    await a.close()
    await b.close()
