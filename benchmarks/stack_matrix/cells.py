"""The cells of the stack matrix: one app on one server, run one way.

Two kinds of rows:

* ``nodrop``: the stack under ``nodrop run`` with the command line the README
  recommends; reloaded with ``nodrop reload``.
* ``own``: the same stack with no nodrop, reloaded the server's own way (its
  master process and a signal) -- the figures nodrop must beat. The harness
  binds the listening socket (port 0) and passes it as ``{fd}``.

**Every command line is written once, in the block below**: when an adapter
changes its command, edit it there and every cell, test and benchmark
follows. Run one cell::

    python benchmarks/stacks.py --cells fastapi/uvicorn-h11 --reloads 3
    pytest tests/test_stacks.py -k fastapi/uvicorn-h11

granian 2.8.7 has no cell: neither its command line nor its public API takes
a listening socket (it binds ``--host/--port`` or ``--uds`` itself, and on
Linux each worker builds its own TCP listener from the address). Its private
``granian._granian.SocketHolder(fd, uds, backlog)``, put in place by
overriding the private ``Server._init_shared_socket``, does serve an
inherited socket under ``nodrop run`` (tried by hand: one reload, answered by
both generations), but nothing public supports it.
"""

from __future__ import annotations

import enum
import importlib.util
import shutil
import signal
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
APPS = REPO / "tests" / "stack_apps"
PY = sys.executable

# -- the command lines: edit here -------------------------------------------------------
# Under `nodrop run` (as the README recommends them).
UVICORN = (PY, "-m", "nodrop.adapters.uvicorn")
GUNICORN = (PY, "-m", "gunicorn", "-c", "python:nodrop.adapters.gunicorn")
HYPERCORN = (PY, "-m", "nodrop.adapters.hypercorn")
AIOHTTP_ADAPTER = (PY, "-m", "nodrop.adapters.aiohttp")
# gunicorn options every gunicorn cell shares. gunicorn's default keep-alive (2 s)
# is shorter than the clients' idle gaps (up to 2 s): a steady-state race the
# reloads are not to blame for, so the cells use 5 s, uvicorn's and hypercorn's
# default.
GUNICORN_OPTIONS = ("--workers", "2", "--keep-alive", "5", "--graceful-timeout", "30")
QUIET = ("--log-level", "warning")
# The servers' own command lines, for the `own` rows ({fd}: the listening socket).
# uvicorn gives a new worker 5 s (--timeout-worker-healthcheck) to be ready, then
# aborts the restart and keeps the old one: on a loaded 2-core machine a 1 s start-up
# misses that, and the "reload" silently does not happen. 30 s lets it happen.
OWN_UVICORN = (
    PY,
    "-m",
    "uvicorn",
    "--fd",
    "{fd}",
    "--workers",
    "2",
    "--timeout-worker-healthcheck",
    "30",
)
OWN_GUNICORN = (PY, "-m", "gunicorn", "--bind", "fd://{fd}")
OWN_HYPERCORN = (PY, "-m", "hypercorn", "--bind", "fd://{fd}", "--workers", "2")
# ---------------------------------------------------------------------------------------

FASTAPI = "fastapi_app:app"
ASGI = "asgi_app:app"
DJANGO = "stacks_django.wsgi:application"
FLASK = "flask_app:app"

UVLOOP = "uvloop.Loop"
ASYNCIO = "asyncio.unix_events._UnixSelectorEventLoop"


class Kind(enum.Enum):
    NODROP = "nodrop"
    OWN = "own"


@dataclass(frozen=True)
class Cell:
    """One app on one server, run one way."""

    id: str
    """``app/server-variant``, plus ``+own`` for a server's own reload."""
    stack: str
    """The server, for grouping: uvicorn, gunicorn, hypercorn, aiohttp."""
    argv: tuple[str, ...]
    kind: Kind = Kind.NODROP
    workers: int = 2
    """``nodrop run --workers``; 1 where the server runs its own workers."""
    reload_signal: signal.Signals | None = None
    """For ``own`` rows: what the server's master reloads on."""
    modules: tuple[str, ...] = ()
    """Python modules the cell needs (missing: the cell is skipped, with the reason)."""
    websocket: bool = True
    blocking: bool = False
    """Synchronous workers (one request at a time each): wrk asks only /fast,
    so steady state keeps up with it."""
    loop: str | None = None
    """The event loop the app must find itself on (checked at start), if any."""
    run_args: tuple[str, ...] = ()
    """Extra ``nodrop run`` options."""
    rollback_test: bool = True
    """CI runs the broken-version test on this cell. Off where another cell
    already covers the same server start-up path (the CI time budget)."""
    env: Mapping[str, str] = field(default_factory=dict)
    note: str = ""

    def missing(self) -> str | None:
        """Why this cell cannot run here, or None."""
        for module in self.modules:
            try:
                found = importlib.util.find_spec(module) is not None
            except ModuleNotFoundError:
                found = False
            if not found:
                return f"python module {module} is not installed (pip install -e '.[test]')"
        if shutil.which(self.argv[0]) is None and not Path(self.argv[0]).exists():
            return f"{self.argv[0]} is not installed"
        return None

    def command(self, fd: int | None = None) -> list[str]:
        if fd is None:
            return list(self.argv)
        return [arg.replace("{fd}", str(fd)) for arg in self.argv]


def _gunicorn(worker: str, app: str, *extra: str) -> tuple[str, ...]:
    return (*GUNICORN, "-k", worker, *GUNICORN_OPTIONS, *extra, *QUIET, app)


FASTAPI_MODULES = ("fastapi", "uvicorn")
STANDARD = ("uvloop", "httptools", "websockets")

CELLS: tuple[Cell, ...] = (
    # -- under nodrop run -----------------------------------------------------------
    Cell(
        "fastapi/uvicorn-h11",
        "uvicorn",
        (*UVICORN, FASTAPI, "--loop", "asyncio", "--http", "h11", *QUIET),
        modules=(*FASTAPI_MODULES, "h11", "websockets"),
        loop=ASYNCIO,
        note="plain `pip install uvicorn`: asyncio + h11",
    ),
    Cell(
        "fastapi/uvicorn-uvloop",
        "uvicorn",
        (*UVICORN, FASTAPI, "--loop", "uvloop", "--http", "httptools", *QUIET),
        modules=(*FASTAPI_MODULES, *STANDARD),
        loop=UVLOOP,
        note="uvicorn[standard] (what fastapi[standard] installs): uvloop + httptools",
    ),
    Cell(
        "asgi/uvicorn",
        "uvicorn",
        (*UVICORN, ASGI, *QUIET),
        modules=("uvicorn", *STANDARD),
        loop=UVLOOP,
        rollback_test=False,  # uvicorn's lifespan failure path: fastapi/uvicorn-uvloop
        note="plain ASGI app (no framework), uvicorn[standard] defaults",
    ),
    Cell(
        "fastapi/gunicorn-uvicorn.workers",
        "gunicorn",
        _gunicorn("uvicorn.workers.UvicornWorker", FASTAPI),
        workers=1,
        modules=(*FASTAPI_MODULES, "gunicorn", *STANDARD),
        loop=UVLOOP,
        note="uvicorn's bundled (deprecated) worker class",
    ),
    Cell(
        "fastapi/gunicorn-uvicorn-worker",
        "gunicorn",
        _gunicorn("uvicorn_worker.UvicornWorker", FASTAPI),
        workers=1,
        modules=(*FASTAPI_MODULES, "gunicorn", "uvicorn_worker", *STANDARD),
        loop=UVLOOP,
        note="the uvicorn-worker package",
    ),
    Cell(
        "fastapi/gunicorn-asgi",
        "gunicorn",
        _gunicorn("asgi", FASTAPI),
        workers=1,
        modules=("fastapi", "gunicorn.workers.gasgi"),
        note="gunicorn's own ASGI worker (`-k asgi`, gunicorn.workers.gasgi.ASGIWorker)",
    ),
    Cell(
        "fastapi/hypercorn-asyncio",
        "hypercorn",
        (*HYPERCORN, FASTAPI),
        modules=("fastapi", "hypercorn"),
        loop=ASYNCIO,
    ),
    Cell(
        "fastapi/hypercorn-uvloop",
        "hypercorn",
        (*HYPERCORN, "--config", str(APPS / "hypercorn_uvloop.toml"), FASTAPI),
        modules=("fastapi", "hypercorn", "uvloop"),
        loop=UVLOOP,
        note="worker_class = uvloop in hypercorn's own config file",
    ),
    Cell(
        "aiohttp/aiohttp-adapter",
        "aiohttp",
        (*AIOHTTP_ADAPTER, "aiohttp_app:create_app"),
        modules=("aiohttp", "nodrop.adapters.aiohttp"),
        loop=ASYNCIO,
        note="the app factory served by nodrop's aiohttp adapter",
    ),
    Cell(
        "aiohttp/aiohttp-adapter-uvloop",
        "aiohttp",
        (*AIOHTTP_ADAPTER, "--loop", "uvloop", "aiohttp_app:create_app"),
        modules=("aiohttp", "nodrop.adapters.aiohttp", "uvloop"),
        loop=UVLOOP,
        rollback_test=False,
        note="the same on uvloop",
    ),
    Cell(
        "django/gunicorn-sync",
        "gunicorn",
        _gunicorn("sync", DJANGO),
        workers=1,
        modules=("django", "gunicorn"),
        websocket=False,
        blocking=True,
    ),
    Cell(
        "django/gunicorn-gthread",
        "gunicorn",
        _gunicorn("gthread", DJANGO, "--threads", "4"),
        workers=1,
        modules=("django", "gunicorn"),
        websocket=False,
    ),
    Cell(
        "flask/gunicorn-sync",
        "gunicorn",
        _gunicorn("sync", FLASK),
        workers=1,
        modules=("flask", "gunicorn"),
        websocket=False,
        blocking=True,
        rollback_test=False,  # gunicorn's app-import failure path: django/gunicorn-sync
    ),
    Cell(
        "flask/gunicorn-gthread",
        "gunicorn",
        _gunicorn("gthread", FLASK, "--threads", "4"),
        workers=1,
        modules=("flask", "gunicorn"),
        websocket=False,
        rollback_test=False,  # gunicorn's app-import failure path: django/gunicorn-gthread
    ),
    # -- the servers' own reload, no nodrop -------------------------------------------
    Cell(
        "fastapi/uvicorn-h11+own",
        "uvicorn",
        (*OWN_UVICORN, "--loop", "asyncio", "--http", "h11", *QUIET, FASTAPI),
        kind=Kind.OWN,
        workers=1,
        reload_signal=signal.SIGHUP,
        modules=(*FASTAPI_MODULES, "h11", "websockets"),
        loop=ASYNCIO,
        note="uvicorn --workers 2, SIGHUP: replaces workers one by one, each after its successor is ready",
    ),
    Cell(
        "fastapi/uvicorn-uvloop+own",
        "uvicorn",
        (*OWN_UVICORN, "--loop", "uvloop", "--http", "httptools", *QUIET, FASTAPI),
        kind=Kind.OWN,
        workers=1,
        reload_signal=signal.SIGHUP,
        modules=(*FASTAPI_MODULES, *STANDARD),
        loop=UVLOOP,
        note="uvicorn --workers 2, SIGHUP",
    ),
    Cell(
        "fastapi/gunicorn-uvicorn-worker+own",
        "gunicorn",
        (*OWN_GUNICORN, "-k", "uvicorn_worker.UvicornWorker", *GUNICORN_OPTIONS, *QUIET, FASTAPI),
        kind=Kind.OWN,
        workers=1,
        reload_signal=signal.SIGHUP,
        modules=(*FASTAPI_MODULES, "gunicorn", "uvicorn_worker", *STANDARD),
        loop=UVLOOP,
        note="gunicorn HUP: new workers, then the old ones stopped gracefully",
    ),
    Cell(
        "django/gunicorn-sync+own",
        "gunicorn",
        (*OWN_GUNICORN, "-k", "sync", *GUNICORN_OPTIONS, *QUIET, DJANGO),
        kind=Kind.OWN,
        workers=1,
        reload_signal=signal.SIGHUP,
        modules=("django", "gunicorn"),
        websocket=False,
        blocking=True,
        note="gunicorn HUP",
    ),
    Cell(
        "fastapi/hypercorn-asyncio+own",
        "hypercorn",
        (*OWN_HYPERCORN, FASTAPI),
        kind=Kind.OWN,
        workers=1,
        reload_signal=signal.SIGHUP,
        modules=("fastapi", "hypercorn"),
        loop=ASYNCIO,
        note="hypercorn --workers 2, SIGHUP: stops every worker, then starts new ones "
        "(the master keeps the socket; connections wait in its queue meanwhile)",
    ),
)

BY_ID = {cell.id: cell for cell in CELLS}


def select(patterns: list[str] | None, *, own: bool = True) -> list[Cell]:
    """Cells whose id is one of ``patterns`` or, failing that, starts with it
    (all if None): ``fastapi/uvicorn-h11`` is one cell, ``django/`` two.

    Raises:
        ValueError: a pattern that matches no cell.
    """
    cells = [c for c in CELLS if own or c.kind is Kind.NODROP]
    if not patterns:
        return cells
    out: list[Cell] = []
    for pattern in patterns:
        matched = [c for c in cells if c.id == pattern] or [
            c for c in cells if c.id.startswith(pattern)
        ]
        if not matched:
            known = ", ".join(c.id for c in CELLS)
            raise ValueError(f"no cell matches {pattern!r}; cells: {known}")
        out += [c for c in matched if c not in out]
    return out
