"""The page's websocket to the server: connect, reconnect with backoff and jitter, send, receive.

Messages are encoded and decoded by ``protocol`` -- the very module the server uses. A message
the page cannot decode is logged and dropped; the connection stays up.
"""

from __future__ import annotations

import asyncio

import js
import protocol
from pyodide.ffi import create_proxy
from supervisor import backoff  # top-level in the browser, like protocol


class Link:
    """One websocket at a time to ``url``; ``on_message(msg)``, ``on_open()``, ``on_close()``."""

    def __init__(self, url: str, on_message, on_open, on_close) -> None:
        self.url = url
        self.on_message = on_message
        self.on_open = on_open
        self.on_close = on_close
        self.socket = None
        self.failures = 0
        self.wanted = False
        self.next_try: float | None = None  # loop time of the next reconnect, for the page
        self._proxies: list = []
        self._retry: asyncio.Task | None = None

    @property
    def open(self) -> bool:
        return self.socket is not None and self.socket.readyState == 1

    def start(self) -> None:
        self.wanted = True
        if self.socket is None:
            self._connect()

    def stop(self) -> None:
        self.wanted = False
        self.failures = 0
        self.next_try = None
        if self._retry is not None:
            self._retry.cancel()
            self._retry = None
        if self.socket is not None:
            socket, self.socket = self.socket, None
            socket.onopen = socket.onmessage = socket.onclose = None
            socket.close(1000, "volunteer stopped")
            self._drop_proxies()

    def retry_in(self) -> float | None:
        """Seconds until the next reconnect attempt, or None when none is scheduled."""
        if self.next_try is None:
            return None
        return max(0.0, self.next_try - asyncio.get_event_loop().time())

    def send(self, msg) -> bool:
        """Send one message; False when the socket is not open (the caller keeps what it sent)."""
        if not self.open:
            return False
        self.socket.send(protocol.encode(msg))
        return True

    def _connect(self) -> None:
        self.next_try = None
        socket = js.WebSocket.new(self.url)
        self.socket = socket
        self._drop_proxies()
        on_open = create_proxy(lambda event: self._opened(socket))
        on_message = create_proxy(lambda event: self._received(socket, event.data))
        on_close = create_proxy(lambda event: self._closed(socket))
        self._proxies = [on_open, on_message, on_close]
        socket.onopen = on_open
        socket.onmessage = on_message
        socket.onclose = on_close

    def _drop_proxies(self) -> None:
        for proxy in self._proxies:
            proxy.destroy()
        self._proxies = []

    def _opened(self, socket) -> None:
        if socket is self.socket:
            self.on_open()

    def _received(self, socket, text) -> None:
        if socket is not self.socket:
            return
        try:
            msg = protocol.decode(str(text))
        except protocol.ProtocolError as exc:
            js.console.warn(f"UVM: dropped a message from the server: {exc}")
            return
        if isinstance(msg, protocol.Welcome):
            self.failures = 0
        self.on_message(msg)

    def _closed(self, socket) -> None:
        if socket is not self.socket:
            return
        self.socket = None
        self.on_close()
        if self.wanted:
            # full jitter from the first retry (up to 2 s): after a server restart its thousands of
            # volunteers come back spread out, not in the same instant
            delay = backoff(self.failures + 2)
            self.failures += 1
            self.next_try = asyncio.get_event_loop().time() + delay
            self._retry = asyncio.ensure_future(self._reconnect(delay))

    async def _reconnect(self, delay: float) -> None:
        await asyncio.sleep(delay)
        self._retry = None
        if self.wanted and self.socket is None:
            self._connect()
