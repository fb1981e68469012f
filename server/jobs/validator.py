"""The validator: the one place where a task's result becomes final.

A volunteer's message is a claim, not a fact. Each result or error a volunteer reports is a
*replica* of its task; this module decides, from the replicas a task has, whether it is done (a
quorum agrees, or a trusted volunteer's result stands alone), failed (errors corroborated by
distinct volunteers, or no agreement after ``max_replicas``) or needs another volunteer.

The decisions are pure functions (``decide``, ``agree``, ``error_key``, ``spot_rate``, ...);
``Validator.record`` loads what they need from the store in one transaction, asks them, and tells
the store what to write. Transport (websocket) and storage only call it.
"""

from __future__ import annotations

import dataclasses
import json
import math
import random
import time
from collections.abc import Callable
from typing import Any

from server.config import Config
from server.protocol import AttemptOutcome, Outcome, TaskState
from server.queue import ReadyItem
from server.spec import Verification, attempts_exhausted
from server.store.models import OutcomeWrites, Recorded, TaskDecision
from server.store.storage import Storage

ACCEPT, FAIL, MORE = "accept", "fail", "more"


# ----------------------------------------------------------------------------- pure decisions
@dataclasses.dataclass(frozen=True)
class Replica:
    """One volunteer's report for a task: a result, or an error compared by its ``error_key``."""

    attempt: str
    volunteer: str
    result: Any = None
    error: str | None = None  # the error key ("ValueError: bad x", "timeout"); None for a result
    elapsed: float = 0.0  # seconds the run took, as claimed (clamped to the job's timeout)


@dataclasses.dataclass(frozen=True)
class Decision:
    kind: str  # ACCEPT | FAIL | MORE
    value: Any = None  # the accepted result
    error: str = ""  # why it failed
    valid: tuple[Replica, ...] = ()  # the agreeing replicas (a quorum of two or more)
    invalid: tuple[Replica, ...] = ()  # the minority of a quorum decision
    how: str = ""  # how it was accepted: "2/3", "trusted, spot-check 10%", "1/1"
    disagreement: bool = False  # the task's replicas differ


def error_key(error: str, timeout: bool = False) -> str:
    """What two errors are compared by: the exception type and message (a traceback's last line)."""
    if timeout:
        return "timeout"
    lines = [line for line in error.strip().splitlines() if line.strip()]
    return lines[-1].strip()[:500] if lines else "error"


def canonical(value: Any) -> str:
    """Canonical JSON: equal values give equal text whatever the key order."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False)


def agree(a: Any, b: Any, tolerance: tuple[float, float] | None) -> bool:
    """Equal as canonical JSON; with a tolerance (rtol, atol), floats compare element-wise through
    lists and dicts as ``|a - b| <= atol + rtol * |b|``."""
    if tolerance is None:
        return canonical(a) == canonical(b)
    return _close(a, b, tolerance)


def _close(a: Any, b: Any, tol: tuple[float, float]) -> bool:
    if isinstance(a, bool) or isinstance(b, bool):
        return a is b
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        if isinstance(a, int) and isinstance(b, int):
            return a == b
        return math.isclose(a, b, rel_tol=tol[0], abs_tol=tol[1])
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(_close(x, y, tol) for x, y in zip(a, b, strict=True))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_close(a[k], b[k], tol) for k in a)
    return type(a) is type(b) and a == b


def groups(replicas: list[Replica], tolerance: tuple[float, float] | None) -> list[list[Replica]]:
    """Replicas grouped by agreement with each group's first member, largest group first (ties:
    the group seen first). Results and errors never share a group."""
    out: list[list[Replica]] = []
    for replica in replicas:
        for group in out:
            head = group[0]
            if (head.error is None) != (replica.error is None):
                continue
            if head.error is not None:
                same = head.error == replica.error
            else:
                same = agree(head.result, replica.result, tolerance)
            if same:
                group.append(replica)
                break
        else:
            out.append([replica])
    return sorted(out, key=len, reverse=True)


def spot_rate(consecutive: int, trust_after: int, base: float) -> float:
    """The chance a trusted volunteer's result is replicated anyway: ``base``, doubled while trust is
    new (from ``trust_after`` down to ``base`` at twice that many consecutive validated results)."""
    if consecutive >= 2 * trust_after:
        return base
    return min(1.0, base * 2 * trust_after / max(consecutive, 1))


def decide(
    policy: Verification, replicas: list[Replica], failures: int, max_attempts: int, alone: str | None = None
) -> Decision:
    """Decide a task from all its replicas (distinct volunteers, the newest last).

    ``failures``: the task's errors, timeouts and expired leases so far (each a distinct volunteer).
    ``alone``: under adaptive replication, the newest replica is a trusted volunteer's result that
    was not picked for a spot check, described as it should be shown ("trusted, spot-check 10%").
    """
    if alone is not None and len(replicas) == 1 and replicas[0].error is None:
        return Decision(ACCEPT, value=replicas[0].result, how=alone)
    ranked = groups(replicas, policy.tolerance)
    disagreement = len(ranked) > 1
    if len(replicas) >= policy.replicas:
        best = next((g for g in ranked if g[0].error is None), [])
        # the quorum must be unique among results; errors do not outvote an agreeing quorum
        runner_up = max((len(g) for g in ranked if g is not best and g[0].error is None), default=0)
        if best and len(best) >= policy.quorum and len(best) > runner_up:
            minority = tuple(r for r in replicas if r not in best)
            valid = tuple(best) if len(best) > 1 else ()
            how = f"{len(best)}/{len(replicas)}"
            return Decision(ACCEPT, best[0].result, valid=valid, invalid=minority, how=how, disagreement=disagreement)
        worst = next((g for g in ranked if g[0].error is not None), [])
        # Errors need corroboration: two distinct volunteers at least, whatever the replication.
        if worst and len(worst) >= max(policy.quorum, 2) and len(worst) > len(best):
            return Decision(FAIL, error=worst[-1].error or "", disagreement=disagreement)
    errors = [r for r in replicas if r.error is not None]
    if errors and attempts_exhausted(failures, max_attempts):
        return Decision(FAIL, error=errors[-1].error or "", disagreement=disagreement)
    if len(replicas) >= policy.max_replicas:
        return Decision(FAIL, error=no_agreement(ranked), disagreement=disagreement)
    return Decision(MORE, disagreement=disagreement)


def no_agreement(ranked: list[list[Replica]]) -> str:
    """The error of a task whose replicas never reached a quorum: each variant and its count."""
    variants = []
    for group in ranked[:10]:
        head = group[0]
        text = f"error {head.error}" if head.error is not None else canonical(head.result)
        variants.append(f"  {len(group)}x {text[:200]}")
    n = sum(len(g) for g in ranked)
    return f"NoAgreement: no quorum after {n} replicas; the variants:\n" + "\n".join(variants)


# --------------------------------------------------------------------------- the recorder
@dataclasses.dataclass
class Trust:
    """A volunteer's reputation: validated results since its last invalid one, and totals."""

    consecutive: int = 0
    validated: int = 0
    invalid: int = 0
    last_invalid_at: float | None = None

    def trusted(self, trust_after: int) -> bool:
        return self.consecutive >= trust_after

    def update(self, valid: bool, now: float) -> None:
        """A validated result extends the streak; an invalid one resets it to zero."""
        if valid:
            self.consecutive += 1
            self.validated += 1
        else:
            self.consecutive = 0
            self.invalid += 1
            self.last_invalid_at = now


@dataclasses.dataclass
class _Batch:
    tasks: dict[int, Any]
    replicas: dict[int, list[Replica]]
    trust: dict[str, Trust]
    writes: OutcomeWrites = dataclasses.field(default_factory=OutcomeWrites)
    rec: Recorded = dataclasses.field(default_factory=Recorded)


class Validator:
    """Records a batch of outcomes in one transaction: dedupe, decide each task, write."""

    def __init__(self, storage: Storage, config: Config, rng: Callable[[], float] = random.random) -> None:
        self.storage = storage
        self.config = config
        self.rng = rng

    async def record(self, items: list[tuple[str, Outcome]], live: dict[str, Any]) -> Recorded:
        """Commit (volunteer, outcome) pairs; idempotent per attempt: an attempt reported twice, in one
        message or in several, counts once. ``live`` maps attempt -> Lease for the live leases."""
        seen: set[str] = set()
        unique: list[tuple[str, Outcome]] = []
        duplicates: list[tuple[str, Outcome]] = []
        for volunteer, outcome in items:
            (duplicates if outcome.attempt in seen else unique).append((volunteer, outcome))
            seen.add(outcome.attempt)
        rec = await self.storage.run_in_transaction(lambda conn: self._record(conn, unique, live))
        rec.ignored += [o.attempt for _, o in duplicates]
        return rec

    async def _record(self, conn: Any, items: list[tuple[str, Outcome]], live: dict[str, Any]) -> Recorded:
        rec = Recorded()
        accepted = await self.storage.admissible(conn, items, live, rec)
        if not accepted:
            return rec
        rows = await self.storage.lock_tasks(conn, [o.task for _, o, _ in accepted])
        reports = await self.storage.pending_reports(conn, [t.id for t in rows.values() if t.replicas])
        replicas = {task: [_replica(*report) for report in found] for task, found in reports.items()}
        who = [v for v, _, _ in accepted] + [r.volunteer for found in replicas.values() for r in found]
        trust = {
            v: Trust(r.consecutive, r.validated, r.invalid, r.last_invalid_at)
            for v, r in (await self.storage.reputations(conn, who)).items()
        }
        batch = _Batch(rows, replicas, trust, rec=rec)
        for volunteer, outcome, is_live in accepted:
            await self._one(batch, volunteer, outcome, is_live)
        await self.storage.write_outcomes(conn, batch.writes, rec)
        return rec

    async def _one(self, batch: _Batch, volunteer: str, o: Outcome, is_live: bool) -> None:
        """One outcome: ignore it, or add it to its task's replicas and decide the task."""
        rec, writes = batch.rec, batch.writes
        task = batch.tasks.get(o.task)
        info = await self.storage.job_info(task.job_id) if task is not None else None
        if task is None or info is None:
            rec.ignored.append(o.attempt)
            return
        rec.jobs.add(task.job_id)
        replicas = batch.replicas.setdefault(task.id, [])
        if task.state != TaskState.OPEN.value or any(r.volunteer == volunteer for r in replicas):
            # finished meanwhile, or this volunteer already reported on the task: not counted again
            writes.attempt(o, task, volunteer, AttemptOutcome.LATE, None)
            rec.ignored.append(o.attempt)
            if is_live and task.state == TaskState.OPEN.value:  # still to do: by someone else
                rec.requeue.append(o.attempt)
                rec.exclude.append((task.id, volunteer))
            elif is_live:
                rec.release.append(o.attempt)
            return
        before = len(groups(replicas, info.verification.tolerance))
        replica = Replica(o.attempt, volunteer, o.result if o.error is None else None, _key(o), float(o.elapsed))
        replicas.append(replica)
        failures = task.attempts + (o.error is not None)
        task = task._replace(replicas=task.replicas + 1, attempts=failures)
        batch.tasks[task.id] = task
        decision = decide(info.verification, replicas, failures, info.max_attempts, self._alone(batch, info, volunteer))
        writes.attempt(o, task, volunteer, _kind(o), _reported(o))
        writes.count(task.job_id, "n_results")
        rec.acked.append(o.attempt)
        if decision.disagreement and before <= 1:
            writes.count(task.job_id, "n_disagreements")
        if decision.kind == MORE:  # another volunteer, never this one
            if is_live:
                rec.requeue.append(o.attempt)
            rec.exclude.append((task.id, volunteer))
            if len(replicas) == 1:
                writes.count(task.job_id, "n_pending")
            writes.progress.append((task, o, volunteer))
            return
        if is_live:
            rec.release.append(o.attempt)
        else:  # its lease had expired: the task may be waiting in the ready queue again
            rec.drop.append(ReadyItem(task.job_id, task.id, task.idx, info.timeout, info.priority))
        self._settle(batch, task, decision, replicas, o, volunteer)

    def _alone(self, batch: _Batch, info: Any, volunteer: str) -> str | None:
        """Under adaptive replication, how a trusted volunteer's result stands alone, unless this
        one is picked for a spot check (or the volunteer is not trusted): then None."""
        trust = batch.trust.get(volunteer, Trust())
        if not info.verification.adaptive or not trust.trusted(self.config.trust_after):
            return None
        rate = spot_rate(trust.consecutive, self.config.trust_after, self.config.spot_check)
        return None if self.rng() < rate else f"trusted, spot-check {rate:.0%}"

    def _settle(
        self, batch: _Batch, task: Any, decision: Decision, replicas: list[Replica], o: Outcome, volunteer: str
    ) -> None:
        """The task is decided: its final state, the verdicts and what they do to reputations."""
        rec, writes = batch.rec, batch.writes
        if len(replicas) > 1:
            writes.count(task.job_id, "n_pending", -1)
        batch.tasks[task.id] = task._replace(
            state=TaskState.DONE.value if decision.kind == ACCEPT else TaskState.FAILED.value
        )
        rec.settled.append(task.id)
        self._verdicts(batch, decision, replicas)
        own = o.output if o.output else None
        if decision.kind == ACCEPT:
            chosen = next(
                (
                    r
                    for r in replicas
                    if r.error is None and (r.result is decision.value or agree(r.result, decision.value, None))
                ),
                None,
            )
            output = own if chosen is not None and chosen.volunteer == volunteer else None
            writes.decide(
                TaskDecision(
                    task,
                    TaskState.DONE,
                    chosen.volunteer if chosen else volunteer,
                    decision.value,
                    decision.how,
                    len(replicas),
                    output=output,
                    elapsed=o.elapsed,
                    failures=task.attempts,
                )
            )
            writes.count(task.job_id, "n_done")
            if decision.valid:
                writes.count(task.job_id, "n_validated")
            rec.upstream.append((task.job_id, task.id, task.idx, TaskState.DONE.value, decision.value))
            return
        message = o.error if o.error is not None and _key(o) == decision.error else decision.error
        writes.decide(
            TaskDecision(
                task, TaskState.FAILED, volunteer, None, "", len(replicas), message, own, failures=task.attempts
            )
        )
        writes.count(task.job_id, "n_failed")
        rec.upstream.append((task.job_id, task.id, task.idx, TaskState.FAILED.value, None))

    def _verdicts(self, batch: _Batch, decision: Decision, replicas: list[Replica]) -> None:
        """The verdict on each replica of a decided task; the quorum's members gain reputation, the
        minority lose it, and a trusted volunteer found invalid has its lone results re-checked.

        Credit goes to validated results only: each member of the quorum is credited the least run
        time any of them claimed (a claim is not a fact: inflating it gains nothing), a trusted
        volunteer's lone result its own claim (taken back if it is caught lying and re-checked)."""
        writes = batch.writes
        valid = {r.attempt for r in decision.valid}
        invalid = {r.attempt for r in decision.invalid}
        trusted_alone = decision.kind == ACCEPT and decision.how.startswith("trusted")
        granted = min((r.elapsed for r in decision.valid), default=0.0)
        now = time.time()
        for r in replicas:
            if r.attempt in valid or r.attempt in invalid:
                writes.verdicts[r.attempt] = "valid" if r.attempt in valid else "invalid"
                if r.attempt in valid:
                    writes.credit[r.attempt] = granted
                trust = batch.trust.setdefault(r.volunteer, Trust())
                was_trusted = trust.trusted(self.config.trust_after)
                trust.update(r.attempt in valid, now)
                writes.reputation[r.volunteer] = dataclasses.astuple(trust)
                if r.attempt in invalid and was_trusted and r.volunteer not in writes.reopen:
                    writes.reopen.append(r.volunteer)
            else:
                writes.verdicts[r.attempt] = "trusted" if trusted_alone else "single"
                if trusted_alone:
                    writes.credit[r.attempt] = r.elapsed


def _replica(attempt: str, volunteer: str, reported: dict, elapsed: float) -> Replica:
    return Replica(attempt, volunteer, reported.get("result"), reported.get("error"), elapsed)


def _reported(o: Outcome) -> dict:
    """What is kept of a report for comparing it with later replicas."""
    return {"result": o.result} if o.error is None else {"error": _key(o)}


def _kind(o: Outcome) -> AttemptOutcome:
    if o.error is None:
        return AttemptOutcome.DONE
    return AttemptOutcome.TIMEOUT if o.timeout else AttemptOutcome.ERROR


def _key(o: Outcome) -> str | None:
    return None if o.error is None else error_key(o.error, o.timeout)


__all__ = ["Decision", "Replica", "Validator", "agree", "attempts_exhausted", "decide", "error_key", "spot_rate"]
