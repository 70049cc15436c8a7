"""hypercorn under ``nodrop run``: readiness, and reloads that fail no request.

::

    nodrop run --listen tcp://0.0.0.0:8000 -- python -m nodrop.adapters.hypercorn app:app
    nodrop run --listen tcp://0.0.0.0:8000 -- python -m nodrop.adapters.hypercorn app:app -k uvloop

Plain ``hypercorn --bind fd://3`` works under ``nodrop run`` with ``--ready
delay:S``, but hypercorn never says ``READY=1``, and its shutdown fails
requests a reload should not fail: it closes every idle keep-alive
connection at once (a client sending its next request at that instant
meets a closed connection), and ends a connection after its in-flight
response without saying ``Connection: close``; WebSocket sessions are cut
(1011 or a bare close). This adapter runs hypercorn's own protocol code
(:mod:`nodrop.adapters.hypercorn_internals`) on every inherited socket and:

* says ``READY=1`` only once the application's lifespan start-up has
  completed; a start-up that fails, or an app that cannot be imported,
  exits 1 with the reason as the last line on stderr (``nodrop reload``
  shows it and rolls back);
* on SIGTERM or SIGINT stops accepting (queued connections stay in the
  kernel's queue for the new generation), answers the next request on every
  kept-alive connection with ``Connection: close``, closes idle connections
  only when their keep-alive timeout passes (as hypercorn would anyway),
  closes WebSocket sessions with 1012 (Service Restart) and sends HTTP/2
  connections a GOAWAY;
* under ``nodrop run`` (connection handoff, unless ``--no-handoff``) hands
  idle HTTP/1.1 keep-alive connections (and ones accepted but whose request has not fully arrived, with what was
  read of it) to the new generation instead, which serves them as its own.

Other settings come from a hypercorn config file (``--config
hypercorn.toml``, ``python:module`` or ``file:path.py``, as hypercorn's own
``--config``); its ``bind`` is replaced by the inherited sockets and
``workers`` must be 1 (``nodrop run --workers N`` starts N). The drain waits
at most hypercorn's ``keep_alive_timeout + graceful_timeout`` (8 s by
default; ``--drain-timeout S``), then closes what is left.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import Callable, Sequence

from hypercorn.config import Config
from hypercorn.utils import load_application

from nodrop.adapters.hypercorn_internals import StartupFailed, Worker
from nodrop.connhandoff import AsyncHandoff
from nodrop.errors import ActivationError
from nodrop.systemd.activation import listen_fds

PROG = "nodrop.adapters.hypercorn"
WORKER_CLASSES = ("asyncio", "uvloop")


def load_config(path: str | None) -> Config:
    """A hypercorn ``Config`` as hypercorn's ``--config`` reads it."""
    if path is None:
        return Config()
    if path.startswith("python:"):
        return Config.from_object(path[len("python:") :])
    if path.startswith("file:"):
        return Config.from_pyfile(path[len("file:") :])
    return Config.from_toml(path)


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog=f"python -m {PROG}",
        description="Serve an ASGI/WSGI app with hypercorn on the sockets from LISTEN_FDS.",
    )
    parser.add_argument("application", help="module:app, as for hypercorn")
    parser.add_argument("--config", "-c", help="hypercorn config (TOML, python:, file:)")
    parser.add_argument(
        "--worker-class",
        "-k",
        choices=WORKER_CLASSES,
        help="event loop (default: the config's worker_class, else asyncio)",
    )
    parser.add_argument(
        "--drain-timeout",
        type=float,
        metavar="S",
        help="longest drain (default: keep_alive_timeout + graceful_timeout)",
    )
    return parser.parse_args(list(argv))


def loop_factory(worker_class: str) -> Callable[[], asyncio.AbstractEventLoop] | None:
    if worker_class == "uvloop":
        import uvloop

        return uvloop.new_event_loop
    return None


def fail(message: str) -> int:
    """The reason, alone on the last line of stderr (``nodrop reload`` shows it)."""
    print(f"{PROG}: {message}", file=sys.stderr, flush=True)
    return 1


def last_line(text: str) -> str:
    # hypercorn quotes the application's message (often a whole traceback).
    lines = [line.strip(" '\"") for line in text.strip().splitlines()]
    lines = [line for line in lines if line]
    return lines[-1] if lines else text


def main(argv: Sequence[str] | None = None) -> int:
    """Run hypercorn on the inherited sockets; the exit status of ``python -m``."""
    args = parse_args(sys.argv[1:] if argv is None else argv)
    config = load_config(args.config)
    worker_class = args.worker_class or config.worker_class
    if worker_class not in WORKER_CLASSES:
        raise SystemExit(f"{PROG}: worker class {worker_class!r} is not supported here")
    if config.workers != 1:
        raise SystemExit(f"{PROG}: workers must be 1: use `nodrop run --workers N`")
    try:
        inherited = listen_fds(unset_environment=True)
    except ActivationError as exc:
        raise SystemExit(f"{PROG}: {exc}") from exc
    if not inherited:
        raise SystemExit(
            f"{PROG}: no LISTEN_FDS for this process; run it under "
            "`nodrop run --listen ...` or a systemd .socket unit"
        )
    listeners = [s.socket for s in inherited]
    try:
        app = load_application(args.application, config.wsgi_max_body_size)
    except Exception as exc:
        import traceback

        traceback.print_exc()
        return fail(f"cannot load {args.application}: {type(exc).__name__}: {exc}")
    worker = Worker(
        app,
        config,
        listeners,
        drain_timeout=args.drain_timeout,
        handoff=AsyncHandoff.from_environ(),
    )
    try:
        with asyncio.Runner(loop_factory=loop_factory(worker_class)) as runner:
            runner.run(worker.run())
    except StartupFailed as exc:
        return fail(f"application start-up failed: {last_line(str(exc))}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
