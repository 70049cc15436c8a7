"""Everything nodrop needs from uvicorn's internals, in one place.

uvicorn has no public API for serving sockets one accepts oneself, or for a
drain that fails nothing: its ``Server.shutdown`` closes the listening
servers at once, then every keep-alive connection idle at that instant (a
client sending its next request meets a FIN or a reset), and ends a
connection whose response is in flight with no ``Connection: close`` (h11).

:class:`NodropServer` keeps uvicorn's own lifespan, configuration and
protocol classes and changes only that:

* it accepts with :class:`nodrop.adapters.accept.Acceptor` and
  ``loop.connect_accepted_socket`` with uvicorn's protocol (asyncio and
  uvloop alike): once stopped, queued connections stay for the new generation;
* draining, the next response on every HTTP/1.x connection says
  ``Connection: close`` (:class:`nodrop.adapters.asgi.AsgiDrain`), WebSocket
  sessions close with 1012, and an idle keep-alive connection closes only
  at its keep-alive timeout, as in steady state;
* with connection handoff (``nodrop run``'s default), instead, each
  connection is given to the new generation the moment it is idle (between
  requests, nothing unwritten, no complete request buffered; with h11, what
  was read of the next request travels with it) and served there by the
  same protocol classes; one nobody takes is served here, with
  ``Connection: close``;
* once no connection is left, or :data:`DEFAULT_DRAIN_EXTRA` seconds past
  the keep-alive timeout, uvicorn's own shutdown runs (tasks, lifespan).

It relies on these internals (as of :data:`TESTED_VERSIONS`), checked by
:func:`check_internals` and ``tests/test_adapter_uvicorn_internals.py``:

* ``uvicorn.Server``: ``startup(sockets)``, ``shutdown(sockets)``,
  ``lifespan`` (``startup()``, ``should_exit``, ``state``), ``servers``,
  ``server_state`` (``connections``, ``tasks``), ``started``,
  ``should_exit``, ``force_exit``; ``uvicorn.config.STARTUP_FAILURE``;
* ``Config.http_protocol_class``, ``loaded_app``, ``ssl``,
  ``timeout_keep_alive``, ``callback_notify``;
* ``H11Protocol`` and ``HttpToolsProtocol``: ``__init__(config,
  server_state, app_state, _loop)``, ``cycle`` (``response_complete``),
  ``transport``, ``timeout_keep_alive_task``, ``timeout_keep_alive_handler``,
  ``shutdown``, ``on_response_complete`` (called after each response);
  ``H11Protocol.conn`` (an ``h11.Connection``: ``our_state``,
  ``their_state``, ``trailing_data``); ``HttpToolsProtocol.pipeline``,
  ``on_message_begin``, ``on_message_complete`` (httptools' callbacks);
* for the handoff: the transport's ``get_extra_info("socket")``, ``abort()``
  (closes the fd without a shutdown) and ``pause_reading()``.
"""

from __future__ import annotations

import asyncio
import inspect
import os
import socket
import sys
from collections.abc import Callable, MutableMapping, Sequence
from typing import Any

import h11
import uvicorn
from uvicorn.config import STARTUP_FAILURE, Config
from uvicorn.protocols.http.h11_impl import H11Protocol

from nodrop.adapters.accept import Acceptor
from nodrop.adapters.asgi import AsgiDrain, DrainingApp
from nodrop.adapters.pinning import version_problems
from nodrop.connhandoff import MAX_STATE, AsyncHandoff
from nodrop.systemd.notify import stopping

try:  # uvicorn[standard]; plain `pip install uvicorn` has no httptools
    from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
except ImportError:  # pragma: no cover - the test extra installs it
    HttpToolsProtocol = None  # type: ignore[assignment,misc]

TESTED_VERSIONS = {"uvicorn": "0.54.0", "h11": "0.16.0"}
"""The versions this module was written against and tested with."""

DEFAULT_DRAIN_EXTRA = 5.0
"""Seconds the drain waits past the keep-alive timeout for connections to
end (responses still streaming), before uvicorn's own shutdown closes the rest."""

_POLL = 0.05

Scope = MutableMapping[str, Any]


def check_internals() -> list[str]:
    """What this module relies on that the installed uvicorn lacks (empty: all there)."""
    problems = version_problems(TESTED_VERSIONS)
    for method in ("startup", "shutdown"):
        params = list(inspect.signature(getattr(uvicorn.Server, method)).parameters)
        if params != ["self", "sockets"]:
            problems.append(f"uvicorn.Server.{method} takes {params}")
    protocols = [H11Protocol] + ([HttpToolsProtocol] if HttpToolsProtocol is not None else [])
    for cls in protocols:
        params = list(inspect.signature(cls.__init__).parameters)
        if params != ["self", "config", "server_state", "app_state", "_loop"]:
            problems.append(f"{cls.__name__}.__init__ takes {params}")
        problems += [
            f"{cls.__name__}.{name} is missing"
            for name in ("timeout_keep_alive_handler", "shutdown", "on_response_complete")
            if not hasattr(cls, name)
        ]
    if HttpToolsProtocol is not None:
        problems += [
            f"HttpToolsProtocol.{name} is missing"
            for name in ("on_message_begin", "on_message_complete")
            if not hasattr(HttpToolsProtocol, name)
        ]
    if not hasattr(h11.Connection, "trailing_data"):
        problems.append("h11.Connection has no trailing_data")
    server = uvicorn.Server(Config(app=_nothing))
    state = server.server_state
    problems += [
        f"uvicorn ServerState has no {name}"
        for name in ("connections", "tasks")
        if not hasattr(state, name)
    ]
    problems += [
        f"uvicorn.Server has no {name}"
        for name in ("should_exit", "force_exit", "started")
        if not hasattr(server, name)
    ]
    if not isinstance(STARTUP_FAILURE, int):
        problems.append("uvicorn.config.STARTUP_FAILURE is not an int")
    return problems


async def _nothing(scope: Scope, receive: Any, send: Any) -> None:
    """An ASGI app for :func:`check_internals` (never called)."""


# -- the protocols ----------------------------------------------------------------------


class DrainingMixin:
    """What nodrop adds to uvicorn's HTTP protocols (a mixin).

    Args (keyword, before uvicorn's own): ``prefix``, bytes an old
    generation read but did not parse, fed first.
    """

    transport: asyncio.Transport
    cycle: Any
    timeout_keep_alive: int
    timeout_keep_alive_task: asyncio.TimerHandle | None
    loop: asyncio.AbstractEventLoop

    def __init__(
        self, *args: Any, prefix: bytes = b"", adopted: bool = False, **kwargs: Any
    ) -> None:
        super().__init__(*args, **kwargs)
        self._prefix = prefix
        self._adopted = adopted
        self.on_idle: Callable[[DrainingMixin], None] | None = None
        """Called after each response while the server is handing connections over."""

    def on_response_complete(self) -> None:
        super().on_response_complete()  # type: ignore[misc]
        if self.on_idle is not None:
            self.on_idle(self)

    def stop_reading(self) -> None:
        """Leave what the client sends next in the kernel (it moves with the fd)."""
        if not self.transport.is_closing():
            self.transport.pause_reading()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)  # type: ignore[misc]
        if self._prefix:
            prefix, self._prefix = self._prefix, b""
            self.data_received(prefix)
        if self._adopted and self.cycle is None:
            # Kept alive elsewhere before: its keep-alive timeout runs, as it
            # did there (uvicorn arms none before a connection's first request).
            self._arm_keep_alive()

    def _arm_keep_alive(self) -> None:
        if self.timeout_keep_alive_task is None and not self.transport.is_closing():
            self.timeout_keep_alive_task = self.loop.call_later(
                self.timeout_keep_alive, self.timeout_keep_alive_handler
            )

    def data_received(self, data: bytes) -> None:
        super().data_received(data)  # type: ignore[misc]

    def timeout_keep_alive_handler(self) -> None:
        super().timeout_keep_alive_handler()  # type: ignore[misc]

    def between_requests(self) -> bool:
        """No request in progress and no response to finish."""
        return self.cycle is None or bool(self.cycle.response_complete)

    def unparsed(self) -> bytes | None:
        """What was read of the next request and not parsed, or None if unknown."""
        raise NotImplementedError

    def idle_prefix(self) -> bytes | None:
        """The connection can be handed over: between requests, nothing
        unwritten, no complete request buffered; returns what was read of
        the next request (usually b""). None when it cannot move now."""
        transport = self.transport
        if transport is None or transport.is_closing() or not self.between_requests():
            return None
        if transport.get_write_buffer_size() or transport.get_extra_info("ssl_object"):
            return None
        data = self.unparsed()
        # Without a blank line no request can be made of it: the connection
        # waits for more bytes, it is not about to serve a buffered request.
        if data is None or b"\n\n" in data or b"\n\r\n" in data or len(data) > MAX_STATE:
            return None
        return data

    def detach(self) -> socket.socket:
        """Take the socket out of uvicorn without touching the connection: a
        duplicate fd (close-on-exec); the transport is aborted (its fd closed,
        no shutdown), which uvicorn sees as the peer going away while idle."""
        raw = self.transport.get_extra_info("socket")
        sock = socket.socket(fileno=os.dup(raw.fileno()))
        sock.setblocking(False)
        self.transport.abort()
        return sock

    def drain(self) -> None:
        """Draining begins. Nothing is closed here: the next response says
        ``Connection: close`` (the app wrapper does), and a connection idle
        now closes when its keep-alive timeout passes -- a connection that
        never sent a request gets that timer too (steady state would keep
        it open, but the worker is going away)."""
        if self.cycle is None:
            self._arm_keep_alive()


class DrainingH11Protocol(DrainingMixin, H11Protocol):
    """uvicorn's h11 protocol, drained without failing a request."""

    conn: h11.Connection

    def between_requests(self) -> bool:
        return super().between_requests() and self.conn.our_state in (h11.IDLE, h11.DONE)

    def unparsed(self) -> bytes | None:
        conn = self.conn
        if conn.our_state is not h11.IDLE or conn.their_state is not h11.IDLE:
            return None
        data, closed = conn.trailing_data
        return None if closed else bytes(data)


if HttpToolsProtocol is not None:

    class DrainingHttpToolsProtocol(DrainingMixin, HttpToolsProtocol):
        """uvicorn's httptools protocol, drained without failing a request."""

        _in_message = False

        def between_requests(self) -> bool:
            return super().between_requests() and not self.pipeline

        def on_message_begin(self) -> None:
            self._in_message = True
            super().on_message_begin()

        def on_message_complete(self) -> None:
            self._in_message = False
            super().on_message_complete()

        def unparsed(self) -> bytes | None:
            # httptools keeps a partial request inside its parser, out of reach:
            # such a connection is answered here (then closed) instead.
            return None if self._in_message else b""


def draining_protocol_class(cls: type[asyncio.Protocol]) -> type[DrainingMixin] | None:
    """nodrop's version of uvicorn's HTTP protocol class ``cls``, or None
    for one nodrop does not know (zttp, HTTP/2: served as uvicorn would)."""
    if HttpToolsProtocol is not None and issubclass(cls, HttpToolsProtocol):
        return DrainingHttpToolsProtocol
    if issubclass(cls, H11Protocol):
        return DrainingH11Protocol
    return None


# -- the server ---------------------------------------------------------------------------


class NodropServer(uvicorn.Server):
    """``uvicorn.Server`` that accepts with nodrop and drains without failing a request.

    Args:
        config: uvicorn's own.
        on_started: called once the lifespan start-up completed and the
            server accepts (``READY=1``).
        drain_extra: see :data:`DEFAULT_DRAIN_EXTRA`.
        handoff: the connection handoff (``nodrop run``'s default): idle
            connections are then given to the new generation at drain, and
            connections the old generation gives are served here.
        name: what the last log line (the connection counts) starts with.
    """

    def __init__(
        self,
        config: Config,
        *,
        on_started: Callable[[], object] | None = None,
        drain_extra: float = DEFAULT_DRAIN_EXTRA,
        handoff: AsyncHandoff | None = None,
        name: str = "nodrop.adapters.uvicorn",
    ) -> None:
        super().__init__(config)
        self.name = name
        self.on_started = on_started
        self.drain_extra = drain_extra
        self.handoff = handoff
        self.asgi_drain = AsgiDrain()
        self.acceptor: Acceptor | None = None
        self.servers = []
        self.handed_over = 0
        self.returned = 0
        self._to_give: list[tuple[socket.socket, bytes]] = []
        self._adopting: set[int] = set()

    @property
    def can_hand_over(self) -> bool:
        return self.handoff is not None and self.config.ssl is None

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        config = self.config
        if not isinstance(config.loaded_app, DrainingApp):
            config.loaded_app = DrainingApp(config.loaded_app, self.asgi_drain)
        await self.lifespan.startup()
        if self.lifespan.should_exit:
            sys.exit(STARTUP_FAILURE)
        if not sockets:
            raise RuntimeError("NodropServer serves the sockets it is given; none were")
        loop = asyncio.get_running_loop()
        known = draining_protocol_class(config.http_protocol_class)
        if known is None:
            self.handoff = None  # a protocol nodrop cannot take connections out of
        app_state = self.lifespan.state

        async def connect(sock: socket.socket, prefix: bytes) -> None:
            adopted = sock.fileno() in self._adopting
            self._adopting.discard(sock.fileno())

            def factory() -> asyncio.Protocol:
                if known is None:
                    return config.http_protocol_class(  # type: ignore[call-arg]
                        config=config,
                        server_state=self.server_state,
                        app_state=app_state,
                        _loop=loop,
                    )
                return known(  # type: ignore[return-value]
                    config=config,
                    server_state=self.server_state,
                    app_state=app_state,
                    _loop=loop,
                    prefix=prefix,
                    adopted=adopted,
                )

            await loop.connect_accepted_socket(factory, sock, ssl=config.ssl)

        self.servers = []
        self.acceptor = Acceptor(sockets, connect)
        if self.can_hand_over:
            assert self.handoff is not None
            try:
                # Before READY=1: no connection may find this worker unregistered.
                await self.handoff.start_receiving(self.adopt)
            except Exception as exc:
                print(f"connection handoff unavailable: {exc}", file=sys.stderr)
                self.handoff = None
        self.acceptor.start()
        self.started = True
        if self.on_started is not None:
            self.on_started()

    def adopt(self, sock: socket.socket, prefix: bytes = b"") -> None:
        """Serve a connection another generation handed over."""
        assert self.acceptor is not None
        self._adopting.add(sock.fileno())
        self.acceptor.adopt(sock, prefix)

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        try:
            await self._drain()
        finally:
            if self.handoff is not None:
                self.handoff.close()
        # Logged before the lifespan shutdown, not at exit: the supervisor may
        # stop reading a worker's output as soon as it has exited.
        print(f"{self.name}: {self.summary()}", file=sys.stderr, flush=True)
        # Past the deadline (or none left): uvicorn's own shutdown closes what
        # is idle, waits for the tasks, runs the lifespan shutdown. The
        # listening sockets are nodrop's: never closed here.
        await super().shutdown(None)

    async def _drain(self) -> None:
        if self.acceptor is not None:
            self.acceptor.stop()
            await self.acceptor.settle()
        stopping(status="uvicorn draining")
        give = self.can_hand_over and self.handoff is not None
        if self.handoff is not None:
            # Connections already on their way to us are adopted, then given on.
            await self.handoff.stop_receiving()
            if self.acceptor is not None:
                await self.acceptor.settle()
        await self.asgi_drain.start(close_http=not give)
        connections = self.server_state.connections
        if not give:
            self._close_idle_at_timeout()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.config.timeout_keep_alive + self.drain_extra
        notify = self.config.callback_notify
        last_notified = loop.time()
        while not self.force_exit:
            if give:
                give = await self._give_idle()
            # A connection taken out while a batch was being given is in
            # neither: it is not a connection of uvicorn's any more, and not
            # given yet. Ending the drain now would close it with the process.
            if not connections and not self._to_give:
                break
            if loop.time() >= deadline:
                if not give:
                    break
                # Still busy after a keep-alive timeout (a client that always
                # has its next request in flight is never idle to give): close
                # mode, so each ends after its next response (Connection: close).
                give = False
                await self._stop_giving()
                deadline = loop.time() + self.config.timeout_keep_alive + self.drain_extra
            if notify is not None and loop.time() - last_notified >= 1.0:
                # gunicorn's heartbeat: a long drain is not a hung worker.
                last_notified = loop.time()
                await notify()
            await asyncio.sleep(_POLL)

    def _close_idle_at_timeout(self) -> None:
        for conn in list(self.server_state.connections):
            if isinstance(conn, DrainingMixin):
                conn.drain()

    def _turned_idle(self, conn: DrainingMixin) -> None:
        """A response went out while handing over: take the connection now,
        before the client's next request arrives, or (its response still
        being written) stop reading it until the next look."""
        prefix = conn.idle_prefix()
        if prefix is not None:
            self._to_give.append((conn.detach(), prefix))
        elif conn.between_requests() and conn.unparsed() is not None:
            conn.stop_reading()  # its response is still being written

    async def _give_idle(self) -> bool:
        """Give every connection idle now; False once giving stopped (nobody
        took them: they are served here, closed after their next response)."""
        assert self.handoff is not None
        for conn in list(self.server_state.connections):
            if isinstance(conn, DrainingMixin):
                conn.on_idle = self._turned_idle
                prefix = conn.idle_prefix()
                if prefix is not None:
                    self._to_give.append((conn.detach(), prefix))
        batch, self._to_give = self._to_give, []
        if not batch:
            return True
        result = await self.handoff.give([s for s, _ in batch], [p for _, p in batch])
        self.handed_over += result.placed
        if not result.returned:
            return True
        self.returned += len(result.returned)
        await self._stop_giving([batch[index] for index in result.returned])
        return False

    async def _stop_giving(self, back: Sequence[tuple[socket.socket, bytes]] = ()) -> None:
        """Serve every connection here from now on, each closed after its next
        response (the classic drain): those given ``back`` by the broker, and
        those taken out since the last batch (they were never offered)."""
        for conn in list(self.server_state.connections):
            if isinstance(conn, DrainingMixin):
                conn.on_idle = None
        await self.asgi_drain.start(close_http=True)
        assert self.acceptor is not None
        taken, self._to_give = self._to_give, []
        for sock, prefix in [*back, *taken]:
            self.acceptor.adopt(sock, prefix)
        await self.acceptor.settle()
        self._close_idle_at_timeout()

    def summary(self) -> str:
        """What this worker did with connections, for its last log line."""
        acceptor = self.acceptor
        accepted = acceptor.accepted if acceptor else 0
        adopted = acceptor.adopted if acceptor else 0
        return (
            f"connections: accepted {accepted}, adopted {adopted}, "
            f"handed over {self.handed_over}, returned {self.returned}"
        )
