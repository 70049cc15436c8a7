"""What every app of the stack matrix shares: who answered, and how start-up behaves.

Each app (FastAPI, raw ASGI, Django, Flask, aiohttp) serves the same endpoints:

* ``GET /fast`` and ``GET /slow`` (answers after :data:`SLOW_SECONDS`);
* ``GET /stream``: :data:`STREAM_CHUNKS` server-sent events, one every
  :data:`STREAM_INTERVAL` seconds (2 s in all);
* ``POST /echo``: the request body back, byte for byte (the clients send 1 MB);
* ``/ws`` (where the stack has WebSockets): every message echoed.

Every response says which generation and process answered, in its body and in
the ``X-Generation`` / ``X-Pid`` headers. The environment drives start-up:

* ``STARTUP_SECONDS`` (default 1): how long start-up takes (ASGI lifespan,
  aiohttp ``on_startup``, WSGI module import);
* ``APP_VERSION=broken-start``: start-up raises after that time;
* ``APP_VERSION=import-error``: the app's module fails to import;
* ``STACKS_READY_FILE``: when set, each process appends ``PID GENERATION`` to
  it once its start-up has completed (the benchmark's readiness signal for
  the servers' own reloads, which tell nobody).
"""

from __future__ import annotations

import asyncio
import importlib
import os
import time

SLOW_SECONDS = 0.5
STREAM_CHUNKS = 20
STREAM_INTERVAL = 0.1

BROKEN_START = "broken-start"
IMPORT_ERROR = "import-error"


def generation() -> str:
    return os.environ.get("NODROP_GENERATION", "-")


def app_version() -> str:
    return os.environ.get("APP_VERSION", "good")


def identity() -> str:
    """``gen=G pid=P``: the line every response carries."""
    return f"gen={generation()} pid={os.getpid()}"


def headers() -> list[tuple[str, str]]:
    """``X-Generation``, ``X-Pid`` and, in async code, ``X-Loop``: the event
    loop's class (``uvloop.Loop``, ``asyncio.unix_events._UnixSelectorEventLoop``),
    so a cell that is meant to run on uvloop can check that it does."""
    out = [("X-Generation", generation()), ("X-Pid", str(os.getpid()))]
    try:
        loop = asyncio.get_running_loop()
    except RuntimeError:
        return out
    return [*out, ("X-Loop", f"{type(loop).__module__}.{type(loop).__qualname__}")]


def fail_import_if_asked() -> None:
    """Called at the top of each app module: the ``import-error`` version
    depends on a module that is not installed, as a real broken deploy would."""
    if app_version() == IMPORT_ERROR:
        importlib.import_module("stacks_module_this_version_forgot_to_install")


def _startup_seconds() -> float:
    return float(os.environ.get("STARTUP_SECONDS", "1.0"))


def _finish_startup() -> None:
    if app_version() == BROKEN_START:
        raise RuntimeError(f"stacks app: start-up failed on purpose (APP_VERSION={BROKEN_START})")
    path = os.environ.get("STACKS_READY_FILE")
    if path:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            os.write(fd, f"{os.getpid()} {generation()}\n".encode())
        finally:
            os.close(fd)


def start_up_blocking() -> None:
    """A WSGI app's start-up, paid at import."""
    time.sleep(_startup_seconds())
    _finish_startup()


async def start_up() -> None:
    """An async app's start-up (lifespan, ``on_startup``)."""
    await asyncio.sleep(_startup_seconds())
    _finish_startup()


def stream_event(index: int) -> bytes:
    return f"data: {index} {identity()}\n\n".encode()
