"""Configuration: read once from the environment into a typed object; bad values stop the start."""

from __future__ import annotations

import dataclasses
import ipaddress
import os
import re
from collections.abc import Callable
from pathlib import Path

from server.queue.base import AFFINITY_SLACK


class ConfigError(Exception):
    """A configuration value is missing or malformed; the message says which and why."""


@dataclasses.dataclass(frozen=True, repr=False)
class Config:
    data_dir: Path = Path("data")
    database_url: str = ""  # empty: SQLite file in data_dir
    redis_url: str = ""  # empty: in-process queue
    redis_pool_size: int = 100  # connections per server process; a command waits for a free one
    redis_pool_timeout: float = 20.0  # seconds a command may wait for a free connection
    key: bytes | None = None  # 32-byte AES key; empty: generated into data_dir/secret.key
    key_id: str = "k1"
    old_keys: tuple[tuple[str, bytes], ...] = ()  # (key id, key) still accepted for decryption (rotation)
    allowed_origins: tuple[str, ...] = ()  # extra websocket origins (embedding sites)
    max_body_bytes: int = 16 * 1024 * 1024
    max_ws_message_bytes: int = 4 * 1024 * 1024  # a larger message closes the socket with 1009
    max_code_bytes: int = 256 * 1024
    max_tasks_per_job: int = 1_000_000
    # Per-researcher quotas unless an operator set others (POST /api/admin/researchers/{id}/limits)
    researcher_max_queued_tasks: int = 10_000_000  # tasks not yet finished over all their jobs
    researcher_max_stored_bytes: int = 64 * 1024**3  # result and output ciphertext kept
    researcher_requests_per_second: float = 100.0  # API requests per instance, bursts of twice that
    max_input_bytes: int = 1024 * 1024  # one input, JSON-encoded
    max_result_bytes: int = 1024 * 1024  # one result, JSON-encoded
    lease_grace: float = 30.0  # seconds added to a task's timeout for its lease
    affinity_slack: float = AFFINITY_SLACK  # tasks a researcher may get ahead of fair share for job affinity
    chunk_target: float = 1.0  # seconds a chunk of a short-task job should run (chunked hand-out); 0 = off
    heartbeat: float = 10.0  # seconds between volunteer heartbeats
    idle_heartbeat: float = 60.0  # the longest interval between an idle (waiting) volunteer's heartbeats
    checkpoint_every: float = 5.0  # seconds between two updates (checkpoint, progress, partials) of one task
    reaper_interval: float = 1.0
    intake_batch: int = 256
    listen_backlog: int = 4096  # pending TCP connections the kernel queues (capped by net.core.somaxconn)
    event_loop: str = "uvloop"  # uvloop when installed (faster websockets), or asyncio
    package_index_url: str = ""  # empty: Pyodide's CDN for the pinned Pyodide version (server/web/static.py)
    package_lock: str = "pinned"  # pinned: our npm Pyodide's lock file; index: the index's own pyodide-lock.json
    public_url: str = ""  # the origin people reach us at (https://compute.example.edu); empty: the listen address
    trusted_proxies: tuple[str, ...] = ()  # networks whose X-Forwarded-For/-Proto are believed
    metrics_token: str = ""  # Bearer token that may read /metrics
    metrics_allow: tuple[str, ...] = ()  # networks that may read /metrics without the token
    log_format: str = "text"  # text | json
    default_replication: int | str = "adaptive"  # a job's replication when it names none
    trust_after: int = 10  # consecutive validated results before a volunteer's result may stand alone
    spot_check: float = 0.1  # fraction of a trusted volunteer's results replicated anyway
    max_connections_per_address: int = 32  # volunteer sockets open at once from one client address
    max_messages_per_second: int = 200  # per volunteer socket, averaged over a burst of twice that
    limit_loopback: bool = False  # apply the two limits above to 127.0.0.1/::1 too (tests of the limits)
    instance: str = dataclasses.field(default_factory=lambda: os.urandom(4).hex())

    def __repr__(self) -> str:
        """Every field, except secrets: no key, and the database URL without its password."""
        shown = []
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if field.name == "key":
                value = None if value is None else "<hidden>"
            elif field.name in ("database_url", "redis_url"):
                value = _without_password(value)
            shown.append(f"{field.name}={value!r}")
        return f"Config({', '.join(shown)})"

    @property
    def sqlite_path(self) -> Path:
        """The embedded default's database file (when no ``database_url``)."""
        return self.data_dir / "uvm.sqlite3"

    @property
    def sqlalchemy_url(self) -> str:
        return self.database_url or f"sqlite+aiosqlite:///{self.sqlite_path}"

    @classmethod
    def from_env(cls, env: dict[str, str] | None = None, **overrides: object) -> Config:
        """Build from ``UVM_*`` variables; an unknown ``UVM_`` variable is an error, not ignored."""
        env = dict(os.environ if env is None else env)
        known: dict[str, tuple[str, Callable[[str], object]]] = {
            "UVM_DATA_DIR": ("data_dir", Path),
            "UVM_DATABASE_URL": ("database_url", _db_url),
            "UVM_REDIS_URL": ("redis_url", _redis_url),
            "UVM_REDIS_POOL_SIZE": ("redis_pool_size", _positive_int),
            "UVM_REDIS_POOL_TIMEOUT": ("redis_pool_timeout", _positive_float),
            "UVM_KEY": ("key", _key),
            "UVM_KEY_ID": ("key_id", _key_id),
            "UVM_OLD_KEYS": ("old_keys", _old_keys),
            "UVM_ALLOWED_ORIGINS": ("allowed_origins", _origins),
            "UVM_MAX_BODY_BYTES": ("max_body_bytes", _positive_int),
            "UVM_MAX_WS_MESSAGE_BYTES": ("max_ws_message_bytes", _positive_int),
            "UVM_MAX_TASKS_PER_JOB": ("max_tasks_per_job", _positive_int),
            "UVM_RESEARCHER_MAX_QUEUED_TASKS": ("researcher_max_queued_tasks", _positive_int),
            "UVM_RESEARCHER_MAX_STORED_BYTES": ("researcher_max_stored_bytes", _positive_int),
            "UVM_RESEARCHER_REQUESTS_PER_SECOND": ("researcher_requests_per_second", _positive_float),
            "UVM_LEASE_GRACE": ("lease_grace", _positive_float),
            "UVM_AFFINITY_SLACK": ("affinity_slack", _slack),
            "UVM_CHUNK_TARGET": ("chunk_target", _chunk_target),
            "UVM_HEARTBEAT": ("heartbeat", _positive_float),
            "UVM_IDLE_HEARTBEAT": ("idle_heartbeat", _idle_heartbeat),
            "UVM_CHECKPOINT_EVERY": ("checkpoint_every", _positive_float),
            "UVM_LISTEN_BACKLOG": ("listen_backlog", _positive_int),
            "UVM_PACKAGE_INDEX_URL": ("package_index_url", str),
            "UVM_PACKAGE_LOCK": ("package_lock", _package_lock),
            "UVM_EVENT_LOOP": ("event_loop", _event_loop),
            "UVM_PUBLIC_URL": ("public_url", _public_url),
            "UVM_TRUSTED_PROXIES": ("trusted_proxies", _networks),
            "UVM_METRICS_TOKEN": ("metrics_token", _token),
            "UVM_METRICS_ALLOW": ("metrics_allow", _networks),
            "UVM_LOG_FORMAT": ("log_format", _log_format),
            "UVM_DEFAULT_REPLICATION": ("default_replication", _replication),
            "UVM_TRUST_AFTER": ("trust_after", _positive_int),
            "UVM_SPOT_CHECK": ("spot_check", _fraction),
            "UVM_MAX_CONNECTIONS_PER_ADDRESS": ("max_connections_per_address", _positive_int),
            "UVM_MAX_MESSAGES_PER_SECOND": ("max_messages_per_second", _positive_int),
            "UVM_LIMIT_LOOPBACK": ("limit_loopback", _bool),
        }
        values: dict[str, object] = {}
        for name, raw in env.items():
            if not name.startswith("UVM_") or name.startswith("UVM_TEST_"):
                continue  # UVM_TEST_* belong to the test suite (its Redis port), not to the server
            if name not in known:
                raise ConfigError(f"unknown setting {name}; known: {', '.join(sorted(known))}")
            field, parse = known[name]
            try:
                values[field] = parse(raw)
            except (ValueError, TypeError) as exc:
                raise ConfigError(f"{name}={raw!r}: {exc}") from None
        values.update(overrides)
        config = cls(**values)  # type: ignore[arg-type]
        if config.idle_heartbeat < config.heartbeat:
            raise ConfigError(
                f"UVM_IDLE_HEARTBEAT={config.idle_heartbeat:g} is below UVM_HEARTBEAT={config.heartbeat:g}: "
                "idle volunteers' heartbeats only grow apart"
            )
        if config.package_lock == "index" and not config.package_index_url:
            raise ConfigError(
                "UVM_PACKAGE_LOCK=index needs UVM_PACKAGE_INDEX_URL: the lock file of your own Pyodide "
                "distribution is read from there (the default CDN's packages are checked against our pinned lock)"
            )
        if any(kid == config.key_id for kid, _ in config.old_keys):
            raise ConfigError(f"UVM_OLD_KEYS names {config.key_id!r}, the current UVM_KEY_ID; give old keys other ids")
        return config


def _without_password(url: str) -> str:
    return re.sub(r"://([^:/@]*):[^@]*@", r"://\1:***@", url)


def _idle_heartbeat(raw: str) -> float:
    value = _positive_float(raw)
    if not value <= 3600:  # protocol.MAX_IDLE_HEARTBEAT: a volunteer refuses a longer one (NaN too)
        raise ValueError("at most 3600 seconds")
    return value


def _bool(raw: str) -> bool:
    if raw.lower() in ("1", "true", "yes", "on"):
        return True
    if raw.lower() in ("0", "false", "no", "off", ""):
        return False
    raise ValueError("expected 1/true/yes/on or 0/false/no/off")


def _db_url(raw: str) -> str:
    if raw and not raw.startswith(("mysql+asyncmy://", "mysql+aiomysql://", "sqlite+aiosqlite://")):
        raise ValueError(
            "expected mysql+asyncmy://user:pass@host:port/db (mysql+aiomysql:// runs on asyncmy too)"
            " or sqlite+aiosqlite:///path"
        )
    return raw


def _redis_url(raw: str) -> str:
    if raw and not raw.startswith(("redis://", "rediss://", "unix://")):
        raise ValueError("expected redis://host:port/db")
    return raw


def _key(raw: str) -> bytes | None:
    if not raw:
        return None
    key = bytes.fromhex(raw)
    if len(key) != 32:
        raise ValueError("expected 64 hex digits (a 256-bit key)")
    return key


def _key_id(raw: str) -> str:
    if not raw or len(raw) > 16 or not raw.isalnum():
        raise ValueError("expected 1-16 letters or digits")
    return raw


def _old_keys(raw: str) -> tuple[tuple[str, bytes], ...]:
    """``k1:HEX,k0:HEX``: keys that decrypt rows written before a rotation."""
    pairs = []
    for item in (i.strip() for i in raw.split(",") if i.strip()):
        kid, sep, hexkey = item.partition(":")
        if not sep:
            raise ValueError(f"expected id:hex pairs separated by commas, got {item[:20]!r}...")
        key = _key(hexkey.strip())
        if key is None:
            raise ValueError(f"key id {kid!r} has no key")
        pairs.append((_key_id(kid.strip()), key))
    if len({kid for kid, _ in pairs}) != len(pairs):
        raise ValueError("a key id appears twice")
    return tuple(pairs)


def _networks(raw: str) -> tuple[str, ...]:
    """Comma-separated addresses or networks (``10.0.0.1``, ``10.0.0.0/8``, ``::1``)."""
    nets = tuple(n.strip() for n in raw.split(",") if n.strip())
    for net in nets:
        ipaddress.ip_network(net, strict=False)  # ValueError names the bad one
    return tuple(str(ipaddress.ip_network(n, strict=False)) for n in nets)


def _token(raw: str) -> str:
    if raw and len(raw) < 16:
        raise ValueError("use at least 16 characters (python3 -c 'import secrets; print(secrets.token_urlsafe())')")
    return raw


def _package_lock(raw: str) -> str:
    if raw not in ("pinned", "index"):
        raise ValueError("expected pinned or index")
    return raw


def _log_format(raw: str) -> str:
    if raw not in ("text", "json"):
        raise ValueError("expected text or json")
    return raw


def _origins(raw: str) -> tuple[str, ...]:
    origins = tuple(o.strip().rstrip("/") for o in raw.split(",") if o.strip())
    for origin in origins:
        if not origin.startswith(("http://", "https://")):
            raise ValueError(f"origin {origin!r} must start with http:// or https://")
    return origins


def _public_url(raw: str) -> str:
    url = raw.strip().rstrip("/")
    if url and (not url.startswith(("http://", "https://")) or "/" in url.split("://", 1)[1]):
        raise ValueError("expected an origin such as https://compute.example.edu (scheme and host, no path)")
    return url


def _replication(raw: str) -> int | str:
    if raw == "adaptive":
        return raw
    if not raw.isdigit() or not 1 <= int(raw) <= 10:
        raise ValueError("expected adaptive or an integer from 1 to 10")
    return int(raw)


def _fraction(raw: str) -> float:
    value = float(raw)
    if not 0 <= value <= 1:
        raise ValueError("expected a fraction between 0 and 1")
    return value


def _slack(raw: str) -> float:
    value = float(raw)
    if not 0 <= value <= 1_000_000:  # NaN fails this too
        raise ValueError("expected a number of tasks from 0 to 1000000")
    return value


def _chunk_target(raw: str) -> float:
    value = float(raw)
    if not 0 <= value <= 3600:  # NaN fails this too
        raise ValueError("expected seconds from 0 (chunks off) to 3600")
    return value


def _event_loop(raw: str) -> str:
    if raw not in ("uvloop", "asyncio"):
        raise ValueError("expected uvloop or asyncio")
    return raw


def _positive_int(raw: str) -> int:
    value = int(raw)
    if value <= 0:
        raise ValueError("must be a positive integer")
    return value


def _positive_float(raw: str) -> float:
    value = float(raw)
    if value <= 0:
        raise ValueError("must be a positive number")
    return value
