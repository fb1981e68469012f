"""Configuration: read once from the environment into a typed object; bad values stop the start."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable
from pathlib import Path


class ConfigError(Exception):
    """A configuration value is missing or malformed; the message says which and why."""


@dataclasses.dataclass(frozen=True)
class Config:
    data_dir: Path = Path("data")
    database_url: str = ""  # empty: SQLite file in data_dir
    redis_url: str = ""  # empty: in-process queue
    key: bytes | None = None  # 32-byte AES key; empty: generated into data_dir/secret.key
    key_id: str = "k1"
    allowed_origins: tuple[str, ...] = ()  # extra websocket origins (embedding sites)
    max_body_bytes: int = 16 * 1024 * 1024
    max_ws_message_bytes: int = 4 * 1024 * 1024  # a larger message closes the socket with 1009
    max_code_bytes: int = 256 * 1024
    max_tasks_per_job: int = 1_000_000
    max_input_bytes: int = 1024 * 1024  # one input, JSON-encoded
    max_result_bytes: int = 1024 * 1024  # one result, JSON-encoded
    lease_grace: float = 30.0  # seconds added to a task's timeout for its lease
    heartbeat: float = 10.0  # seconds between volunteer heartbeats
    reaper_interval: float = 1.0
    intake_batch: int = 256
    event_loop: str = "uvloop"  # uvloop when installed (faster websockets), or asyncio
    package_index_url: str = ""  # empty: Pyodide's CDN for the pinned Pyodide version (server/web/static.py)
    public_url: str = ""  # the origin people reach us at (https://compute.example.edu); empty: the listen address
    instance: str = dataclasses.field(default_factory=lambda: os.urandom(4).hex())

    @property
    def sqlalchemy_url(self) -> str:
        return self.database_url or f"sqlite+aiosqlite:///{self.data_dir / 'uvm.sqlite3'}"

    @classmethod
    def from_env(cls, env: dict[str, str] | None = None, **overrides: object) -> Config:
        """Build from ``UVM_*`` variables; an unknown ``UVM_`` variable is an error, not ignored."""
        env = dict(os.environ if env is None else env)
        known: dict[str, tuple[str, Callable[[str], object]]] = {
            "UVM_DATA_DIR": ("data_dir", Path),
            "UVM_DATABASE_URL": ("database_url", _db_url),
            "UVM_REDIS_URL": ("redis_url", _redis_url),
            "UVM_KEY": ("key", _key),
            "UVM_KEY_ID": ("key_id", _key_id),
            "UVM_ALLOWED_ORIGINS": ("allowed_origins", _origins),
            "UVM_MAX_BODY_BYTES": ("max_body_bytes", _positive_int),
            "UVM_MAX_WS_MESSAGE_BYTES": ("max_ws_message_bytes", _positive_int),
            "UVM_MAX_TASKS_PER_JOB": ("max_tasks_per_job", _positive_int),
            "UVM_LEASE_GRACE": ("lease_grace", _positive_float),
            "UVM_HEARTBEAT": ("heartbeat", _positive_float),
            "UVM_PACKAGE_INDEX_URL": ("package_index_url", str),
            "UVM_EVENT_LOOP": ("event_loop", _event_loop),
            "UVM_PUBLIC_URL": ("public_url", _public_url),
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
        return cls(**values)  # type: ignore[arg-type]


def _db_url(raw: str) -> str:
    if raw and not raw.startswith(("mysql+aiomysql://", "sqlite+aiosqlite://")):
        raise ValueError("expected mysql+aiomysql://user:pass@host:port/db or sqlite+aiosqlite:///path")
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
