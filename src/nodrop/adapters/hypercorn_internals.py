"""Everything :mod:`nodrop.adapters.hypercorn` needs from hypercorn's internals.

hypercorn has no public API for serving sockets one accepts oneself, for
draining without closing idle keep-alive connections, or for taking an idle
connection out of the server; its asyncio worker (``worker_serve``) does
the opposite at shutdown: it closes its servers, then every connection with
no request in progress, at once (``WorkerContext.terminated`` wakes each
connection's idle timer), and after an in-flight response it ends the
connection without ``Connection: close``. So this module runs hypercorn's
own building blocks -- ``Lifespan``, ``WorkerContext``, ``TCPServer`` (one
per connection, with the server's ``H11Protocol``/``H2Protocol``) -- under
nodrop's accept loop, and relies on these internals, checked by
:func:`check_internals` (and by ``tests/test_adapter_hypercorn_internals.py``,
which fails when a hypercorn upgrade changes them):

* ``hypercorn.asyncio.tcp_server.TCPServer(app, loop, config, context,
  state, reader, writer)``, awaitable; its ``protocol_send(event)``
  (overridden to learn when a connection turns idle), its attributes
  ``reader``, ``writer`` and ``protocol`` (a ``ProtocolWrapper`` whose
  ``protocol`` is the ``H11Protocol`` or ``H2Protocol``);
* ``H11Protocol.connection`` (an ``h11.Connection`` between requests, an
  ``H11WSConnection`` after a WebSocket upgrade) and ``H11Protocol.stream``
  (None between requests);
* ``H2Protocol.connection`` (an ``h2`` connection: ``close_connection()``
  sends GOAWAY) and ``H2Protocol.send``;
* ``hypercorn.events.Updated(idle=True)``, sent when a connection turns idle;
* ``Lifespan(app, config, loop, state)`` with ``handle_lifespan()``,
  ``wait_for_startup()``, ``wait_for_shutdown()``;
* ``WorkerContext(max_requests)`` with ``terminate`` and ``terminated``.

Tested with :data:`TESTED_VERSIONS`.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import os
import signal
import socket
import sys
from collections.abc import Awaitable, Callable
from random import randint
from typing import Any

import h11
from hypercorn.asyncio.lifespan import Lifespan
from hypercorn.asyncio.statsd import StatsdLogger
from hypercorn.asyncio.tcp_server import TCPServer
from hypercorn.asyncio.worker_context import WorkerContext
from hypercorn.config import Config
from hypercorn.events import Event, RawData, Updated
from hypercorn.protocol.h2 import H2Protocol
from hypercorn.protocol.h11 import H11Protocol
from hypercorn.typing import AppWrapper

from nodrop.adapters.accept import Acceptor
from nodrop.adapters.asgi import AsgiDrain
from nodrop.adapters.pinning import version_problems
from nodrop.connhandoff import MAX_STATE, AsyncHandoff
from nodrop.systemd.notify import ready, stopping

TESTED_VERSIONS = {"hypercorn": "0.18.0", "h11": "0.16.0"}
"""The versions this module was written against and tested with."""

STREAM_LIMIT = 2**16
"""The ``StreamReader`` limit ``asyncio.start_server`` gives hypercorn."""
RESCAN = 0.05
"""While handing over: how often to look for connections that turned idle
without telling (no response went out on them)."""
EXTRA_DRAIN = 1.0
"""After the drain timeout: how long idle connections get to close, then the
rest is cancelled."""


def check_internals() -> list[str]:
    """What this module relies on that the installed hypercorn lacks (empty: all there)."""
    problems = version_problems(TESTED_VERSIONS)
    init = list(inspect.signature(TCPServer.__init__).parameters)
    if init != ["self", "app", "loop", "config", "context", "state", "reader", "writer"]:
        problems.append(f"TCPServer.__init__ takes {init}")
    if not inspect.iscoroutinefunction(TCPServer.protocol_send):
        problems.append("TCPServer.protocol_send is not a coroutine function")
    for cls, names in (
        (Lifespan, ("handle_lifespan", "wait_for_startup", "wait_for_shutdown")),
        (H11Protocol, ("handle", "stream_send")),
    ):
        problems += [f"{cls.__name__}.{n} is missing" for n in names if not hasattr(cls, n)]
    context = WorkerContext(None)
    problems += [
        f"WorkerContext has no {n}" for n in ("terminate", "terminated") if not hasattr(context, n)
    ]
    if "idle" not in inspect.signature(Updated).parameters:
        problems.append("hypercorn.events.Updated has no idle field")
    return problems


# -- one connection -------------------------------------------------------------


class Connection(TCPServer):
    """hypercorn's per-connection server, telling :class:`Connections` when idle."""

    def __init__(self, owner: Connections, *args: Any) -> None:
        super().__init__(*args)
        self.owner = owner

    async def protocol_send(self, event: Event) -> None:
        await super().protocol_send(event)
        if isinstance(event, Updated) and event.idle:
            self.owner.turned_idle(self)

    def idle_prefix(self) -> bytes | None:
        """What was read of the next request if the connection is idle HTTP/1.1
        (between requests, nothing to write, no complete request buffered), or
        None when it is not idle or cannot be handed over."""
        wrapper = getattr(self, "protocol", None)  # set once run() has started
        proto = getattr(wrapper, "protocol", None)
        if not isinstance(proto, H11Protocol) or proto.stream is not None:
            return None
        conn = proto.connection
        if not isinstance(conn, h11.Connection):  # a WebSocket
            return None
        if conn.our_state is not h11.IDLE or conn.their_state is not h11.IDLE:
            return None
        data, closed = conn.trailing_data
        # Without a blank line h11 cannot make a request of it: the connection
        # is waiting for more bytes, not about to serve a buffered request.
        if closed or b"\n\n" in data or b"\n\r\n" in data or len(data) > MAX_STATE:
            return None
        transport = self.writer.transport
        if (
            transport.is_closing()
            or transport.get_write_buffer_size()
            or len(self.reader._buffer)  # type: ignore[attr-defined]
            or transport.get_extra_info("ssl_object") is not None
        ):
            return None
        return bytes(data)

    def detach(self) -> socket.socket:
        """Take the socket out of hypercorn without touching the connection:
        a duplicate fd; the transport is aborted (its fd closed, no shutdown),
        and hypercorn's connection task ends as if the peer had gone."""
        transport = self.writer.transport
        raw = transport.get_extra_info("socket")
        sock = socket.socket(fileno=os.dup(raw.fileno()))  # os.dup: close-on-exec
        sock.setblocking(False)
        transport.abort()
        self.end_if_gone()
        return sock

    def end_if_gone(self) -> None:
        """End the connection's task if its peer (or the handoff) took it away.

        When the client closes an idle connection, hypercorn's connection task
        lingers until the keep-alive timer fires (``TCPServer.run`` leaves its
        task group only once the idle task ends); a drain would wait for it.
        Gone: an EOF read, a reset (the reader then holds the error, and never
        reaches EOF), or a transport already closing.
        """
        wrapper = getattr(self, "protocol", None)
        proto = getattr(wrapper, "protocol", None)
        gone = (
            self.reader.at_eof()
            or self.reader.exception() is not None
            or self.writer.transport.is_closing()
        )
        if gone and getattr(proto, "stream", None) is None:
            task = asyncio.ensure_future(self.idle_task.stop())
            self.owner.background.add(task)
            task.add_done_callback(self.owner.background.discard)

    async def goaway(self) -> None:
        """HTTP/2: send GOAWAY, so the client opens new streams elsewhere."""
        proto = getattr(getattr(self, "protocol", None), "protocol", None)
        if isinstance(proto, H2Protocol):
            proto.connection.close_connection()
            await proto.send(RawData(data=proto.connection.data_to_send()))


class Connections:
    """The worker's connections, and the idle ones it is handing over."""

    def __init__(self) -> None:
        self.live: set[Connection] = set()
        self.background: set[asyncio.Future[None]] = set()
        self.tasks: set[asyncio.Task[Any]] = set()
        self.changed = asyncio.Event()
        self.give_idle = False
        self.to_give: list[tuple[socket.socket, bytes]] = []

    def turned_idle(self, conn: Connection) -> None:
        if self.give_idle:
            self.try_detach(conn)

    def try_detach(self, conn: Connection) -> bool:
        prefix = conn.idle_prefix()
        if prefix is None:
            return False
        self.to_give.append((conn.detach(), prefix))
        self.changed.set()
        return True


# -- the worker -----------------------------------------------------------------


class DrainingApp:
    """hypercorn's app wrapper, with :class:`AsgiDrain`'s signals added."""

    def __init__(self, inner: AppWrapper, drain: AsgiDrain) -> None:
        self.inner = inner
        self.drain = drain

    async def __call__(
        self,
        scope: Any,
        receive: Callable[..., Awaitable[Any]],
        send: Callable[..., Awaitable[None]],
        sync_spawn: Callable[..., Any],
        call_soon: Callable[..., Any],
    ) -> None:
        receive, send = self.drain.wrap(scope, receive, send)
        await self.inner(scope, receive, send, sync_spawn, call_soon)  # type: ignore[arg-type]


class StartupFailed(Exception):
    """The application's lifespan start-up failed or timed out."""


class Worker:
    """One hypercorn worker on inherited sockets (see :mod:`nodrop.adapters.hypercorn`)."""

    def __init__(
        self,
        app: AppWrapper,
        config: Config,
        listeners: list[socket.socket],
        *,
        drain_timeout: float | None = None,
        handoff: AsyncHandoff | None = None,
    ) -> None:
        self.drain = AsgiDrain()
        self.app = DrainingApp(app, self.drain)
        self.config = config
        self.listeners = listeners
        self.drain_timeout = (
            drain_timeout
            if drain_timeout is not None
            else config.keep_alive_timeout + config.graceful_timeout
        )
        self.handoff = handoff
        self.connections = Connections()
        self.ssl = config.create_ssl_context() if config.ssl_enabled else None
        self.acceptor = Acceptor(listeners, self._connect)
        self.handed_over = 0
        self.returned = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._context: WorkerContext | None = None
        self._state: dict[str, Any] = {}

    def summary(self) -> str:
        """What this worker did with connections, for its last log line."""
        return (
            f"connections: accepted {self.acceptor.accepted}, adopted {self.acceptor.adopted}, "
            f"handed over {self.handed_over}, returned {self.returned}"
        )

    @property
    def can_hand_over(self) -> bool:
        # With a read timeout, Python 3.11's wait_for reads in a task of its
        # own, where read bytes can be in neither the reader nor h11.
        return (
            self.handoff is not None
            and self.ssl is None
            and (self.config.read_timeout is None or sys.version_info >= (3, 12))
        )

    async def _connect(self, sock: socket.socket, prefix: bytes) -> None:
        loop = asyncio.get_running_loop()

        def factory() -> asyncio.StreamReaderProtocol:
            reader = asyncio.StreamReader(limit=STREAM_LIMIT, loop=loop)
            if prefix:
                reader.feed_data(prefix)  # before anything from the socket
            return asyncio.StreamReaderProtocol(reader, self._serve, loop=loop)

        kwargs: dict[str, Any] = {}
        if self.ssl is not None:
            kwargs = {"ssl": self.ssl, "ssl_handshake_timeout": self.config.ssl_handshake_timeout}
        await loop.connect_accepted_socket(factory, sock, **kwargs)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        assert self._loop is not None and self._context is not None
        task = asyncio.current_task()
        conns = self.connections
        if task is not None:
            conns.tasks.add(task)
        conn = Connection(
            conns, self.app, self._loop, self.config, self._context, self._state, reader, writer
        )
        conns.live.add(conn)
        try:
            await conn
        finally:
            conns.live.discard(conn)
            if task is not None:
                conns.tasks.discard(task)
            conns.changed.set()

    async def run(self) -> None:
        """Start up, serve until SIGTERM/SIGINT, drain, shut down.

        Raises:
            StartupFailed: the lifespan start-up failed (nothing was served).
        """
        loop = self._loop = asyncio.get_running_loop()
        stop = asyncio.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        self.config.set_statsd_logger_class(StatsdLogger)
        lifespan = Lifespan(self.app, self.config, loop, self._state)
        lifespan_task = loop.create_task(lifespan.handle_lifespan())
        try:
            await lifespan.wait_for_startup()
        except Exception as exc:
            raise StartupFailed(str(exc)) from exc
        failure = lifespan_task.exception() if lifespan_task.done() else None
        if failure is not None:
            raise StartupFailed(str(failure)) from failure
        max_requests = None
        if self.config.max_requests is not None:
            max_requests = self.config.max_requests + randint(0, self.config.max_requests_jitter)
        self._context = WorkerContext(max_requests)
        try:
            if self.can_hand_over:
                assert self.handoff is not None
                try:
                    await self.handoff.start_receiving(self.acceptor.adopt)
                except Exception as exc:
                    print(f"connection handoff unavailable: {exc}", file=sys.stderr)
                    self.handoff = None
            self.acceptor.start()
            ready(status="hypercorn serving")
            terminate = asyncio.ensure_future(self._context.terminate.wait())
            stopped = asyncio.ensure_future(stop.wait())
            await asyncio.wait({terminate, stopped}, return_when=asyncio.FIRST_COMPLETED)
            terminate.cancel()
            stopped.cancel()
            await self._drain()
            # Logged before the lifespan shutdown, not at exit: the supervisor
            # may stop reading a worker's output as soon as it has exited.
            print(f"nodrop.adapters.hypercorn: {self.summary()}", file=sys.stderr, flush=True)
        finally:
            if self.handoff is not None:
                self.handoff.close()
            await lifespan.wait_for_shutdown()
            lifespan_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await lifespan_task

    async def _drain(self) -> None:
        assert self._context is not None
        loop = asyncio.get_running_loop()
        self.acceptor.stop()
        await self.acceptor.settle()
        stopping(status="hypercorn draining")
        give = self.can_hand_over and self.handoff is not None
        if self.handoff is not None:
            # Connections already on their way to us are adopted, then given on.
            await self.handoff.stop_receiving()
        await self.drain.start(close_http=not give)
        conns = self.connections
        for conn in list(conns.live):
            await conn.goaway()
        if give:
            conns.give_idle = True
            for conn in list(conns.live):
                conns.try_detach(conn)
        deadline = loop.time() + self.drain_timeout
        while conns.live or conns.to_give:
            if conns.to_give:
                await self._give()
                continue
            remaining = deadline - loop.time()
            if remaining <= 0:
                break
            conns.changed.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(conns.changed.wait(), min(remaining, RESCAN))
            if conns.give_idle:
                # Connections that turned idle without a response (adopted
                # ones handed on, fresh ones whose request never came).
                for conn in list(conns.live):
                    conns.try_detach(conn)
            for conn in list(conns.live):
                conn.end_if_gone()
        # Past the deadline: idle connections close now (as hypercorn's own
        # shutdown does), requests still running get a moment, then are cancelled.
        await self._context.terminated.set()
        if conns.tasks:
            _, pending = await asyncio.wait(set(conns.tasks), timeout=EXTRA_DRAIN)
            for task in pending:
                task.cancel()
            if pending:
                await asyncio.wait(pending, timeout=EXTRA_DRAIN)

    async def _give(self) -> None:
        assert self.handoff is not None
        batch, self.connections.to_give = self.connections.to_give, []
        result = await self.handoff.give([s for s, _ in batch], [p for _, p in batch])
        self.handed_over += result.placed
        if result.returned:
            # Nobody can take them: serve them here, and end every connection
            # after its next response from now on (the classic drain).
            self.returned += len(result.returned)
            self.connections.give_idle = False
            await self.drain.start(close_http=True)
            for index in result.returned:
                sock, prefix = batch[index]
                self.acceptor.adopt(sock, prefix)
            await self.acceptor.settle()
