"""Everything nodrop needs from the internals of gunicorn's own ASGI worker (``-k asgi``).

gunicorn 27's ``ASGIWorker`` drains almost right: once ``worker.alive`` is
False a response says ``Connection: close``. But SIGTERM sets ``alive`` to
False at once, so a response already under way ends its connection after
it *without* that header (the client's next request meets a closed
connection); the worker closes its ``asyncio`` servers, which on Python 3.11
resets connections accepted a moment before; and gunicorn's
``post_worker_init`` hook runs before the lifespan start-up, so it cannot
say when the worker is ready.

:func:`run` replaces the worker's ``run`` (nodrop's gunicorn config module
does it in ``post_worker_init``; no file of gunicorn is changed): it runs the
worker's own lifespan and ``ASGIProtocol`` under nodrop's accept loop
(:class:`nodrop.adapters.accept.Acceptor`), reports readiness after the
lifespan start-up, and on SIGTERM drains: nothing more is taken from the
kernel's queue, the next response on every connection says ``Connection:
close`` and closes it, idle connections close when their keep-alive timeout
passes (as in steady state), WebSocket sessions close with 1012; then the
worker's own shutdown (lifespan) runs.

It relies on these internals, checked by :func:`check_internals`
(``tests/test_adapter_gunicorn_asgi_internals.py``):

* ``ASGIWorker``: ``loop``, ``asgi``, ``state``, ``alive``, ``sockets``
  (``.sock``), ``cfg``, ``log``, ``notify()``, ``ppid``, ``nr_conns``,
  ``_get_ssl_context()``, ``_shutdown()``, ``_cleanup()``,
  ``handle_quit_signal``, ``init_signals``;
* ``ASGIProtocol(worker)``: ``_will_close(request, response_requires_close)``,
  ``_awaiting_request``, ``_keepalive_handle``, ``_arm_keepalive_timer()``,
  ``_keepalive_timeout()``, ``connection_lost``, ``data_received``,
  ``_on_message_complete`` (bound into the parser's callbacks),
  ``_callback_parser`` (a ``PythonProtocol`` whose ``_buffer`` holds what
  follows a complete request), ``_closed``, ``_request_ready``,
  ``_finishing_calls``, ``_websocket``, ``req_count`` (the keep-alive timer is
  armed from the second request on);
* ``gunicorn.asgi.lifespan.LifespanManager(app, log, state)`` with
  ``startup()``; ``LifespanStartupFailed``; ``Arbiter.WORKER_BOOT_ERROR``.

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
from collections.abc import Callable, Sequence
from typing import Any

from gunicorn.arbiter import Arbiter
from gunicorn.asgi.lifespan import LifespanManager, LifespanStartupFailed
from gunicorn.asgi.parser import PythonProtocol
from gunicorn.asgi.protocol import ASGIProtocol
from gunicorn.workers.gasgi import ASGIWorker

from nodrop.adapters.accept import Acceptor
from nodrop.adapters.asgi import AsgiDrain, DrainingApp
from nodrop.adapters.pinning import version_problems
from nodrop.connhandoff import AsyncHandoff

TESTED_VERSIONS = {"gunicorn": "27.0.1"}
"""The versions this module was written against and tested with."""

DRAIN_EXTRA = 5.0
"""Seconds the drain waits past the keep-alive timeout for connections to end."""

_POLL = 0.05


def check_internals() -> list[str]:
    """What this module relies on that the installed gunicorn lacks (empty: all there)."""
    problems = version_problems(TESTED_VERSIONS)
    params = list(inspect.signature(ASGIProtocol._will_close).parameters)
    if params != ["self", "request", "response_requires_close"]:
        problems.append(f"ASGIProtocol._will_close takes {params}")
    problems += [
        f"ASGIProtocol.{name} is missing"
        for name in (
            "_arm_keepalive_timer",
            "_keepalive_timeout",
            "connection_lost",
            "_on_message_complete",
            "_setup_callback_parser",
        )
        if not hasattr(ASGIProtocol, name)
    ]
    source = inspect.getsource(ASGIProtocol._setup_callback_parser)
    if "self._on_message_complete" not in source:
        problems.append("the parser no longer calls ASGIProtocol._on_message_complete")
    init = inspect.getsource(ASGIProtocol.__init__)
    problems += [
        f"ASGIProtocol.__init__ no longer sets {name}"
        for name in (
            "_awaiting_request",
            "_finishing_calls",
            "_websocket",
            "_keepalive_handle",
            "_request_ready",
            "_closed",
            "req_count",
        )
        if f"self.{name} =" not in init
    ]
    if not hasattr(PythonProtocol, "is_complete"):
        problems.append("gunicorn.asgi.parser.PythonProtocol has no is_complete")
    problems += [
        f"ASGIWorker.{name} is missing"
        for name in ("_get_ssl_context", "_shutdown", "_cleanup", "handle_quit_signal", "notify")
        if not hasattr(ASGIWorker, name)
    ]
    if list(inspect.signature(LifespanManager.__init__).parameters) != [
        "self",
        "app",
        "logger",
        "state",
    ]:
        problems.append("gunicorn.asgi.lifespan.LifespanManager takes other arguments")
    return problems


class DrainingProtocol(ASGIProtocol):  # type: ignore[misc]
    """gunicorn's ``ASGIProtocol``: once draining, every response closes its
    connection; an idle connection can be taken out (the handoff)."""

    def __init__(self, worker: Any, drain: Drain, *, adopted: bool = False) -> None:
        super().__init__(worker)
        self.nodrop_drain = drain
        # Bytes received since the last complete request, and whether that
        # count is known (a chunk that completed a request may carry the start
        # of the next one, which the parser holds out of reach).
        self._nodrop_unparsed = 0
        self._nodrop_unknown = False
        self._nodrop_completed = 0
        if adopted:
            # Served before, elsewhere: the keep-alive timer runs from the start.
            self.req_count = 1
        drain.connections.add(self)

    def _will_close(self, request: Any, response_requires_close: bool) -> bool:
        if self.nodrop_drain.close_http:
            return True
        return bool(super()._will_close(request, response_requires_close))

    def data_received(self, data: bytes) -> None:
        completed = self._nodrop_completed
        super().data_received(data)
        if self._nodrop_completed != completed:
            self._nodrop_unknown = self._nodrop_unknown or self._parser_holds_more()
        else:
            self._nodrop_unparsed += len(data)

    def _parser_holds_more(self) -> bool:
        """After a complete request: whether the parser holds bytes of the next."""
        parser = self._callback_parser
        if type(parser) is not PythonProtocol:
            return True  # gunicorn_h1c's C parser: cannot tell, so assume it does
        return bool(getattr(parser, "_buffer", None))

    def _on_message_complete(self) -> None:
        self._nodrop_completed += 1
        self._nodrop_unparsed = 0
        self._nodrop_unknown = False
        super()._on_message_complete()

    def connection_lost(self, exc: Exception | None) -> None:
        self.nodrop_drain.connections.discard(self)
        super().connection_lost(exc)

    def drain(self) -> None:
        """Draining begins: an idle connection closes at its keep-alive timeout;
        one that never sent a request gets that timer too."""
        if self._awaiting_request and self._keepalive_handle is None:
            self._arm_keepalive_timer()

    def _arm_keepalive_timer(self) -> None:
        # Called as the connection starts waiting for its next request.
        super()._arm_keepalive_timer()
        if self.nodrop_drain.giving:
            # Looked at once the connection's task is waiting (the next step).
            self.worker.loop.call_soon(self.nodrop_drain.turned_idle, self)

    def close_if_idle(self) -> None:
        if self._awaiting_request:
            self._keepalive_timeout()

    def idle(self) -> bool:
        """Between requests, nothing read of the next one, nothing unwritten:
        the connection can be handed over."""
        transport = self.transport
        return bool(
            self._awaiting_request
            and not self._request_ready.is_set()
            and not self._closed
            and not self._finishing_calls
            and self._websocket is None
            and self._callback_parser is not None
            and self._nodrop_unparsed == 0
            and not self._nodrop_unknown
            and transport is not None
            and not transport.is_closing()
            and not transport.get_write_buffer_size()
            and transport.get_extra_info("ssl_object") is None
        )

    def detach(self) -> socket.socket:
        """Take the socket out without touching the connection: a duplicate fd;
        the transport is aborted (fd closed, no shutdown) and the connection's
        task, waiting for a request, wakes up to find it closed."""
        raw = self.transport.get_extra_info("socket")
        sock = socket.socket(fileno=os.dup(raw.fileno()))
        sock.setblocking(False)
        self.transport.abort()
        self._closed = True
        self._request_ready.set()
        return sock


class Drain:
    """The worker's drain state and its connections."""

    def __init__(self) -> None:
        self.close_http = False
        self.asgi = AsgiDrain()
        self.connections: set[DrainingProtocol] = set()
        self.handed_over = 0
        self.returned = 0
        self.giving = False
        self.to_give: list[socket.socket] = []

    def turned_idle(self, conn: DrainingProtocol) -> None:
        """A connection started waiting for its next request while handing over:
        take it now, before that request arrives; or, its response still being
        written, leave what the client sends next in the kernel until the next look."""
        if not self.giving or conn not in self.connections:
            return
        if conn.idle():
            self.to_give.append(conn.detach())
        elif (
            conn._awaiting_request
            and conn.transport is not None
            and not conn.transport.is_closing()
            and conn._nodrop_unparsed == 0
        ):
            conn.transport.pause_reading()


async def _serve(
    worker: Any, on_started: Callable[[], object], handoff: AsyncHandoff | None
) -> None:
    loop: asyncio.AbstractEventLoop = worker.loop
    drain = Drain()
    worker.asgi = DrainingApp(worker.asgi, drain.asgi)
    stop = asyncio.Event()
    # SIGTERM starts the drain with the worker still `alive`: gunicorn ends a
    # connection after its response once `alive` is False, header or not.
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    lifespan_mode = getattr(worker.cfg, "asgi_lifespan", "auto")
    if lifespan_mode != "off":
        worker.lifespan = LifespanManager(worker.asgi, worker.log, worker.state)
        try:
            await worker.lifespan.startup()
        except Exception as exc:
            if lifespan_mode == "on" or isinstance(exc, LifespanStartupFailed):
                worker.log.error("ASGI lifespan startup failed: %s", exc)
                worker.lifespan = None
                raise SystemExit(Arbiter.WORKER_BOOT_ERROR) from exc
            worker.log.debug("ASGI lifespan not supported by app: %s", exc)
            worker.lifespan = None
    ssl_context = worker._get_ssl_context()
    if ssl_context is not None:
        handoff = None
    adopting: set[int] = set()

    async def connect(sock: socket.socket, prefix: bytes) -> None:
        adopted = sock.fileno() in adopting
        adopting.discard(sock.fileno())
        await loop.connect_accepted_socket(
            lambda: DrainingProtocol(worker, drain, adopted=adopted), sock, ssl=ssl_context
        )

    acceptor = Acceptor([getattr(s, "sock", s) for s in worker.sockets], connect)

    def adopt(sock: socket.socket, prefix: bytes) -> None:
        if prefix:  # never given by this module; another giver's partial request
            sock.close()
            return
        adopting.add(sock.fileno())
        acceptor.adopt(sock, prefix)

    if handoff is not None:
        try:
            await handoff.start_receiving(adopt)
        except Exception as exc:
            print(f"connection handoff unavailable: {exc}", file=sys.stderr)
            handoff = None
    acceptor.start()
    on_started()
    try:
        while worker.alive and not stop.is_set():
            worker.notify()
            if worker.ppid != os.getppid():
                worker.log.info("Parent changed, shutting down: %s", worker)
                break
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), 1.0)
        acceptor.stop()
        await acceptor.settle()
        if handoff is not None:
            await handoff.stop_receiving()
            await acceptor.settle()
        if worker.alive:  # SIGTERM, not SIGINT/SIGQUIT (quick shutdown)
            await _drain(worker, drain, acceptor, handoff)
    finally:
        if handoff is not None:
            handoff.close()
    worker.alive = False
    for conn in list(drain.connections):
        conn.close_if_idle()
    print(
        f"nodrop gunicorn worker: connections: accepted {acceptor.accepted}, "
        f"adopted {acceptor.adopted}, handed over {drain.handed_over}, "
        f"returned {drain.returned}",
        file=sys.stderr,
        flush=True,
    )
    await worker._shutdown()


async def _drain(
    worker: Any, drain: Drain, acceptor: Acceptor, handoff: AsyncHandoff | None
) -> None:
    loop = asyncio.get_running_loop()
    give = handoff is not None
    drain.close_http = not give
    drain.giving = give
    await drain.asgi.start(close_http=False)
    if not give:
        for conn in list(drain.connections):
            conn.drain()
    deadline = loop.time() + float(worker.cfg.keepalive) + DRAIN_EXTRA
    last_notified = loop.time()
    while worker.alive:
        if give:
            assert handoff is not None
            batch, drain.to_give = drain.to_give, []
            batch += [conn.detach() for conn in list(drain.connections) if conn.idle()]
            if batch:
                result = await handoff.give(batch)
                drain.handed_over += result.placed
                if result.returned:
                    # Nobody can take them: served here, closed after their next response.
                    drain.returned += len(result.returned)
                    give = False
                    await _stop_giving(drain, acceptor, [batch[i] for i in result.returned])
        # A connection taken out while a batch was being given is in neither
        # set: ending the drain now would close it with the process.
        if not drain.connections and not drain.to_give:
            break
        if loop.time() >= deadline:
            if not give:
                break
            # Still busy after a keep-alive timeout (a client that always has
            # its next request in flight is never idle to give): close mode,
            # so each ends after its next response, with Connection: close.
            give = False
            await _stop_giving(drain, acceptor)
            deadline = loop.time() + float(worker.cfg.keepalive) + DRAIN_EXTRA
        if loop.time() - last_notified >= 1.0:
            last_notified = loop.time()
            worker.notify()
        await asyncio.sleep(_POLL)


async def _stop_giving(
    drain: Drain, acceptor: Acceptor, back: Sequence[socket.socket] = ()
) -> None:
    """Serve every connection here from now on, each closed after its next
    response: those the broker gave ``back``, and those taken out since the
    last batch (never offered)."""
    drain.giving = False
    drain.close_http = True
    taken, drain.to_give = drain.to_give, []
    for sock in [*back, *taken]:
        acceptor.adopt(sock)
    await acceptor.settle()
    for conn in list(drain.connections):
        conn.drain()


def run(worker: Any, on_started: Callable[[], object]) -> None:
    """The worker's ``run``: serve, drain on SIGTERM (or hand idle connections
    over: ``nodrop run``'s connection handoff), shut down."""
    try:
        worker.loop.run_until_complete(_serve(worker, on_started, AsyncHandoff.from_environ()))
    except Exception as exc:
        worker.log.exception("Worker exception: %s", exc)
    finally:
        worker._cleanup()
