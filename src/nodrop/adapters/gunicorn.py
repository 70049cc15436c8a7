"""A gunicorn config module: ``READY=1`` once every worker has started its app.

gunicorn takes its listeners from ``LISTEN_FDS`` by itself and says
``READY=1`` -- but its arbiter says it as soon as it has the sockets, before
any worker has imported the application. A new version that fails to start
then counts as ready; its workers die after the old generation was told to
drain, and gunicorn exits: the service is down instead of rolled back. With
this module::

    nodrop run --listen tcp://0.0.0.0:8000 -- gunicorn -c python:nodrop.adapters.gunicorn app:app
    nodrop run --listen tcp://0.0.0.0:8000 -- \
        gunicorn -c python:nodrop.adapters.gunicorn -k uvicorn_worker.UvicornWorker app:app

* the arbiter's early ``READY=1`` is held back; each worker marks itself
  ready once its application has started -- a WSGI worker once it has
  imported the app, an ASGI worker (``uvicorn_worker.UvicornWorker``,
  ``uvicorn.workers.UvicornWorker``, gunicorn's ``-k asgi``) once the
  lifespan start-up has completed -- and the worker that completes the set
  of ``--workers`` says ``READY=1``. A worker whose start-up fails exits
  (gunicorn then stops: "Worker failed to boot"), the generation never
  becomes ready, and ``nodrop reload`` rolls back;
* the ASGI workers are run by nodrop's accept loop and drained without
  failing a request (:mod:`nodrop.adapters.uvicorn_internals`,
  :mod:`nodrop.adapters.gunicorn_asgi_internals`): the next response on each
  connection says ``Connection: close``, idle keep-alive connections close
  only at their keep-alive timeout, WebSocket sessions close with 1012.
  gunicorn's own files are not changed: the worker's ``run`` is replaced in
  ``post_worker_init``.

With your own config file, import the hooks into it::

    from nodrop.adapters.gunicorn import child_exit, on_starting, post_worker_init

Only names gunicorn knows as settings are read from this module; everything
else here is private.
"""

from __future__ import annotations

import functools
import os
import sys
from typing import Any

from nodrop.adapters.worker_readiness import ReadyBoard
from nodrop.errors import NotifyError
from nodrop.systemd.notify import notify as _notify

_held: dict[str, str] = {}
_board: list[ReadyBoard] = []

UVICORN_WORKERS = frozenset(
    {"uvicorn.workers.UvicornWorker", "uvicorn_worker._workers.UvicornWorker"}
)
ASGI_WORKERS = frozenset({"gunicorn.workers.gasgi.ASGIWorker"})


def worker_kind(worker: Any) -> str:
    """``uvicorn``, ``asgi`` (gunicorn's own) or ``wsgi``, from the worker's class (or a base)."""
    for cls in type(worker).__mro__:
        name = f"{cls.__module__}.{cls.__qualname__}"
        if name in UVICORN_WORKERS:
            return "uvicorn"
        if name in ASGI_WORKERS:
            return "asgi"
    return "wsgi"


def on_starting(server: Any) -> None:
    """In the arbiter, before it binds: keep ``NOTIFY_SOCKET`` from it."""
    value = os.environ.pop("NOTIFY_SOCKET", None)
    if value:
        _held["NOTIFY_SOCKET"] = value
    _board[:] = [ReadyBoard()]


def post_worker_init(worker: Any) -> None:
    """In each worker, once the application is loaded (before an ASGI lifespan)."""
    kind = worker_kind(worker)
    started = functools.partial(_worker_started, worker)
    if kind == "uvicorn":
        from nodrop.adapters import gunicorn_uvicorn_internals

        worker.run = functools.partial(gunicorn_uvicorn_internals.run, worker, started)
    elif kind == "asgi":
        from nodrop.adapters import gunicorn_asgi_internals

        worker.run = functools.partial(gunicorn_asgi_internals.run, worker, started)
    else:
        started()


def child_exit(server: Any, worker: Any) -> None:
    """In the arbiter, once a worker has exited: it is no longer ready."""
    if _board:
        _board[0].discard(worker.pid)


def _worker_started(worker: Any) -> None:
    """This worker finished its start-up: ``READY=1`` if it was the last one."""
    if not _held or not _board:
        return
    if not _board[0].mark_ready(os.getpid(), int(worker.cfg.workers)):
        return
    try:
        _notify(
            [("READY", "1"), ("STATUS", f"gunicorn: {worker.cfg.workers} worker(s) started")],
            environ=dict(_held),
        )
    except NotifyError as exc:
        worker.log.warning("nodrop: cannot say READY=1: %s", exc)
        print(f"nodrop: cannot say READY=1: {exc}", file=sys.stderr)


def _control_socket_path(environ: dict[str, str] | os._Environ[str] = os.environ) -> str:
    """gunicorn 25.1+ serves ``gunicornc`` on a control socket, by default one
    path per user ($XDG_RUNTIME_DIR/gunicorn.ctl). Two generations would share
    it: the new arbiter unlinks the old one's and binds its own, then the old
    arbiter's exit unlinks the new one's. One path per supervisor and
    generation instead (``gunicorn-nodrop-PPID-gN.ctl``), gone with its
    generation."""
    base = environ.get("XDG_RUNTIME_DIR") or ""
    if not base or not os.path.isdir(base):
        base = os.path.join(os.path.expanduser("~"), ".gunicorn")
    generation = environ.get("NODROP_GENERATION", "0")
    return os.path.join(base, f"gunicorn-nodrop-{os.getppid()}-g{generation}.ctl")


# A gunicorn setting: the arbiter of each generation reads it from this module.
control_socket = _control_socket_path()
