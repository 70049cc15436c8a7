"""Everything nodrop needs from gunicorn's ``UvicornWorker`` classes.

``uvicorn_worker.UvicornWorker`` and the older ``uvicorn.workers.UvicornWorker``
run uvicorn's ``Server`` on gunicorn's sockets. nodrop's gunicorn config
(:mod:`nodrop.adapters.gunicorn`) replaces the worker's ``run`` with
:func:`run`, which serves the same app with
:class:`nodrop.adapters.uvicorn_internals.NodropServer` instead.

It relies on the worker's ``config`` (a uvicorn ``Config``), ``wsgi`` (the
loaded app), ``sockets`` (gunicorn's, with ``.sock``) and
``_install_sigquit_handler()``, checked by :func:`check_internals` (and by
``tests/test_adapter_uvicorn_internals.py``).
"""

from __future__ import annotations

import asyncio
import importlib
import sys
import warnings
from collections.abc import Callable
from typing import Any

from uvicorn.config import STARTUP_FAILURE, Config

from nodrop.adapters.uvicorn_internals import NodropServer
from nodrop.connhandoff import AsyncHandoff

WORKER_CLASSES = ("uvicorn_worker.UvicornWorker", "uvicorn.workers.UvicornWorker")


def check_internals() -> list[str]:
    """What is missing from the installed ``UvicornWorker`` classes (empty: all there)."""
    problems = []
    for dotted in WORKER_CLASSES:
        module_name, _, name = dotted.rpartition(".")
        try:
            with warnings.catch_warnings():  # uvicorn.workers says it is deprecated
                warnings.simplefilter("ignore", DeprecationWarning)
                cls = getattr(importlib.import_module(module_name), name)
        except ImportError:
            continue  # that package is not installed: nothing to rely on
        if not callable(getattr(cls, "_install_sigquit_handler", None)):
            problems.append(f"{dotted} has no _install_sigquit_handler()")
        if not hasattr(cls, "CONFIG_KWARGS"):
            problems.append(
                f"{dotted} has no CONFIG_KWARGS (its uvicorn Config is built elsewhere)"
            )
    return problems


def run(worker: Any, on_started: Callable[[], object]) -> None:
    """``run`` for gunicorn's ``UvicornWorker`` (either package): uvicorn's
    own ``_serve`` with :class:`NodropServer` in place of ``uvicorn.Server``."""
    config: Config = worker.config
    config.app = worker.wsgi
    server = NodropServer(
        config,
        on_started=on_started,
        handoff=AsyncHandoff.from_environ(),
        name="nodrop gunicorn worker",
    )
    sockets = [getattr(s, "sock", s) for s in worker.sockets]

    async def serve() -> None:
        worker._install_sigquit_handler()
        await server.serve(sockets=sockets)

    with asyncio.Runner(loop_factory=config.get_loop_factory()) as runner:
        runner.run(serve())
    if not server.started:
        sys.exit(STARTUP_FAILURE)
