"""aiohttp under ``nodrop run``: readiness after start-up, reloads that fail nothing.

From the command line, with an app factory (or an ``Application``)::

    nodrop run --listen tcp://0.0.0.0:8000 -- python -m nodrop.adapters.aiohttp myapp:create_app

or from your own ``__main__``::

    from nodrop.adapters.aiohttp import run_app
    run_app(create_app())

``web.run_app(app, sock=...)`` works under ``nodrop run`` too, but a reload
through it fails requests that steady state would not: at shutdown aiohttp
closes every idle keep-alive connection at once (a client sending its next
request at that instant meets a closed connection), and it never tells a
WebSocket client why its session ends. This adapter:

* says ``READY=1`` only once ``on_startup`` (and ``cleanup_ctx``) completed;
  a start-up that raises, or an app that cannot be imported, exits 1 with
  the reason as the last line on stderr (``nodrop reload`` shows it and
  rolls back);
* accepts with :class:`nodrop.adapters.accept.Acceptor` (on the asyncio or
  the uvloop event loop), so stopping loses no connection;
* on SIGTERM or SIGINT stops accepting; every response started from then on
  says ``Connection: close`` (``on_response_prepare``); idle keep-alive
  connections are left to their next request or to their keep-alive
  timeout, as in steady state; WebSocket sessions are closed with 1012
  (Service Restart); then ``runner.cleanup()`` runs ``on_shutdown`` and
  ``on_cleanup``;
* under ``nodrop run`` (connection handoff, unless ``--no-handoff``) hands
  idle keep-alive connections to the new generation instead (:mod:`nodrop.adapters.aiohttp_internals`).

The drain waits at most ``drain_timeout`` seconds (default: the keep-alive
timeout plus 5 s, at most 25 s; aiohttp's own keep-alive timeout is 3630 s,
so pass ``keepalive_timeout=`` shorter than the drain, or keep connection
handoff on (``nodrop run``'s default), for idle connections never to be closed early).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib
import inspect
import signal
import socket
import sys
import weakref
from collections.abc import Callable, Sequence
from typing import Any

from aiohttp import web
from aiohttp.web_protocol import RequestHandler

from nodrop.adapters.accept import Acceptor
from nodrop.adapters.aiohttp_internals import Tracked
from nodrop.connhandoff import AsyncHandoff
from nodrop.errors import ActivationError
from nodrop.systemd.activation import listen_fds
from nodrop.systemd.notify import ready, stopping

PROG = "nodrop.adapters.aiohttp"
MAX_DRAIN_TIMEOUT = 25.0
"""Default cap on the drain (``nodrop run``'s own drain timeout is 30 s)."""
POLL = 0.02
"""How often the drain looks at the connections (aiohttp has no callback)."""
SERVICE_RESTART = 1012


class StartupFailed(Exception):
    """The application's start-up (``on_startup``, ``cleanup_ctx``) raised."""


def _default_keepalive_timeout() -> float:
    default = inspect.signature(RequestHandler.__init__).parameters["keepalive_timeout"].default
    return float(default)


class Worker:
    """One aiohttp worker on inherited sockets.

    Args:
        app: the application (not started yet).
        listeners: listening sockets (``nodrop.listen_fds()``).
        drain_timeout: longest drain, in seconds (see the module's doc).
        handoff: the connection handoff, or None.
        ssl_context: serve TLS on every listener.
        runner_kwargs: for ``web.AppRunner`` (``keepalive_timeout``,
            ``access_log``, ...).
    """

    def __init__(
        self,
        app: web.Application,
        listeners: Sequence[socket.socket],
        *,
        drain_timeout: float | None = None,
        handoff: AsyncHandoff | None = None,
        ssl_context: Any = None,
        **runner_kwargs: Any,
    ) -> None:
        self.app = app
        self.listeners = list(listeners)
        keepalive = float(runner_kwargs.get("keepalive_timeout", _default_keepalive_timeout()))
        self.drain_timeout = (
            drain_timeout if drain_timeout is not None else min(keepalive + 5, MAX_DRAIN_TIMEOUT)
        )
        self.handoff = handoff
        self.ssl_context = ssl_context
        self.runner = web.AppRunner(app, handle_signals=False, **runner_kwargs)
        self.acceptor = Acceptor(self.listeners, self._connect)
        self.draining = False
        self.draining_to_give = False
        self.close_http = False
        self.tracked: set[Tracked] = set()
        self.handed_over = 0
        self.returned = 0
        self.websockets: weakref.WeakSet[web.WebSocketResponse] = weakref.WeakSet()
        self.restarted_websockets = 0
        self._closing: set[asyncio.Task[Any]] = set()
        app.on_response_prepare.append(self._on_response_prepare)

    async def _on_response_prepare(
        self, request: web.Request, response: web.StreamResponse
    ) -> None:
        if isinstance(response, web.WebSocketResponse):
            self.websockets.add(response)
        elif self.close_http or (self.draining and self._cannot_move(request)):
            # aiohttp has chosen the Connection header before this signal: set
            # it, and make the connection end after this response.
            response.force_close()
            response.headers["Connection"] = "close"

    def _cannot_move(self, request: web.Request) -> bool:
        handler = request.protocol
        return not any(t.handler is handler and not t.unknown for t in self.tracked)

    async def _connect(self, sock: socket.socket, prefix: bytes) -> None:
        server = self.runner.server
        assert server is not None
        loop = asyncio.get_running_loop()
        await loop.connect_accepted_socket(
            lambda: Tracked(server(), prefix, self.tracked, self), sock, ssl=self.ssl_context
        )

    def summary(self) -> str:
        """What this worker did with connections, for its last log line."""
        return (
            f"connections: accepted {self.acceptor.accepted}, adopted {self.acceptor.adopted}, "
            f"handed over {self.handed_over}, returned {self.returned}"
        )

    @property
    def connections(self) -> list[RequestHandler]:
        server = self.runner.server
        return server.connections if server is not None else []

    async def run(self) -> None:
        """Start up, serve until SIGTERM/SIGINT, drain, clean up.

        Raises:
            StartupFailed: ``on_startup`` raised (nothing was served).
        """
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        try:
            await self.runner.setup()
        except Exception as exc:
            raise StartupFailed(f"{type(exc).__name__}: {exc}") from exc
        try:
            if self.handoff is not None and self.ssl_context is None:
                await self._start_receiving()
            self.acceptor.start()
            ready(status="aiohttp serving")
            await stop.wait()
            await self._drain()
            # Logged before on_shutdown/on_cleanup, not at exit: the supervisor
            # may stop reading a worker's output as soon as it has exited.
            print(f"{PROG}: {self.summary()}", file=sys.stderr, flush=True)
        finally:
            if self.handoff is not None:
                self.handoff.close()
            await self.runner.cleanup()

    async def _start_receiving(self) -> None:
        assert self.handoff is not None
        try:
            await self.handoff.start_receiving(self.acceptor.adopt)
        except Exception as exc:
            print(f"connection handoff unavailable: {exc}", file=sys.stderr)
            self.handoff = None

    def _restart_websockets(self) -> None:
        for ws in list(self.websockets):
            if ws.prepared and not ws.closed:
                self.restarted_websockets += 1
                task = asyncio.ensure_future(
                    ws.close(code=SERVICE_RESTART, message=b"service restart")
                )
                self._closing.add(task)
                task.add_done_callback(self._closing.discard)

    async def _drain(self) -> None:
        loop = asyncio.get_running_loop()
        self.acceptor.stop()
        await self.acceptor.settle()
        stopping(status="aiohttp draining")
        give = self.handoff is not None and self.ssl_context is None
        if self.handoff is not None:
            # Connections already on their way to us are adopted, then given on.
            await self.handoff.stop_receiving()
        self.draining = True
        self.draining_to_give = give
        self.close_http = not give
        if give:
            for conn in list(self.tracked):
                if not conn.unknown and conn.body_remaining == 0:
                    conn.pause()
        deadline = loop.time() + self.drain_timeout
        while self.connections and loop.time() < deadline:
            self._restart_websockets()
            if self.draining_to_give:
                await self._give_idle()
            for conn in list(self.tracked):
                if conn.paused and (conn.unknown or conn.upgraded):
                    conn.resume()
            await asyncio.sleep(POLL)
        if self._closing:
            await asyncio.wait(set(self._closing), timeout=max(0.0, deadline - loop.time()) + 1)

    async def _give_idle(self) -> None:
        assert self.handoff is not None
        batch = []
        for conn in list(self.tracked):
            prefix = conn.handoff_prefix()
            if prefix is not None:
                batch.append((conn.detach(), prefix))
        if not batch:
            return
        result = await self.handoff.give([s for s, _ in batch], [p for _, p in batch])
        self.handed_over += result.placed
        if result.returned:
            # Nobody can take them: serve them here, and end every connection
            # after its next response from now on (the classic drain).
            self.returned += len(result.returned)
            self.draining_to_give = False
            self.close_http = True
            for conn in list(self.tracked):
                conn.resume()
            for index in result.returned:
                sock, prefix = batch[index]
                self.acceptor.adopt(sock, prefix)
            await self.acceptor.settle()


# -- running it -------------------------------------------------------------------


async def serve(
    app: web.Application,
    *,
    drain_timeout: float | None = None,
    ssl_context: Any = None,
    **runner_kwargs: Any,
) -> None:
    """Serve ``app`` on the sockets from ``LISTEN_FDS`` until drained.

    Raises:
        ActivationError: no inherited sockets.
        StartupFailed: the application's start-up raised.
    """
    listeners = [s.socket for s in listen_fds(unset_environment=True)]
    if not listeners:
        raise ActivationError(
            "no LISTEN_FDS for this process; run it under `nodrop run --listen ...` "
            "or a systemd .socket unit"
        )
    worker = Worker(
        app,
        listeners,
        drain_timeout=drain_timeout,
        handoff=AsyncHandoff.from_environ(),
        ssl_context=ssl_context,
        **runner_kwargs,
    )
    await worker.run()


def loop_factory(name: str) -> Callable[[], asyncio.AbstractEventLoop] | None:
    if name == "uvloop":
        import uvloop

        return uvloop.new_event_loop
    return None


def run_app(
    app: web.Application | Callable[[], Any],
    *,
    loop: str = "asyncio",
    drain_timeout: float | None = None,
    **runner_kwargs: Any,
) -> int:
    """Run ``app`` (or an app factory, sync or async) under nodrop; an exit status.

    Args:
        loop: ``"asyncio"`` or ``"uvloop"``.
    """

    async def main() -> None:
        application = app
        if not isinstance(application, web.Application):
            application = application()
            if inspect.isawaitable(application):
                application = await application
        if not isinstance(application, web.Application):
            raise StartupFailed(f"the app factory returned {application!r}, not an Application")
        await serve(application, drain_timeout=drain_timeout, **runner_kwargs)

    try:
        with asyncio.Runner(loop_factory=loop_factory(loop)) as runner:
            runner.run(main())
    except StartupFailed as exc:
        return fail(f"application start-up failed: {exc}")
    except ActivationError as exc:
        return fail(str(exc))
    return 0


def fail(message: str) -> int:
    """The reason, alone on the last line of stderr (``nodrop reload`` shows it)."""
    print(f"{PROG}: {message}", file=sys.stderr, flush=True)
    return 1


def load(target: str) -> Any:
    """``module:name`` -> the object (an Application or an app factory)."""
    module_name, _, attr = target.partition(":")
    module = importlib.import_module(module_name)
    obj: Any = module
    for part in (attr or "app").split("."):
        obj = getattr(obj, part)
    return obj


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog=f"python -m {PROG}",
        description="Serve an aiohttp app (or app factory) on the sockets from LISTEN_FDS.",
    )
    parser.add_argument("target", help="module:app or module:create_app")
    parser.add_argument("--loop", choices=["asyncio", "uvloop"], default="asyncio")
    parser.add_argument("--keepalive-timeout", type=float, metavar="S")
    parser.add_argument("--drain-timeout", type=float, metavar="S")
    parser.add_argument("--access-log", action="store_true", help="log every request")
    return parser.parse_args(list(argv))


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    sys.path.insert(0, "")
    try:
        target = load(args.target)
    except Exception as exc:
        import traceback

        traceback.print_exc()
        return fail(f"cannot load {args.target}: {type(exc).__name__}: {exc}")
    kwargs: dict[str, Any] = {}
    if args.keepalive_timeout is not None:
        kwargs["keepalive_timeout"] = args.keepalive_timeout
    if not args.access_log:
        kwargs["access_log"] = None
    with contextlib.suppress(KeyboardInterrupt):
        return run_app(target, loop=args.loop, drain_timeout=args.drain_timeout, **kwargs)
    return 0


if __name__ == "__main__":
    sys.exit(main())
