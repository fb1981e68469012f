"""The app factory: resources opened and closed in cleanup contexts, never at import time."""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import importlib.util
import logging
from collections.abc import AsyncIterator
from pathlib import Path

from aiohttp import web

from server.config import Config
from server.crypto import load_or_create_key
from server.jobs.dispatch import Dispatcher
from server.jobs.identity import VolunteerIds
from server.queue import Bus, MemoryQueue, Queue, RedisBus, RedisQueue
from server.store.engine import make_engine, migrate, private_sqlite_file
from server.store.keys import box_for, check_keys
from server.store.storage import Storage
from server.web import api, credit, metrics, openapi, ws
from server.web import appkeys as K
from server.web.addresses import proxy_middleware

logger = logging.getLogger(__name__)
ROOT = Path(__file__).resolve().parents[2]


async def _resources(app: web.Application) -> AsyncIterator[None]:
    config = app[K.config]
    if not config.database_url:
        private_sqlite_file(config.sqlite_path)
    box = box_for(config)  # before touching the database: no key on MySQL is refused at once
    engine = make_engine(config.sqlalchemy_url)
    try:
        await migrate(engine)
        for kid in await check_keys(engine, box):
            logger.warning("old key %s is no longer used by any row (rotate-key): remove it from UVM_OLD_KEYS", kid)
    except BaseException:
        await engine.dispose()
        raise
    storage = Storage(engine, box)
    # Volunteer ids are signed under a key derived from the current data key (box_for loaded it).
    app[K.volunteer_ids] = VolunteerIds(config.key or load_or_create_key(config.data_dir / "secret.key"))
    redis = None
    queue: Queue
    bus: Bus
    if config.redis_url:
        import redis.asyncio as aioredis

        # A blocking pool: under a burst a command waits for a free connection instead of raising
        # MaxConnectionsError (which used to escape a socket handler and drop the volunteer). Named,
        # so that `CLIENT LIST` in Redis tells the server instances' connections apart.
        pool = aioredis.BlockingConnectionPool.from_url(
            config.redis_url,
            max_connections=config.redis_pool_size,
            timeout=config.redis_pool_timeout,
            client_name=f"uvm-{config.instance}",
        )
        redis = aioredis.Redis.from_pool(pool)  # owns the pool: closed with the client
        queue, bus = RedisQueue(redis, config.instance, config.lease_grace), RedisBus(redis)
    else:
        queue, bus = MemoryQueue(config.lease_grace), Bus()
    dispatcher = Dispatcher(config, storage, queue, bus)
    app[K.storage] = storage
    app[K.dispatcher] = dispatcher
    background = asyncio.create_task(dispatcher.run())
    try:
        yield
    finally:
        await dispatcher.drain()  # closed sockets' leases: requeued and recorded before we close
        bus.stop()
        background.cancel()
        with contextlib.suppress(asyncio.CancelledError, asyncio.TimeoutError, Exception):
            await asyncio.wait_for(background, 5.0)
        await queue.close()
        await engine.dispose()


def create_app(config: Config | None = None) -> web.Application:
    config = config or Config.from_env()
    app = web.Application(
        client_max_size=config.max_body_bytes,
        # proxy first: every later layer sees the client's address and scheme, not the proxy's
        middlewares=[proxy_middleware, metrics.latency_middleware, api.errors_middleware, api.csrf_middleware],
    )
    app[K.config] = config
    app.cleanup_ctx.append(_resources)
    api.add_routes(app)
    credit.add_routes(app)
    ws.add_routes(app)
    openapi.add_routes(app)
    metrics.add_routes(app)
    # The browser side (volunteer page, dashboard) registers its routes when it is installed.
    if importlib.util.find_spec("server.web.static") is not None:
        importlib.import_module("server.web.static").add_static_routes(app, ROOT / "public", ROOT)
    if importlib.util.find_spec("server.web.dashboard") is not None:
        dashboard = importlib.import_module("server.web.dashboard")
        dashboard.add_routes(app)
        openapi.add_paths(app, dashboard.DASHBOARD_PATHS)
    return app
