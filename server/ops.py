"""Operators' commands behind the CLI: ``rotate-key`` and ``check-config``.

Both print for a person at a terminal and return the process exit code.
"""

from __future__ import annotations

import asyncio
import sys

from server.config import Config
from server.crypto import Box, DecryptError


async def rotate_key(config: Config, batch: int = 500, max_rows: int | None = None) -> int:
    """Re-encrypt every value under the current key, with a progress bar; resumable."""
    from tqdm import tqdm

    from server.store import keys, rotation
    from server.store.engine import make_engine, migrate

    try:
        box = keys.box_for(config)
    except keys.KeyProblem as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    engine = make_engine(config.sqlalchemy_url)
    try:
        await migrate(engine)
        await keys.check_keys(engine, box)
        todo = await rotation.pending(engine, box)
        if max_rows is not None:
            todo = min(todo, max_rows)
        print(f"re-encrypting under key {box.current!r}: {todo} rows to do", flush=True)
        with tqdm(total=todo, unit="row", file=sys.stdout, mininterval=0.5) as bar:
            report = await rotation.rotate(engine, box, batch=batch, max_rows=max_rows, progress=bar.update)
        print(f"re-encrypted {report.rewritten} values ({report.raced} changed by a server meanwhile)")
        unused = [kid for kid, n in report.remaining.items() if n == 0]
        for kid, n in report.remaining.items():
            if n:
                print(f"key {kid!r} still seals {n} values: run rotate-key again", flush=True)
        if report.stopped_early:
            print(f"stopped after --max-rows {max_rows}; run rotate-key again to continue", flush=True)
        elif unused:
            await keys.retire(engine, unused)
            for kid in unused:
                print(f"no row uses key {kid!r} any more: remove it from UVM_OLD_KEYS", flush=True)
        return 0
    except keys.KeyProblem as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except DecryptError as exc:
        print(f"error: {exc}: give every key still in use in UVM_OLD_KEYS (id:hex)", file=sys.stderr)
        return 1
    finally:
        await engine.dispose()


async def check_config(config: Config) -> int:
    """Print the settings in use (secrets masked), then reach the database and Redis."""
    from server.store import keys

    problems = 0
    backend = "MySQL/MariaDB" if config.database_url.startswith("mysql") else "SQLite"
    print(f"database: {backend} at {_mask(config.sqlalchemy_url)}")
    print(f"queue: {'Redis at ' + _mask(config.redis_url) if config.redis_url else 'in-process (one server only)'}")
    print(f"key: id {config.key_id!r}, {'from UVM_KEY' if config.key else 'generated into the data folder'}")
    if config.old_keys:
        print(f"old keys (decrypt only): {', '.join(kid for kid, _ in config.old_keys)}")
    print(f"trusted proxies: {', '.join(config.trusted_proxies) or 'none (X-Forwarded-* ignored)'}")
    metrics = [*(["a token"] if config.metrics_token else []), *config.metrics_allow]
    print(f"/metrics readable by: {', '.join(metrics) or 'nobody (set UVM_METRICS_TOKEN or UVM_METRICS_ALLOW)'}")
    print(f"logs: {config.log_format}")
    try:
        box = keys.box_for(config)
    except keys.KeyProblem as exc:
        print(f"PROBLEM: {exc}")
        box, problems = None, problems + 1
    problems += await _check_database(config, box)
    problems += await _check_redis(config)
    print("configuration OK" if not problems else f"{problems} problem(s) found")
    return 0 if not problems else 1


async def _check_database(config: Config, box: Box | None) -> int:
    import sqlalchemy as sa

    from server.store import keys
    from server.store.engine import make_engine

    if not config.database_url and not config.data_dir.exists():
        print(f"database: {config.data_dir} does not exist yet (created at the first start)")
        return 0
    engine = make_engine(config.sqlalchemy_url)
    try:
        async with asyncio.timeout(10), engine.connect() as conn:
            version = (
                await conn.execute(
                    sa.text("select sqlite_version()" if "sqlite" in engine.url.drivername else "select version()")
                )
            ).scalar()
            has_schema = await conn.run_sync(lambda c: sa.inspect(c).has_table("jobs"))
        print(f"database reached: version {version}; schema {'present' if has_schema else 'not created yet'}")
        if box is not None and has_schema:
            await keys.check_keys(engine, box, record=False)
            print("key matches the fingerprint this database keeps for its id")
        return 0
    except keys.KeyProblem as exc:
        print(f"PROBLEM: {exc}")
        return 1
    except Exception as exc:  # noqa: BLE001 - reported to the operator, who fixes the setting
        print(f"PROBLEM: database not reachable: {type(exc).__name__}: {exc}")
        return 1
    finally:
        await engine.dispose()


async def _check_redis(config: Config) -> int:
    if not config.redis_url:
        return 0
    import redis.asyncio as aioredis

    client = aioredis.from_url(config.redis_url, socket_connect_timeout=5)
    try:
        info = await asyncio.wait_for(client.info("server"), 10)
        print(f"Redis reached: version {info.get('redis_version')}")
        return 0
    except Exception as exc:  # noqa: BLE001 - reported to the operator
        print(f"PROBLEM: Redis not reachable: {type(exc).__name__}: {exc}")
        return 1
    finally:
        await client.aclose()


def _mask(url: str) -> str:
    """A URL with its password replaced by ***."""
    scheme, sep, rest = url.partition("://")
    creds, at, host = rest.rpartition("@")
    if not at or ":" not in creds:
        return url
    return f"{scheme}{sep}{creds.split(':', 1)[0]}:***@{host}"
