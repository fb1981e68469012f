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
MIN_TIMEOUT = 0.1  # shorter leases would only churn: hand-out, expiry, requeue
RANGE_LIMIT = 2**63 - 1  # range bounds and step are stored as signed 64-bit integers
MAX_ATTEMPTS = 20
MAX_DESCRIPTION = 500  # characters of a job's public description (jobs.description)
MAX_REPLICATION = 10
MAX_REPLICAS = 20  # results one task may use before it fails with "no agreement"
ADAPTIVE = "adaptive"  # replication by reputation: trusted volunteers are spot-checked
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
    description: str = ""  # public: volunteers see it while they compute the job
    timeout: float = 60.0
    max_attempts: int = 3
    priority: int = 0
    requirements: list[str] = dataclasses.field(default_factory=list)
    replication: int | str = 1  # 1-10 replicas, or ADAPTIVE
    quorum: int | None = None  # None: the default of the replication (see ``Verification``)
    max_replicas: int | None = None
    tolerance: dict[str, float] | None = None  # {"rtol", "atol"} for floats; None: exact equality
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
    "description",
    "timeout",
    "max_attempts",
    "priority",
    "requirements",
    "replication",
    "quorum",
    "max_replicas",
    "tolerance",
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
    spec.description = _typed(body, "description", str, "").strip()
    if len(spec.description) > MAX_DESCRIPTION:
        raise InvalidJob(f"'description' must be at most {MAX_DESCRIPTION} characters", field="description")
    if any(ord(c) < 32 and c not in "\n\t" for c in spec.description):
        raise InvalidJob("'description' must be plain text (no control characters)", field="description")
    spec.timeout = float(_typed(body, "timeout", (int, float), 60.0))
    if not MIN_TIMEOUT <= spec.timeout <= MAX_TIMEOUT:
        raise InvalidJob(f"'timeout' must be between {MIN_TIMEOUT:g} and {MAX_TIMEOUT:g} seconds", field="timeout")
    spec.max_attempts = _typed(body, "max_attempts", int, 3)
    if not 1 <= spec.max_attempts <= MAX_ATTEMPTS:
        raise InvalidJob(f"'max_attempts' must be between 1 and {MAX_ATTEMPTS}", field="max_attempts")
    spec.priority = _typed(body, "priority", int, 0)
    if not -100 <= spec.priority <= 100:
        raise InvalidJob("'priority' must be between -100 and 100", field="priority")
    _parse_verification(spec, body, config)
    reqs = _typed(body, "requirements", list, [])
    if len(reqs) > 50 or not all(isinstance(r, str) and _REQUIREMENT.match(r) for r in reqs):
        raise InvalidJob("'requirements' must be a list of package names", field="requirements")
    spec.requirements = list(reqs)
    return spec


@dataclasses.dataclass(frozen=True)
class Verification:
    """How a job's results are verified: ``replicas`` results (2 under adaptive, where a trusted
    volunteer's result may stand alone), ``quorum`` of them agreeing, at most ``max_replicas``."""

    replication: int | str
    quorum: int
    max_replicas: int
    tolerance: tuple[float, float] | None  # (rtol, atol)

    @property
    def adaptive(self) -> bool:
        return self.replication == ADAPTIVE

    @property
    def replicas(self) -> int:
        return 2 if self.adaptive else int(self.replication)

    @classmethod
    def of(
        cls, replication: int | str, quorum: int | None, max_replicas: int | None, tolerance: dict | None
    ) -> Verification:
        """The job's settings with their defaults filled in: quorum k//2+1, max_replicas k+3."""
        k = 2 if replication == ADAPTIVE else int(replication)
        tol = (float(tolerance.get("rtol", 0.0)), float(tolerance.get("atol", 0.0))) if tolerance else None
        return cls(replication, quorum or k // 2 + 1, max_replicas or min(k + 3, MAX_REPLICAS), tol)


def attempts_exhausted(failures: int, max_attempts: int) -> bool:
    """The attempts rule, the one place it lives: a task fails once ``max_attempts`` distinct
    volunteers failed it (errors, timeouts, expired leases)."""
    return failures >= max_attempts


def _parse_verification(spec: JobSpec, body: dict, config: Config) -> None:
    """``replication`` (1-10 or "adaptive"), ``quorum``, ``max_replicas`` and ``tolerance``."""
    replication = body.get("replication")
    if replication is None:
        replication = config.default_replication
    if replication != ADAPTIVE and (
        isinstance(replication, bool) or not isinstance(replication, int) or not 1 <= replication <= MAX_REPLICATION
    ):
        raise InvalidJob(
            f"'replication' must be an integer between 1 and {MAX_REPLICATION}, or \"adaptive\"", field="replication"
        )
    spec.replication = replication
    k = 2 if replication == ADAPTIVE else int(replication)
    quorum = _typed(body, "quorum", int, None)
    if quorum is not None:
        if replication == ADAPTIVE:
            raise InvalidJob("'quorum' applies to a fixed replication; adaptive replication uses 2", field="quorum")
        if not k // 2 + 1 <= quorum <= k:
            raise InvalidJob(
                f"'quorum' must be between {k // 2 + 1} (a majority of {k}) and {k} (all of them)", field="quorum"
            )
    spec.quorum = quorum
    max_replicas = _typed(body, "max_replicas", int, None)
    if max_replicas is not None and not k <= max_replicas <= MAX_REPLICAS:
        raise InvalidJob(
            f"'max_replicas' must be between {k} (the replication) and {MAX_REPLICAS}", field="max_replicas"
        )
    spec.max_replicas = max_replicas
    spec.tolerance = _parse_tolerance(body.get("tolerance"))


def _parse_tolerance(tolerance: Any) -> dict[str, float] | None:
    if tolerance is None:
        return None
    if not isinstance(tolerance, dict) or not tolerance or set(tolerance) - {"rtol", "atol"}:
        raise InvalidJob('\'tolerance\' must be an object with "rtol" and/or "atol"', field="tolerance")
    for name, value in tolerance.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < 1e300:
            raise InvalidJob(f"'tolerance' {name} must be a non-negative number", field="tolerance")
    return {name: float(value) for name, value in tolerance.items()}


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
    if not all(-RANGE_LIMIT <= b <= RANGE_LIMIT for b in (start, stop, step)):
        raise InvalidJob(f"'range' bounds and step must lie within ±{RANGE_LIMIT} (63-bit integers)", field="inputs")
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
