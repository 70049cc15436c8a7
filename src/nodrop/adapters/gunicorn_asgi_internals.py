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
  ``_keepalive_timeout()``, ``connection_lost``;
* ``gunicorn.asgi.lifespan.LifespanManager(app, log, state)`` with
  ``startup()``; ``LifespanStartupFailed``; ``Arbiter.WORKER_BOOT_ERROR``.

Tested with :data:`TESTED_VERSIONS`.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.metadata
import inspect
import os
import signal
import socket
from collections.abc import Callable
from typing import Any

from gunicorn.arbiter import Arbiter
from gunicorn.asgi.lifespan import LifespanManager, LifespanStartupFailed
from gunicorn.asgi.protocol import ASGIProtocol
from gunicorn.workers.gasgi import ASGIWorker

from nodrop.adapters.accept import Acceptor
from nodrop.adapters.asgi import AsgiDrain, DrainingApp

TESTED_VERSIONS = {"gunicorn": "27.0.1"}
"""The versions this module was written against and tested with."""

DRAIN_EXTRA = 5.0
"""Seconds the drain waits past the keep-alive timeout for connections to end."""

_POLL = 0.05


def check_internals() -> list[str]:
    """What this module relies on that the installed gunicorn lacks (empty: all there)."""
    problems = []
    for name, tested in TESTED_VERSIONS.items():
        installed = importlib.metadata.version(name)
        if installed != tested:
            problems.append(
                f"{name} {installed} is installed; this module was tested with {tested}"
            )
    params = list(inspect.signature(ASGIProtocol._will_close).parameters)
    if params != ["self", "request", "response_requires_close"]:
        problems.append(f"ASGIProtocol._will_close takes {params}")
    problems += [
        f"ASGIProtocol.{name} is missing"
        for name in ("_arm_keepalive_timer", "_keepalive_timeout", "connection_lost")
        if not hasattr(ASGIProtocol, name)
    ]
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
    """gunicorn's ``ASGIProtocol``: once draining, every response closes its connection."""

    def __init__(self, worker: Any, drain: Drain) -> None:
        super().__init__(worker)
        self.nodrop_drain = drain
        drain.connections.add(self)

    def _will_close(self, request: Any, response_requires_close: bool) -> bool:
        if self.nodrop_drain.draining:
            return True
        return bool(super()._will_close(request, response_requires_close))

    def connection_lost(self, exc: Exception | None) -> None:
        self.nodrop_drain.connections.discard(self)
        super().connection_lost(exc)

    def drain(self) -> None:
        """Draining begins: an idle connection closes at its keep-alive timeout;
        one that never sent a request gets that timer too."""
        if self._awaiting_request and self._keepalive_handle is None:
            self._arm_keepalive_timer()

    def close_if_idle(self) -> None:
        if self._awaiting_request:
            self._keepalive_timeout()


class Drain:
    """The worker's drain state and its connections."""

    def __init__(self) -> None:
        self.draining = False
        self.asgi = AsgiDrain()
        self.connections: set[DrainingProtocol] = set()


async def _serve(worker: Any, on_started: Callable[[], object]) -> None:
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

    async def connect(sock: socket.socket, prefix: bytes) -> None:
        await loop.connect_accepted_socket(
            lambda: DrainingProtocol(worker, drain), sock, ssl=ssl_context
        )

    acceptor = Acceptor([getattr(s, "sock", s) for s in worker.sockets], connect)
    acceptor.start()
    on_started()
    while worker.alive and not stop.is_set():
        worker.notify()
        if worker.ppid != os.getppid():
            worker.log.info("Parent changed, shutting down: %s", worker)
            break
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), 1.0)
    acceptor.stop()
    await acceptor.settle()
    if worker.alive:  # SIGTERM, not SIGINT/SIGQUIT (quick shutdown)
        drain.draining = True
        await drain.asgi.start(close_http=False)
        for conn in list(drain.connections):
            conn.drain()
        deadline = loop.time() + float(worker.cfg.keepalive) + DRAIN_EXTRA
        last_notified = loop.time()
        while drain.connections and worker.alive and loop.time() < deadline:
            if loop.time() - last_notified >= 1.0:
                last_notified = loop.time()
                worker.notify()
            await asyncio.sleep(_POLL)
    worker.alive = False
    for conn in list(drain.connections):
        conn.close_if_idle()
    worker.log.info(
        "nodrop: connections: accepted %d, adopted %d", acceptor.accepted, acceptor.adopted
    )
    await worker._shutdown()


def run(worker: Any, on_started: Callable[[], object]) -> None:
    """The worker's ``run``: serve, drain on SIGTERM, shut down."""
    try:
        worker.loop.run_until_complete(_serve(worker, on_started))
    except Exception as exc:
        worker.log.exception("Worker exception: %s", exc)
    finally:
        worker._cleanup()
