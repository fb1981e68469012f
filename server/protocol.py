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

PROTOCOL_VERSION = 1
MAX_MESSAGE_BYTES = 4 * 1024 * 1024  # one websocket message; larger closes with 1009
MAX_TASKS_PER_MESSAGE = 64
MAX_OUTPUT_CHARS = 64 * 1024  # captured stdout/stderr kept per task
MAX_ERROR_CHARS = 16 * 1024


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
    QUEUED = "queued"  # waiting in the ready queue, or leased (running) -- Redis knows which
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


# ------------------------------------------------------------------------------------- messages
@dataclasses.dataclass
class Hello:
    """Volunteer -> server, first message. ``volunteer`` is an anonymous id the browser keeps."""

    volunteer: str
    capabilities: dict = dataclasses.field(default_factory=dict)
    protocol: int = PROTOCOL_VERSION
    TYPE = "hello"


@dataclasses.dataclass
class Welcome:
    """Server -> volunteer, answer to hello."""

    volunteer: str
    heartbeat: float  # seconds between heartbeats the server expects
    server: str = ""
    TYPE = "welcome"


@dataclasses.dataclass
class Ready:
    """Volunteer -> server: I can take ``n`` more tasks (free workers + prefetch)."""

    n: int
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


@dataclasses.dataclass
class Tasks:
    """Server -> volunteer: leased tasks. Empty ``tasks`` means nothing to do right now."""

    tasks: list
    TYPE = "tasks"


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
    TYPE = "code"


@dataclasses.dataclass
class Heartbeat:
    """Volunteer -> server: still working on these attempts; extends their deadlines."""

    attempts: list
    TYPE = "heartbeat"


@dataclasses.dataclass
class Progress:
    """Volunteer -> server: optional progress of one attempt (0..1); also extends its lease."""

    attempt: str
    fraction: float
    TYPE = "progress"


@dataclasses.dataclass
class Outcome:
    """One finished attempt (inside ``Results``). ``error`` set means the task raised."""

    attempt: str
    task: int
    result: Any = None
    output: str = ""
    error: str | None = None
    timeout: bool = False  # the worker stopped it at its timeout
    cpu: float = 0.0  # seconds of worker time spent


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

    state: dict
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
        NeedCode,
        Code,
        Heartbeat,
        Progress,
        Results,
        Ack,
        Throttle,
        Cancel,
        Hold,
        Error,
    )
}
_FIELD_NAMES: dict[type, tuple[str, ...]] = {
    cls: tuple(f.name for f in dataclasses.fields(cls)) for cls in (*MESSAGES.values(), TaskSpec, Outcome)
}
FROM_VOLUNTEER = frozenset({"hello", "ready", "need_code", "heartbeat", "progress", "results", "throttle"})

# Field type checks: (field, accepted python types, required)
_JSON_ANY = (dict, list, str, int, float, bool, type(None))
_SCHEMA: dict[str, list[tuple[str, tuple, bool]]] = {
    "hello": [("volunteer", (str,), True), ("capabilities", (dict,), False), ("protocol", (int,), False)],
    "welcome": [("volunteer", (str,), True), ("heartbeat", (int, float), True), ("server", (str,), False)],
    "ready": [("n", (int,), True)],
    "tasks": [("tasks", (list,), True)],
    "need_code": [("job", (int,), True), ("code_hash", (str,), True)],
    "code": [
        ("job", (int,), True),
        ("code_hash", (str,), True),
        ("source", (str,), True),
        ("requirements", (list,), False),
    ],
    "heartbeat": [("attempts", (list,), True)],
    "progress": [("attempt", (str,), True), ("fraction", (int, float), True)],
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
    ("cpu", (int, float), False),
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
]


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
    return {name: getattr(obj, name) for name in _FIELD_NAMES[type(obj)]}


def to_dict(msg: Any) -> dict:
    """A message dataclass as a JSON-ready dict with its ``type``."""
    data = {"type": msg.TYPE}
    for name in _FIELD_NAMES[type(msg)]:
        value = getattr(msg, name)
        if isinstance(value, list) and value and dataclasses.is_dataclass(value[0]):
            value = [_flat(v) for v in value]
        data[name] = value
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
        if len(fields["results"]) > MAX_TASKS_PER_MESSAGE:
            raise ProtocolError(f"results: at most {MAX_TASKS_PER_MESSAGE} per message")
        fields["results"] = [Outcome(**_check_fields("results[]", _obj(r), _OUTCOME_SCHEMA)) for r in fields["results"]]
        for outcome in fields["results"]:
            if len(outcome.output) > MAX_OUTPUT_CHARS:
                outcome.output = outcome.output[:MAX_OUTPUT_CHARS]
            if outcome.error is not None and len(outcome.error) > MAX_ERROR_CHARS:
                outcome.error = outcome.error[-MAX_ERROR_CHARS:]
    elif kind == "tasks":
        fields["tasks"] = [TaskSpec(**_check_fields("tasks[]", _obj(t), _TASK_SCHEMA)) for t in fields["tasks"]]
    elif kind in ("heartbeat", "ack", "cancel", "hold"):
        for value in fields["attempts"]:
            if not isinstance(value, str):
                raise ProtocolError(f"{kind}: 'attempts' must be a list of strings")
    if kind == "ready" and not 0 <= fields["n"] <= MAX_TASKS_PER_MESSAGE:
        raise ProtocolError(f"ready: n must be between 0 and {MAX_TASKS_PER_MESSAGE}")
    if kind == "hello" and not 1 <= len(fields["volunteer"]) <= 64:
        raise ProtocolError("hello: volunteer id must be 1 to 64 characters")
    return cls(**fields)


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
    return from_dict(data)
