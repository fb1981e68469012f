"""A researcher's job submission: cheap shape checks, then compile/AST verification.

Research code is compiled (never executed) on the server so a syntax error comes back with its
line, and its AST is read to check that ``main`` is defined.
"""

from __future__ import annotations

import ast
import dataclasses
import json
import re
from typing import Any

from server.config import Config

MAX_NAME = 200
MAX_TIMEOUT = 24 * 3600.0
MAX_ATTEMPTS = 20
MAX_REPLICATION = 10
_REQUIREMENT = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")


class InvalidJob(ValueError):
    """The submission cannot be accepted. ``line`` is set for syntax errors."""

    def __init__(self, message: str, line: int | None = None, field: str | None = None) -> None:
        super().__init__(message)
        self.line = line
        self.field = field

    def as_dict(self) -> dict:
        out: dict[str, Any] = {"error": str(self)}
        if self.line is not None:
            out["line"] = self.line
        if self.field is not None:
            out["field"] = self.field
        return out


@dataclasses.dataclass
class JobSpec:
    code: str
    inputs_kind: str  # list | range | none | after (results_of becomes a list when resolved)
    inputs: list | None = None
    range_start: int = 0
    range_stop: int = 0
    range_step: int = 1
    name: str = ""
    timeout: float = 60.0
    max_attempts: int = 3
    priority: int = 0
    requirements: list[str] = dataclasses.field(default_factory=list)
    replication: int = 1
    parent_job_id: int | None = None
    results_of: int | None = None  # resolved into a list of that job's results before saving

    @property
    def n_tasks(self) -> int:
        if self.inputs_kind == "after":
            return 0  # known once the upstream job is read
        if self.inputs_kind == "list":
            return len(self.inputs or [])
        if self.inputs_kind == "range":
            return len(range(self.range_start, self.range_stop, self.range_step))
        return 1


_FIELDS = {
    "code",
    "inputs",
    "name",
    "timeout",
    "max_attempts",
    "priority",
    "requirements",
    "replication",
}


def parse(body: Any, config: Config) -> JobSpec:
    """Cheap checks of a decoded JSON body: shapes, types, sizes. No compilation here."""
    if not isinstance(body, dict):
        raise InvalidJob("the body must be a JSON object")
    unknown = sorted(set(body) - _FIELDS)
    if unknown:
        raise InvalidJob(f"unknown field(s): {', '.join(unknown)}", field=unknown[0])
    code = body.get("code")
    if not isinstance(code, str) or not code.strip():
        raise InvalidJob("'code' must be a non-empty string of Python source", field="code")
    if len(code.encode()) > config.max_code_bytes:
        raise InvalidJob(f"'code' is larger than {config.max_code_bytes} bytes", field="code")
    spec = JobSpec(code=code, inputs_kind="none")
    _parse_inputs(spec, body.get("inputs"), config)
    spec.name = _typed(body, "name", str, "")[:MAX_NAME]
    spec.timeout = float(_typed(body, "timeout", (int, float), 60.0))
    if not 0 < spec.timeout <= MAX_TIMEOUT:
        raise InvalidJob(f"'timeout' must be between 0 and {MAX_TIMEOUT:g} seconds", field="timeout")
    spec.max_attempts = _typed(body, "max_attempts", int, 3)
    if not 1 <= spec.max_attempts <= MAX_ATTEMPTS:
        raise InvalidJob(f"'max_attempts' must be between 1 and {MAX_ATTEMPTS}", field="max_attempts")
    spec.priority = _typed(body, "priority", int, 0)
    if not -100 <= spec.priority <= 100:
        raise InvalidJob("'priority' must be between -100 and 100", field="priority")
    spec.replication = _typed(body, "replication", int, 1)
    if not 1 <= spec.replication <= MAX_REPLICATION:
        raise InvalidJob(f"'replication' must be between 1 and {MAX_REPLICATION}", field="replication")
    reqs = _typed(body, "requirements", list, [])
    if len(reqs) > 50 or not all(isinstance(r, str) and _REQUIREMENT.match(r) for r in reqs):
        raise InvalidJob("'requirements' must be a list of package names", field="requirements")
    spec.requirements = list(reqs)
    return spec


def _typed(body: dict, name: str, types: Any, default: Any) -> Any:
    value = body.get(name, default)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, types):
        want = {str: "a string", int: "an integer", list: "a list"}.get(types, "a number")
        raise InvalidJob(f"'{name}' must be {want}", field=name)
    return value


def _parse_inputs(spec: JobSpec, inputs: Any, config: Config) -> None:
    if inputs is None:
        spec.inputs_kind = "none"
    elif isinstance(inputs, list):
        spec.inputs_kind = "list"
        spec.inputs = inputs
        if not inputs:
            raise InvalidJob("'inputs' is an empty list; use null for a single run", field="inputs")
    elif isinstance(inputs, dict) and set(inputs) in ({"after"}, {"results_of"}):
        _parse_upstream(spec, inputs)
    elif isinstance(inputs, dict) and set(inputs) == {"range"}:
        _parse_range(spec, inputs["range"])
    else:
        raise InvalidJob(
            '\'inputs\' must be a JSON list, {"range": [start, stop, step]}, {"results_of": job},'
            ' {"after": job} or null',
            field="inputs",
        )
    if spec.n_tasks > config.max_tasks_per_job:
        raise InvalidJob(f"at most {config.max_tasks_per_job} tasks per job", field="inputs")


def _parse_upstream(spec: JobSpec, inputs: dict) -> None:
    """``{"results_of": A}``: A's results as a list. ``{"after": A}``: a pipeline stage fed as A runs."""
    ((key, upstream),) = inputs.items()
    if not isinstance(upstream, int) or isinstance(upstream, bool) or upstream <= 0:
        raise InvalidJob(f"'{key}' must be a job id", field="inputs")
    spec.parent_job_id = upstream
    if key == "after":
        spec.inputs_kind = "after"
    else:
        spec.inputs_kind, spec.results_of, spec.inputs = "list", upstream, []


def _parse_range(spec: JobSpec, bounds: Any) -> None:
    if (
        not isinstance(bounds, list)
        or not 1 <= len(bounds) <= 3
        or not all(isinstance(b, int) and not isinstance(b, bool) for b in bounds)
    ):
        raise InvalidJob("'range' must be [stop], [start, stop] or [start, stop, step] integers", field="inputs")
    start, stop, step = (0, bounds[0], 1) if len(bounds) == 1 else (bounds[0], bounds[1], 1)
    if len(bounds) == 3:
        step = bounds[2]
    if step == 0:
        raise InvalidJob("'range' step must not be zero", field="inputs")
    spec.inputs_kind = "range"
    spec.range_start, spec.range_stop, spec.range_step = start, stop, step
    if spec.n_tasks == 0:
        raise InvalidJob("'range' is empty", field="inputs")


def verify_code(code: str) -> None:
    """Compile (never run) the code; check that it defines ``main``. Raises ``InvalidJob``."""
    try:
        tree = ast.parse(code, "<job>")
        compile(tree, "<job>", "exec", dont_inherit=True)
    except SyntaxError as exc:
        where = f"line {exc.lineno}" + (f", column {exc.offset}" if exc.offset else "")
        raise InvalidJob(f"SyntaxError: {exc.msg} ({where})", line=exc.lineno, field="code") from None
    except (ValueError, RecursionError, MemoryError) as exc:
        raise InvalidJob(f"the code cannot be compiled: {exc}", field="code") from None
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.name == "main":
            return
        if isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == "main" for t in node.targets):
            return
        if isinstance(node, (ast.Import, ast.ImportFrom)) and any((a.asname or a.name) == "main" for a in node.names):
            return
    raise InvalidJob("the code must define a function main(x) at top level", field="code")


def encode_input(value: Any, limit: int) -> bytes:
    """One input as JSON bytes; raises ``InvalidJob`` if it is too large."""
    data = json.dumps(value, separators=(",", ":"), allow_nan=False).encode()
    if len(data) > limit:
        raise InvalidJob(f"an input is larger than {limit} bytes", field="inputs")
    return data
