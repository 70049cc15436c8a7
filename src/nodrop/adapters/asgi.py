"""Draining signals for ASGI applications, through the ASGI interface only.

When a worker drains, a client must be told what is happening in a way it
can act on:

* an HTTP/1.x response started while draining carries ``Connection:
  close``, so the client opens its next request on a new connection (the
  server then closes this one after the response, as HTTP says it may);
* a WebSocket session is closed with code 1012 (Service Restart), never cut
  with a bare TCP close, so the client knows to reconnect at once.

:class:`AsgiDrain` does both by wrapping each connection's ``send`` and
``receive`` callables; it never looks inside the server, so it works with
any ASGI server. The application sees what the ASGI spec promises: after
the 1012 close its ``send`` raises :class:`ServiceRestart` (an ``OSError``,
which Starlette turns into ``WebSocketDisconnect``), and the disconnect it
receives carries code 1012.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

Message = MutableMapping[str, Any]
Scope = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

SERVICE_RESTART = 1012
"""WebSocket close code: the server is restarting; reconnect (RFC 6455 registry)."""
RESTART_REASON = "service restart"


class ServiceRestart(ConnectionError):
    """Raised by ``send`` on a WebSocket session the drain has closed."""


class _Session:
    __slots__ = ("accepted", "closed", "restarted", "send")

    def __init__(self, send: Send) -> None:
        self.send = send
        self.accepted = False
        self.closed = False
        self.restarted = False


App = Callable[[Scope, Receive, Send], Awaitable[None]]


class AsgiDrain:
    """Per-worker drain state for an ASGI application.

    Use :meth:`wrap` on every ``http`` and ``websocket`` connection, then
    :meth:`start` when draining begins.
    """

    def __init__(self) -> None:
        self.draining = False
        self.close_http = False
        self._sessions: set[_Session] = set()
        self.restarted_sessions = 0

    @property
    def websocket_sessions(self) -> int:
        return len(self._sessions)

    def wrap(self, scope: Scope, receive: Receive, send: Send) -> tuple[Receive, Send]:
        """The ``receive`` and ``send`` to give the application for ``scope``."""
        if scope["type"] == "http" and scope.get("http_version") in ("1.0", "1.1"):
            return receive, self._http_send(send)
        if scope["type"] == "websocket":
            return self._websocket(receive, send)
        return receive, send

    async def start(self, *, close_http: bool) -> None:
        """Draining begins: close every WebSocket session with 1012, and, if
        ``close_http``, end every HTTP/1.x connection after its next response."""
        self.draining = True
        if close_http:
            self.close_http = True
        sessions = [s for s in self._sessions if s.accepted and not s.closed]
        await asyncio.gather(*(self._restart(s) for s in sessions), return_exceptions=True)

    def _http_send(self, send: Send) -> Send:
        async def http_send(message: Message) -> None:
            if self.close_http and message["type"] == "http.response.start":
                headers = list(message.get("headers", ()))
                if not any(
                    bytes(name).lower() == b"connection" and b"close" in bytes(value).lower()
                    for name, value in headers
                ):
                    headers = [h for h in headers if bytes(h[0]).lower() != b"connection"]
                    headers.append((b"connection", b"close"))
                    message = {**message, "headers": headers}
            await send(message)

        return http_send

    def _websocket(self, receive: Receive, send: Send) -> tuple[Receive, Send]:
        session = _Session(send)

        async def ws_send(message: Message) -> None:
            kind = message["type"]
            if session.restarted:
                if kind == "websocket.close":
                    return  # already closed, with 1012
                raise ServiceRestart("the WebSocket session was closed for a server restart")
            await send(message)
            if kind == "websocket.accept":
                session.accepted = True
                self._sessions.add(session)
                if self.draining:
                    await self._restart(session)
            elif kind in ("websocket.close", "websocket.http.response.body"):
                session.closed = True
                self._sessions.discard(session)

        async def ws_receive() -> Message:
            message = await receive()
            if message["type"] == "websocket.disconnect":
                session.closed = True
                self._sessions.discard(session)
                if session.restarted:
                    message = {**message, "code": SERVICE_RESTART}
            return message

        return ws_receive, ws_send

    async def _restart(self, session: _Session) -> None:
        if session.closed or session.restarted:
            return
        session.restarted = True
        self.restarted_sessions += 1
        self._sessions.discard(session)
        with contextlib.suppress(Exception):
            await session.send(
                {"type": "websocket.close", "code": SERVICE_RESTART, "reason": RESTART_REASON}
            )


class DrainingApp:
    """An ASGI 3 application with ``drain``'s signals added to every connection."""

    def __init__(self, inner: App, drain: AsgiDrain) -> None:
        self.inner = inner
        self.drain = drain

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        receive, send = self.drain.wrap(scope, receive, send)
        await self.inner(scope, receive, send)
