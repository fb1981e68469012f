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
from server.crypto import Box, load_or_create_key
from server.jobs.dispatch import Dispatcher
from server.queue import Bus, MemoryQueue, Queue, RedisBus, RedisQueue
from server.store.engine import make_engine, migrate
from server.store.storage import Storage
from server.web import api, openapi, ws
from server.web import appkeys as K

logger = logging.getLogger(__name__)
ROOT = Path(__file__).resolve().parents[2]


def make_box(config: Config) -> Box:
    key = config.key or load_or_create_key(config.data_dir / "secret.key")
    return Box({config.key_id: key}, config.key_id)


async def _resources(app: web.Application) -> AsyncIterator[None]:
    config = app[K.config]
    if not config.database_url:
        config.data_dir.mkdir(parents=True, exist_ok=True)
    engine = make_engine(config.sqlalchemy_url)
    await migrate(engine)
    storage = Storage(engine, make_box(config))
    redis = None
    queue: Queue
    bus: Bus
    if config.redis_url:
        import redis.asyncio as aioredis

        # Named, so that `CLIENT LIST` in Redis tells the server instances' connections apart.
        redis = aioredis.from_url(config.redis_url, client_name=f"uvm-{config.instance}")
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
        bus.stop()
        background.cancel()
        with contextlib.suppress(asyncio.CancelledError, asyncio.TimeoutError, Exception):
            await asyncio.wait_for(background, 5.0)
        await queue.close()
        await engine.dispose()


def create_app(config: Config | None = None) -> web.Application:
    config = config or Config.from_env()
    app = web.Application(client_max_size=config.max_body_bytes, middlewares=[api.errors_middleware])
    app[K.config] = config
    app.cleanup_ctx.append(_resources)
    api.add_routes(app)
    ws.add_routes(app)
    openapi.add_routes(app)
    # The browser side (volunteer page, dashboard) registers its routes when it is installed.
    if importlib.util.find_spec("server.web.static") is not None:
        importlib.import_module("server.web.static").add_static_routes(app, ROOT / "public", ROOT)
    if importlib.util.find_spec("server.web.dashboard") is not None:
        dashboard = importlib.import_module("server.web.dashboard")
        dashboard.add_routes(app)
        openapi.add_paths(app, dashboard.DASHBOARD_PATHS)
    return app
