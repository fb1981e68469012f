"""Typed application keys: every shared resource of the app, opened in cleanup contexts."""

from __future__ import annotations

from aiohttp import web

from server.config import Config
from server.jobs.dispatch import Dispatcher
from server.jobs.identity import VolunteerIds
from server.store.storage import Storage

config = web.AppKey("config", Config)
storage = web.AppKey("storage", Storage)
dispatcher = web.AppKey("dispatcher", Dispatcher)
volunteer_ids = web.AppKey("volunteer_ids", VolunteerIds)
