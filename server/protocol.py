"""The volunteers' websocket protocol and the shared state enums.

One definition, two users: the server imports this module, and the browser (PyScript main
thread and Pyodide workers) fetches it from ``/py/protocol.py`` and imports it unchanged.
It must therefore stay standard-library only and run on CPython 3.11 and in Pyodide.

Every message is a JSON object ``{"type": <str>, ...fields}``. ``encode``/``decode`` are the
one place where messages become dicts and back; ``decode`` raises ``ProtocolError`` with a
message fit to show a person for anything malformed, unknown, of the wrong type or oversized.
"""

from __future__ import annotations

import dataclasses
import json
from enum import Enum
from typing import Any

PROTOCOL_VERSION = 6
# 1: first release.
# 2: `update` (progress, checkpoints, partial results), TaskSpec.restore, Welcome.every
# 3: a result's run time is `elapsed` (wall-clock seconds), no longer `cpu`; a page of version 2
#    still open during an upgrade keeps its results (`cpu` is read as `elapsed`). ``ready`` and
#    ``heartbeat`` may carry ``running``, the attempts being computed now (the rest of those held
#    are prefetched; an older volunteer's running count is estimated); ``code`` carries the job's
#    name and public description; ``ready`` may name the jobs its workers have loaded (``jobs``:
#    job affinity; a ``ready`` without it still works).
# 4: idle volunteers wait instead of polling: a `ready` with nothing to hand out is answered by
#    `wait` and held; the server pushes `tasks` when work arrives. An idle volunteer's `heartbeat`
#    (no attempts) is answered by another `wait`, whose interval grows while it stays idle; once it
#    is the server's longest, heartbeats are not answered and the volunteer keeps its last interval.
#    A hello of version 3 or older keeps the old rule (an empty `tasks`: ask again later)
# 5: chunked hand-out: a `TaskSpec` may carry ``more``, further tasks of the same job leased with it
#    (one slot of the lease cap, one message, one worker call). Each keeps its own attempt and gets
#    its own result; a `heartbeat` naming a chunk's first attempt extends them all. A hello of
#    version 4 or older never gets chunks.
# 6: `wait` carries ``longest``: the volunteer grows its idle heartbeat interval itself (doubling
#    after each idle heartbeat, up to ``longest``: ``next_idle_beat``), and the server answers none
#    of its idle heartbeats, so a waiting volunteer costs one message a beat. A hello of version 5
#    or older gets a `wait` without it, and an answer to each idle heartbeat, as before.
WAITING_SINCE = 4  # the first protocol version whose idle volunteers wait (older ones poll)
CHUNKS_SINCE = 5  # the first protocol version that may be handed chunks
IDLE_GROWS_SINCE = 6  # the first protocol version that grows its idle heartbeat interval itself
MAX_MESSAGE_BYTES = 4 * 1024 * 1024  # one websocket message; larger closes with 1009
MAX_TASKS_PER_MESSAGE = 64
MAX_CHUNK_TASKS = 500  # tasks in one chunk (a TaskSpec and its ``more``)
MAX_CHUNK_INPUT_BYTES = 512 * 1024  # a chunk's inputs together, as JSON: the server stops adding tasks there
MAX_RESULTS_PER_MESSAGE = MAX_CHUNK_TASKS  # outcomes in one `results` message (a chunk's fit in one)
MAX_IDLE_HEARTBEAT = 3600.0  # seconds: the longest interval a `wait` may give
MAX_OUTPUT_CHARS = 64 * 1024  # captured stdout/stderr kept per task
MAX_ERROR_CHARS = 16 * 1024
MAX_WORKERS = 64  # a volunteer's declared workers; also the most tasks one connection may hold
MAX_DECLARED_PREFETCH = 512
MAX_TEXT_CHARS = 200  # strings in capabilities and throttle states (user agent, reasons) are cut here
MAX_REASONS = 8
MAX_CHECKPOINT_BYTES = 1024 * 1024  # one task's saved state, as JSON text (workers/runner.py keeps the same)
MAX_PARTIAL_BYTES = 64 * 1024  # one partial result, as JSON
MAX_PARTIALS_PER_UPDATE = 64
MAX_PARTIALS_PER_TASK = 256  # kept per task; more are dropped
MAX_ATTEMPT_ID_CHARS = 32  # attempts are 16 hex digits; the column holds 32
MAX_JOB_NAME_CHARS = 200  # a job's name and public description, as the server caps them (server/spec.py)
MAX_DESCRIPTION_CHARS = 500
MAX_READY_JOBS = 16  # jobs one `ready` may name as loaded (the server prefers their tasks)
MAX_JOB_ID = 2**63 - 1  # ids are 63-bit integers in the database


class ProtocolError(ValueError):
    """A message that cannot be accepted; ``str(err)`` says why."""


# --------------------------------------------------------------------------------------- states
class JobState(str, Enum):
    QUEUED = "queued"  # accepted, tasks being created
    RUNNING = "running"
    DONE = "done"
    FAILED = "failed"  # finished, at least one task failed
    CANCELLED = "cancelled"


JOB_TERMINAL = frozenset({JobState.DONE, JobState.FAILED, JobState.CANCELLED})


class TaskState(str, Enum):
    OPEN = "open"  # not final yet: waiting in the ready queue, leased or running -- the queue knows which
    RUNNING = "running"  # reported from live leases only, never stored
    DONE = "done"
    FAILED = "failed"
    CANCELLED = "cancelled"


TASK_TERMINAL = frozenset({TaskState.DONE, TaskState.FAILED, TaskState.CANCELLED})


class AttemptOutcome(str, Enum):
    DONE = "done"  # a result was recorded from this attempt
    ERROR = "error"  # main() raised, or the worker reported an error
    TIMEOUT = "timeout"  # the worker stopped it at the job's timeout
    EXPIRED = "expired"  # the lease deadline passed with no heartbeat
    ABANDONED = "abandoned"  # the volunteer's socket closed while holding it
    LATE = "late"  # a result for a task already finished elsewhere: ignored


# Outcomes that count towards a task's max_attempts. A closed socket does not: a volunteer who
# closes the tab with prefetched tasks has not shown that the task is bad.
COUNTED_OUTCOMES = frozenset({AttemptOutcome.ERROR, AttemptOutcome.TIMEOUT, AttemptOutcome.EXPIRED})


# ------------------------------------------------------------------ device reports, typed and capped
def _int_in(value: Any, low: int, high: int) -> int | None:
    if isinstance(value, bool) or not isinstance(value, int | float) or value != value:  # NaN
        return None
    return int(min(max(value, low), high))


def _text(value: Any) -> str:
    return value[:MAX_TEXT_CHARS] if isinstance(value, str) else ""


def _flag(value: Any) -> bool:
    return value is True


def _strings(value: Any, most: int, longest: int) -> list:
    """The first ``most`` strings of a list, each cut to ``longest``; anything else is dropped."""
    return [v[:longest] for v in value[:most] if isinstance(v, str)] if isinstance(value, list) else []


@dataclasses.dataclass
class Battery:
    """A battery report: ``level`` is a fraction in [0, 1] (anything else is dropped)."""

    level: float
    charging: bool = False

    @classmethod
    def from_wire(cls, value: Any) -> Battery | None:
        if not isinstance(value, dict):
            return None
        level = value.get("level")
        if isinstance(level, bool) or not isinstance(level, int | float) or not 0.0 <= level <= 1.0:
            return None
        return cls(level=float(level), charging=_flag(value.get("charging")))


@dataclasses.dataclass
class Network:
    """A network report (Network Information API)."""

    effective_type: str = ""
    save_data: bool = False

    @classmethod
    def from_wire(cls, value: Any) -> Network | None:
        if not isinstance(value, dict):
            return None
        return cls(effective_type=_text(value.get("effective_type"))[:16], save_data=_flag(value.get("save_data")))


@dataclasses.dataclass
class Capabilities:
    """What a volunteer says about its device in ``hello``. Unknown keys are dropped, strings
    cut, numbers clamped: a claim, kept small, never trusted beyond sizing its lease cap."""

    cores: int | None = None
    workers: int = 1
    prefetch: int | None = None  # tasks held beyond one per worker; None: not declared
    battery_api: bool = False
    network_api: bool = False
    user_agent: str = ""
    sim: bool = False
    resume: list = dataclasses.field(default_factory=list)  # attempts this browser still holds

    @classmethod
    def from_wire(cls, value: Any) -> Capabilities:
        if isinstance(value, Capabilities):
            return value
        value = value if isinstance(value, dict) else {}
        workers = _int_in(value.get("workers"), 0, MAX_WORKERS)
        return cls(
            cores=_int_in(value.get("cores"), 1, 1024),
            workers=1 if workers is None else workers,
            prefetch=_int_in(value.get("prefetch"), 0, MAX_DECLARED_PREFETCH),
            battery_api=_flag(value.get("battery_api")),
            network_api=_flag(value.get("network_api")),
            user_agent=_text(value.get("user_agent")),
            sim=_flag(value.get("sim")),
            resume=_strings(value.get("resume"), MAX_TASKS_PER_MESSAGE, 32),
        )

    def to_wire(self) -> dict:
        return dataclasses.asdict(self)


@dataclasses.dataclass
class ThrottleState:
    """The supervisor's plan and device as reported in ``throttle``; typed and capped like
    ``Capabilities``. ``workers`` and ``prefetch`` size the volunteer's lease cap."""

    workers: int | None = None
    max_workers: int | None = None
    prefetch: int | None = None
    batch_results: bool = False
    paused: bool = False
    reasons: list = dataclasses.field(default_factory=list)
    pause_reason: str = ""
    cores: int | None = None
    battery: Battery | None = None
    network: Network | None = None
    hidden: bool = False
    cpu_cap: int | None = None

    @classmethod
    def from_wire(cls, value: Any) -> ThrottleState:
        if isinstance(value, ThrottleState):
            return value
        value = value if isinstance(value, dict) else {}
        return cls(
            workers=_int_in(value.get("workers"), 0, MAX_WORKERS),
            max_workers=_int_in(value.get("max_workers"), 0, MAX_WORKERS),
            prefetch=_int_in(value.get("prefetch"), 0, MAX_DECLARED_PREFETCH),
            batch_results=_flag(value.get("batch_results")),
            paused=_flag(value.get("paused")),
            reasons=_strings(value.get("reasons"), MAX_REASONS, MAX_TEXT_CHARS),
            pause_reason=_text(value.get("pause_reason")),
            cores=_int_in(value.get("cores"), 1, 1024),
            battery=Battery.from_wire(value.get("battery")),
            network=Network.from_wire(value.get("network")),
            hidden=_flag(value.get("hidden")),
            cpu_cap=_int_in(value.get("cpu_cap"), 0, 100),
        )

    def to_wire(self) -> dict:
        return dataclasses.asdict(self)


# ------------------------------------------------------------------------------------- messages
@dataclasses.dataclass
class Hello:
    """Volunteer -> server, first message. ``volunteer`` is an anonymous id the browser keeps."""

    volunteer: str  # the signed id from an earlier ``welcome``; anything else gets a fresh one
    capabilities: Any = dataclasses.field(default_factory=dict)  # a dict on the wire; Capabilities decoded
    protocol: int = PROTOCOL_VERSION
    TYPE = "hello"


@dataclasses.dataclass
class Welcome:
    """Server -> volunteer, answer to hello. ``volunteer`` is the server-signed id to keep and
    present in later ``hello``s (the same one, or a fresh one if the hello's was missing or forged)."""

    volunteer: str
    heartbeat: float  # seconds between heartbeats the server expects
    server: str = ""
    every: float = 5.0  # seconds between two `update`s of one task the server accepts
    TYPE = "welcome"


@dataclasses.dataclass
class Ready:
    """Volunteer -> server: I can take ``n`` more tasks (free workers + prefetch).

    ``running`` (protocol 3): the held attempts a worker is computing now; None = not told.

    ``jobs`` (protocol 3, optional): the jobs its workers have loaded, those of idle workers first,
    at most ``MAX_READY_JOBS``. The server then prefers their tasks (job affinity), so a worker seldom
    has to be replaced for another job; a hint only, never a claim the server acts on beyond that.

    Answered by ``tasks``, or (protocol 4) by ``wait``: nothing now, the ready is held and the
    server pushes ``tasks`` when there is work. A new ``ready`` replaces a held one; ``ready {0}``
    withdraws it (answered by an empty ``tasks``)."""

    n: int
    running: list | None = None
    jobs: list = dataclasses.field(default_factory=list)
    TYPE = "ready"


@dataclasses.dataclass
class TaskSpec:
    """One leased task as sent to a volunteer (inside ``Tasks``)."""

    attempt: str
    task: int
    job: int
    index: int
    input: Any
    code_hash: str
    timeout: float
    deadline: float  # unix seconds; heartbeats move it
    requirements: list = dataclasses.field(default_factory=list)
    restore: str | None = None  # JSON text of the task's last checkpoint this attempt may resume from
    # Protocol 5: the further tasks of a chunk, ``ChunkItem``s of the same job, code, timeout and
    # deadline, leased with this one and run after it in one worker call, each with its own result.
    more: list = dataclasses.field(default_factory=list)

    def items(self) -> list[ChunkItem]:
        """Every task this spec carries, this one first (one for a spec that is not a chunk)."""
        return [ChunkItem(self.attempt, self.task, self.index, self.input, self.restore), *self.more]

    def attempts(self) -> list[str]:
        """The attempts of every task it carries, its own first."""
        return [self.attempt, *(item.attempt for item in self.more)]


@dataclasses.dataclass
class ChunkItem:
    """One further task of a chunk (inside ``TaskSpec.more``): what differs from the chunk's first."""

    attempt: str
    task: int
    index: int
    input: Any = None
    restore: str | None = None


@dataclasses.dataclass
class Tasks:
    """Server -> volunteer: leased tasks, the answer to a ``ready`` or pushed to a waiting volunteer.
    Empty only for ``ready {0}``, and for protocol 3 volunteers (nothing now: ask again later)."""

    tasks: list
    TYPE = "tasks"


@dataclasses.dataclass
class Wait:
    """Server -> volunteer (protocol 4): nothing to hand out now; the ``ready`` is held, and ``tasks``
    will be pushed as soon as there is work (do not ask again). Send a ``heartbeat`` (with no
    attempts, while holding none) within ``heartbeat`` seconds. With ``longest`` (protocol 6) no
    idle heartbeat is answered: each next interval is ``next_idle_beat`` of the last. Without it
    (older volunteers) each is answered by another ``wait`` with a longer interval, up to the
    server's idle limit; a heartbeat not answered means: keep the interval of the last ``wait``."""

    heartbeat: float
    longest: float = 0.0  # protocol 6: the longest idle interval (0: not sent, for older volunteers)
    TYPE = "wait"


def next_idle_beat(beat: float, longest: float) -> float:
    """A waiting volunteer's next idle heartbeat interval after sending one: doubled, up to the
    ``longest`` its last ``wait`` gave (protocol 6); the same again when that gave none."""
    return min(longest, beat * 2) if longest > 0 else beat


@dataclasses.dataclass
class NeedCode:
    """Volunteer -> server: send me the code of this job (once per job, then cached)."""

    job: int
    code_hash: str
    TYPE = "need_code"


@dataclasses.dataclass
class Code:
    """Server -> volunteer: a job's source, referenced by its content hash."""

    job: int
    code_hash: str
    source: str
    requirements: list = dataclasses.field(default_factory=list)
    name: str = ""  # protocol 3: the job's name and public description, shown to the volunteer
    description: str = ""
    TYPE = "code"


@dataclasses.dataclass
class Heartbeat:
    """Volunteer -> server: still working on these attempts; extends their deadlines. With no
    attempts, from a volunteer whose ``ready`` is held (protocol 4): still here, answered by ``wait``.

    ``running`` (protocol 3): which of them a worker is computing now (the others are prefetched)."""

    attempts: list
    running: list | None = None
    TYPE = "heartbeat"


@dataclasses.dataclass
class Progress:
    """Volunteer -> server: progress of one attempt (0..1): stored as an ``update`` with progress only
    (and throttled like one); also extends its lease. Kept for version-1 volunteers."""

    attempt: str
    fraction: float
    TYPE = "progress"


@dataclasses.dataclass
class Update:
    """Volunteer -> server: a running attempt's latest checkpoint (JSON text, or None), progress
    (0..1, or None) and the partial results appended since its last update. At most one per task
    every ``Welcome.every`` seconds; it also extends the attempt's lease."""

    attempt: str
    state: str | None = None
    progress: float | None = None
    partials: list = dataclasses.field(default_factory=list)
    TYPE = "update"


@dataclasses.dataclass
class Outcome:
    """One finished attempt (inside ``Results``). ``error`` set means the task raised."""

    attempt: str
    task: int
    result: Any = None
    output: str = ""
    error: str | None = None
    timeout: bool = False  # the worker stopped it at its timeout
    elapsed: float = 0.0  # seconds of worker time spent
    # Its chunk's worker failed (crashed) before the chunk's outcomes came back: this task's own is
    # unknown. Sent only when true (a page of version 6 or older never sends it).
    lost: bool = False


@dataclasses.dataclass
class Results:
    """Volunteer -> server: finished attempts. Answered by ``Ack`` once committed."""

    results: list
    TYPE = "results"


@dataclasses.dataclass
class Ack:
    """Server -> volunteer: these attempts are committed; forget them. ``ignored`` were late."""

    attempts: list
    ignored: list = dataclasses.field(default_factory=list)
    TYPE = "ack"


@dataclasses.dataclass
class Throttle:
    """Volunteer -> server: the throttle state changed (battery, network, cap, paused...)."""

    state: Any  # a dict on the wire; ThrottleState decoded
    TYPE = "throttle"


@dataclasses.dataclass
class Cancel:
    """Server -> volunteer: stop these attempts and drop them; their job was cancelled."""

    attempts: list
    job: int | None = None
    TYPE = "cancel"


@dataclasses.dataclass
class Hold:
    """Server -> volunteer: these results cannot be committed now (the database is away). Keep them,
    and send them again once, after ``retry_after`` seconds; each volunteer is given its own random
    delay, so that results do not all come back in the same second."""

    attempts: list
    retry_after: float
    reason: str = ""
    TYPE = "hold"


@dataclasses.dataclass
class Error:
    """Server -> volunteer: a message was refused. The connection stays open."""

    message: str
    ref: str | None = None  # the type of the refused message, if known
    TYPE = "error"


MESSAGES: dict[str, type] = {
    cls.TYPE: cls
    for cls in (
        Hello,
        Welcome,
        Ready,
        Tasks,
        Wait,
        NeedCode,
        Code,
        Heartbeat,
        Progress,
        Update,
        Results,
        Ack,
        Throttle,
        Cancel,
        Hold,
        Error,
    )
}
_FIELD_NAMES: dict[type, tuple[str, ...]] = {
    cls: tuple(f.name for f in dataclasses.fields(cls)) for cls in (*MESSAGES.values(), TaskSpec, Outcome, ChunkItem)
}
FROM_VOLUNTEER = frozenset({"hello", "ready", "need_code", "heartbeat", "progress", "update", "results", "throttle"})

# Field type checks: (field, accepted python types, required)
_JSON_ANY = (dict, list, str, int, float, bool, type(None))
_SCHEMA: dict[str, list[tuple[str, tuple, bool]]] = {
    "hello": [("volunteer", (str,), True), ("capabilities", (dict,), False), ("protocol", (int,), False)],
    "welcome": [
        ("volunteer", (str,), True),
        ("heartbeat", (int, float), True),
        ("server", (str,), False),
        ("every", (int, float), False),
    ],
    "ready": [("n", (int,), True), ("running", (list, type(None)), False), ("jobs", (list,), False)],
    "tasks": [("tasks", (list,), True)],
    "wait": [("heartbeat", (int, float), True), ("longest", (int, float), False)],
    "need_code": [("job", (int,), True), ("code_hash", (str,), True)],
    "code": [
        ("job", (int,), True),
        ("code_hash", (str,), True),
        ("source", (str,), True),
        ("requirements", (list,), False),
        ("name", (str,), False),
        ("description", (str,), False),
    ],
    "heartbeat": [("attempts", (list,), True), ("running", (list, type(None)), False)],
    "progress": [("attempt", (str,), True), ("fraction", (int, float), True)],
    "update": [
        ("attempt", (str,), True),
        ("state", (str, type(None)), False),
        ("progress", (int, float, type(None)), False),
        ("partials", (list,), False),
    ],
    "results": [("results", (list,), True)],
    "ack": [("attempts", (list,), True), ("ignored", (list,), False)],
    "throttle": [("state", (dict,), True)],
    "cancel": [("attempts", (list,), True), ("job", (int, type(None)), False)],
    "hold": [("attempts", (list,), True), ("retry_after", (int, float), True), ("reason", (str,), False)],
    "error": [("message", (str,), True), ("ref", (str, type(None)), False)],
}
_OUTCOME_SCHEMA = [
    ("attempt", (str,), True),
    ("task", (int,), True),
    ("result", _JSON_ANY, False),
    ("output", (str,), False),
    ("error", (str, type(None)), False),
    ("timeout", (bool,), False),
    ("elapsed", (int, float), False),
    ("lost", (bool,), False),
]
_TASK_SCHEMA = [
    ("attempt", (str,), True),
    ("task", (int,), True),
    ("job", (int,), True),
    ("index", (int,), True),
    ("input", _JSON_ANY, False),
    ("code_hash", (str,), True),
    ("timeout", (int, float), True),
    ("deadline", (int, float), True),
    ("requirements", (list,), False),
    ("restore", (str, type(None)), False),
    ("more", (list,), False),
]
_CHUNK_ITEM_SCHEMA = [
    ("attempt", (str,), True),
    ("task", (int,), True),
    ("index", (int,), True),
    ("input", _JSON_ANY, False),
    ("restore", (str, type(None)), False),
]


def _version_2_outcome(data: dict) -> dict:
    """A version-2 result named its run time `cpu`."""
    if "cpu" in data and "elapsed" not in data:
        data = {("elapsed" if k == "cpu" else k): v for k, v in data.items()}
    return data


def _check_fields(where: str, data: dict, schema: list) -> dict:
    known = {name for name, _, _ in schema}
    unknown = sorted(set(data) - known - {"type"})
    if unknown:
        raise ProtocolError(f"{where}: unknown field(s) {', '.join(unknown)}")
    out = {}
    for name, types, required in schema:
        if name not in data:
            if required:
                raise ProtocolError(f"{where}: missing field '{name}'")
            continue
        value = data[name]
        # bool is an int in Python; an id or a count given as true/false is a mistake.
        if isinstance(value, bool) and bool not in types and types is not _JSON_ANY:
            raise ProtocolError(f"{where}: field '{name}' must be {_names(types)}, not a boolean")
        if not isinstance(value, types):
            raise ProtocolError(f"{where}: field '{name}' must be {_names(types)}, not {type(value).__name__}")
        out[name] = value
    return out


def _names(types: tuple) -> str:
    names = {int: "an integer", float: "a number", str: "a string", list: "a list", dict: "an object"}
    return " or ".join(names.get(t, "null" if t is type(None) else t.__name__) for t in types)


def _flat(obj: Any) -> dict:
    # A shallow dict of a TaskSpec/Outcome: their values are plain JSON already, and
    # dataclasses.asdict's deep copy is the slowest part of encoding a busy server's messages.
    # A chunk's further tasks go as lists of their values ([attempt, task, index, input, restore]),
    # and a TaskSpec leaves out ``more`` when it has none (what a page of version 4 reads).
    data = {name: getattr(obj, name) for name in _FIELD_NAMES[type(obj)]}
    if type(obj) is TaskSpec:
        if obj.more:
            data["more"] = [[m.attempt, m.task, m.index, m.input, m.restore] for m in obj.more]
        else:
            del data["more"]
    elif type(obj) is Outcome and not obj.lost:
        del data["lost"]
    return data


def to_dict(msg: Any) -> dict:
    """A message dataclass as a JSON-ready dict with its ``type``."""
    data = {"type": msg.TYPE}
    for name in _FIELD_NAMES[type(msg)]:
        value = getattr(msg, name)
        if isinstance(value, list) and value and dataclasses.is_dataclass(value[0]):
            value = [_flat(v) for v in value]
        elif isinstance(value, Capabilities | ThrottleState):
            value = value.to_wire()
        data[name] = value
    if type(msg) is Wait and not msg.longest:
        del data["longest"]  # what a page of version 5 or older reads
    return data


def encode(msg: Any) -> str:
    """Serialise a message; raises ``ProtocolError`` if a value is not JSON-serialisable."""
    try:
        return json.dumps(to_dict(msg), allow_nan=False, separators=(",", ":"))
    except (TypeError, ValueError) as exc:
        raise ProtocolError(f"{msg.TYPE}: not JSON-serialisable: {exc}") from None


def from_dict(data: Any) -> Any:  # noqa: C901 - one flat check per message kind
    """Build a message dataclass from a decoded JSON value, checking every field."""
    if not isinstance(data, dict):
        raise ProtocolError("a message must be a JSON object")
    kind = data.get("type")
    if not isinstance(kind, str):
        raise ProtocolError("a message needs a string 'type'")
    cls = MESSAGES.get(kind)
    if cls is None:
        raise ProtocolError(f"unknown message type '{kind[:40]}'")
    fields = _check_fields(kind, data, _SCHEMA[kind])
    if kind == "results":
        if len(fields["results"]) > MAX_RESULTS_PER_MESSAGE:
            raise ProtocolError(f"results: at most {MAX_RESULTS_PER_MESSAGE} per message")
        outcomes = [_version_2_outcome(_obj(r)) for r in fields["results"]]
        fields["results"] = [Outcome(**_check_fields("results[]", r, _OUTCOME_SCHEMA)) for r in outcomes]
        for outcome in fields["results"]:
            if len(outcome.output) > MAX_OUTPUT_CHARS:
                outcome.output = outcome.output[:MAX_OUTPUT_CHARS]
            if outcome.error is not None and len(outcome.error) > MAX_ERROR_CHARS:
                outcome.error = outcome.error[-MAX_ERROR_CHARS:]
    elif kind == "tasks":
        fields["tasks"] = [_task_spec(_obj(t)) for t in fields["tasks"]]
    elif kind in ("heartbeat", "ack", "cancel", "hold"):
        for value in fields["attempts"]:
            if not isinstance(value, str):
                raise ProtocolError(f"{kind}: 'attempts' must be a list of strings")
    elif kind in ("progress", "update"):
        _check_live(kind, fields)
    if kind in ("ready", "heartbeat") and fields.get("running") is not None:
        _check_running(kind, fields["running"])
    if kind == "ready":
        if not 0 <= fields["n"] <= MAX_TASKS_PER_MESSAGE:
            raise ProtocolError(f"ready: n must be between 0 and {MAX_TASKS_PER_MESSAGE}")
        fields["jobs"] = _job_ids(fields.get("jobs", []))
    for name in ("heartbeat", "longest") if kind == "wait" else ():
        if not 0 < fields.get(name, 1) <= MAX_IDLE_HEARTBEAT:  # NaN fails this too
            raise ProtocolError(f"wait: {name} must be a number of seconds in (0, {MAX_IDLE_HEARTBEAT}]")
    if kind == "hello":
        if len(fields["volunteer"]) > 64:
            raise ProtocolError("hello: volunteer id must be at most 64 characters")
        fields["capabilities"] = Capabilities.from_wire(fields.get("capabilities"))
    elif kind == "throttle":
        fields["state"] = ThrottleState.from_wire(fields["state"])
    elif kind == "code":  # shown in the volunteer's page: cut to the server's own caps
        fields["name"] = fields.get("name", "")[:MAX_JOB_NAME_CHARS]
        fields["description"] = fields.get("description", "")[:MAX_DESCRIPTION_CHARS]
    return cls(**fields)


def _task_spec(data: dict) -> TaskSpec:
    """One ``tasks[]`` entry; a chunk's ``more`` holds ``[attempt, task, index, input, restore]`` lists
    (objects with those fields are read too), at most MAX_CHUNK_TASKS tasks in all."""
    fields = _check_fields("tasks[]", data, _TASK_SCHEMA)
    fields.setdefault("input", None)  # optional on the wire (None), a TypeError here before
    spec = TaskSpec(**fields)
    if len(spec.more) >= MAX_CHUNK_TASKS:
        raise ProtocolError(f"tasks: at most {MAX_CHUNK_TASKS} tasks in a chunk")
    more = []
    for item in spec.more:
        if isinstance(item, list):
            if len(item) != len(_CHUNK_ITEM_SCHEMA):
                raise ProtocolError("tasks[].more: each entry is [attempt, task, index, input, restore]")
            item = {name: value for (name, _, _), value in zip(_CHUNK_ITEM_SCHEMA, item, strict=True)}
        more.append(ChunkItem(**_check_fields("tasks[].more[]", _obj(item), _CHUNK_ITEM_SCHEMA)))
    spec.more = more
    return spec


def split_results(outcomes: list, most: int = MAX_RESULTS_PER_MESSAGE, budget: int = MAX_MESSAGE_BYTES // 2) -> list:
    """Outcomes in groups that each fit one ``results`` message: at most ``most`` and about ``budget``
    characters of result and output (a chunk's results go in one message when they are small)."""
    groups: list[list] = [[]]
    size = 0
    for outcome in outcomes:
        weight = 200 + len(outcome.output) + len(outcome.error or "") + len(json.dumps(outcome.result))
        if groups[-1] and (len(groups[-1]) >= most or size + weight > budget):
            groups.append([])
            size = 0
        groups[-1].append(outcome)
        size += weight
    return [g for g in groups if g]


def _job_ids(value: list) -> list:
    """``ready.jobs``: at most MAX_READY_JOBS job ids (integers in 1..MAX_JOB_ID), duplicates dropped."""
    if len(value) > MAX_READY_JOBS:
        raise ProtocolError(f"ready: at most {MAX_READY_JOBS} jobs in 'jobs'")
    for job in value:
        if isinstance(job, bool) or not isinstance(job, int) or not 0 < job <= MAX_JOB_ID:
            raise ProtocolError(f"ready: 'jobs' must be a list of job ids (integers from 1 to {MAX_JOB_ID})")
    return list(dict.fromkeys(value))


def _check_live(kind: str, fields: dict) -> None:
    """``progress`` and ``update``: an attempt id, a fraction in [0, 1], a capped state and partials."""
    if len(fields["attempt"]) > MAX_ATTEMPT_ID_CHARS:
        raise ProtocolError(f"{kind}: attempt id must be at most {MAX_ATTEMPT_ID_CHARS} characters")
    fraction = fields.get("fraction" if kind == "progress" else "progress")
    if fraction is not None and not 0.0 <= fraction <= 1.0:  # NaN fails this too
        raise ProtocolError(f"{kind}: progress must be a number in [0, 1]")
    state = fields.get("state")
    if state is not None:
        if len(state) > MAX_CHECKPOINT_BYTES or len(state.encode()) > MAX_CHECKPOINT_BYTES:
            raise ProtocolError(f"update: the checkpoint is over {MAX_CHECKPOINT_BYTES} bytes")
        try:
            json.loads(state, parse_constant=_no_constant)
        except (ValueError, RecursionError):
            raise ProtocolError("update: the checkpoint 'state' must be JSON text") from None
    partials = fields.get("partials", [])
    if len(partials) > MAX_PARTIALS_PER_UPDATE:
        raise ProtocolError(f"update: at most {MAX_PARTIALS_PER_UPDATE} partials per message")
    for value in partials:
        try:
            size = len(json.dumps(value, allow_nan=False, separators=(",", ":")))
        except ValueError:
            raise ProtocolError("update: a partial result must be strict JSON (no NaN or Infinity)") from None
        if size > MAX_PARTIAL_BYTES:
            raise ProtocolError(f"update: a partial result is over {MAX_PARTIAL_BYTES} bytes")


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def _check_running(kind: str, running: list) -> None:
    """``running``: at most MAX_WORKERS attempt ids (a volunteer computes no more at once)."""
    if len(running) > MAX_WORKERS:
        raise ProtocolError(f"{kind}: at most {MAX_WORKERS} attempts in 'running'")
    for value in running:
        if not isinstance(value, str) or len(value) > MAX_ATTEMPT_ID_CHARS:
            raise ProtocolError(f"{kind}: 'running' must be a list of attempt ids (strings)")


def _obj(value: Any) -> dict:
    if not isinstance(value, dict):
        raise ProtocolError("each list entry must be a JSON object")
    return value


def decode(text: str | bytes) -> Any:
    """Parse one websocket message; raises ``ProtocolError`` for anything not acceptable."""
    if len(text) > MAX_MESSAGE_BYTES:
        raise ProtocolError("message too large")
    try:
        data = json.loads(text)
    except (ValueError, UnicodeDecodeError) as exc:
        raise ProtocolError(f"malformed JSON: {exc}") from None
    except RecursionError:  # thousands of nested brackets: refused, the socket stays open
        raise ProtocolError("malformed JSON: nested too deeply") from None
    return from_dict(data)
