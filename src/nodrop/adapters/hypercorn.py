"""hypercorn under ``nodrop run``, with readiness and a drain that resets nothing.

``hypercorn --bind fd://3 app:app`` works under ``nodrop run`` with
``--ready delay:S``, but hypercorn never says ``READY=1``, and at SIGTERM it
closes every connection with no request in progress -- including ones it
accepted an instant before, whose request has not been read yet -- and then
closes its servers, which can reset accepted connections on Python 3.11.
Measured: a few failed requests per reload in new-connection mode. This
module runs hypercorn's asyncio worker on every inherited socket::

    nodrop run --listen tcp://0.0.0.0:8000 -- python -m nodrop.adapters.hypercorn app:app

It says ``READY=1`` once hypercorn serves (after the application's lifespan
start-up), and on SIGTERM or SIGINT stops accepting, waits
:data:`~nodrop.adapters.drain.DEFAULT_SETTLE`, then lets hypercorn shut
down gracefully. Other settings come from a hypercorn config file
(``--config hypercorn.toml``, ``python:module`` or ``file:path.py``, as
hypercorn's own ``--config``); its ``bind`` is replaced by the inherited
sockets and ``workers`` must be 1 (``nodrop run --workers N`` starts N).
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys
from collections.abc import Sequence

from hypercorn.asyncio.run import worker_serve
from hypercorn.config import Config
from hypercorn.utils import load_application

from nodrop.adapters.drain import DEFAULT_SETTLE, stop_accepting
from nodrop.errors import ActivationError
from nodrop.systemd.activation import listen_fds
from nodrop.systemd.notify import ready


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
        prog="python -m nodrop.adapters.hypercorn",
        description="Serve an ASGI/WSGI app with hypercorn on the sockets from LISTEN_FDS.",
    )
    parser.add_argument("application", help="module:app, as for hypercorn")
    parser.add_argument("--config", "-c", help="hypercorn config (TOML, python:, file:)")
    return parser.parse_args(list(argv))


async def _until_drain(fds: Sequence[int]) -> None:
    """hypercorn's shutdown trigger: runs once it serves, returns at SIGTERM."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    ready(status="hypercorn serving")
    await stop.wait()
    await stop_accepting(fds, settle=DEFAULT_SETTLE)


def main(argv: Sequence[str] | None = None) -> int:
    """Run hypercorn on the inherited sockets; the exit status of ``python -m``."""
    args = parse_args(sys.argv[1:] if argv is None else argv)
    config = load_config(args.config)
    if config.workers != 1:
        raise SystemExit("workers must be 1: use `nodrop run --workers N`")
    try:
        inherited = listen_fds(unset_environment=True)
    except ActivationError as exc:
        raise SystemExit(f"nodrop.adapters.hypercorn: {exc}") from exc
    if not inherited:
        raise SystemExit(
            "nodrop.adapters.hypercorn: no LISTEN_FDS for this process; run it under "
            "`nodrop run --listen ...` or a systemd .socket unit"
        )
    # hypercorn adopts fd://N itself; hand the fds over instead of sharing them.
    fds = [s.socket.detach() for s in inherited]
    config.bind = [f"fd://{fd}" for fd in fds]
    config.insecure_bind = []
    app = load_application(args.application, config.wsgi_max_body_size)
    asyncio.run(worker_serve(app, config, shutdown_trigger=lambda: _until_drain(fds)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
