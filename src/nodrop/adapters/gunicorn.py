"""A gunicorn config module: ``READY=1`` once a worker has loaded the app.

gunicorn takes its listeners from ``LISTEN_FDS`` by itself and says
``READY=1`` -- but its arbiter says it as soon as it has the sockets, before
any worker has imported the application. A new version that fails to import
then counts as ready; its workers die after the old generation was told to
drain (unless that happens within ``--ready-grace``), and gunicorn exits:
the service is down instead of rolled back. With this module the arbiter's
early ``READY=1`` is held back, and each worker says ``READY=1`` after it has
loaded the application::

    nodrop run --listen tcp://0.0.0.0:8000 -- gunicorn -c python:nodrop.adapters.gunicorn app:app

The first worker that loaded the app makes the generation ready; the others
boot in parallel, and meanwhile connections wait in the shared listening
queue. With your own config file, import the two hooks into it::

    from nodrop.adapters.gunicorn import on_starting, post_worker_init

(``--preload`` is the other fix: the arbiter then imports the app before it
says ``READY=1``; but a preloaded app cannot be reloaded per worker.)

Only names gunicorn knows as settings are read from this module; everything
else here is private.
"""

from __future__ import annotations

import os
from typing import Any

from nodrop.errors import NotifyError
from nodrop.systemd.notify import notify as _notify

_held: dict[str, str] = {}


def on_starting(server: Any) -> None:
    """In the arbiter, before it binds: keep ``NOTIFY_SOCKET`` from it."""
    value = os.environ.pop("NOTIFY_SOCKET", None)
    if value:
        _held["NOTIFY_SOCKET"] = value


def post_worker_init(worker: Any) -> None:
    """In each worker, once the application is loaded: ``READY=1``."""
    if not _held:
        return
    try:
        _notify(
            [("READY", "1"), ("STATUS", f"gunicorn worker {os.getpid()} loaded the app")],
            environ=dict(_held),
        )
    except NotifyError as exc:
        worker.log.warning("nodrop: cannot say READY=1: %s", exc)


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
