"""Typed application keys: every shared resource of the app, opened in cleanup contexts."""

from __future__ import annotations

from typing import TYPE_CHECKING

from aiohttp import web

from server.config import Config

if TYPE_CHECKING:
    pass

config = web.AppKey("config", Config)
storage = web.AppKey("storage", "Storage")
dispatcher = web.AppKey("dispatcher", "Dispatcher")
volunteer_ids = web.AppKey("volunteer_ids", "VolunteerIds")  # server.jobs.identity
