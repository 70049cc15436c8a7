"""uvicorn under ``nodrop run``, with readiness and a drain that resets nothing.

``uvicorn app:app --fd 3`` works under ``nodrop run`` as it is, with two
costs: uvicorn never says ``READY=1`` (so ``--ready delay:S`` must guess how
long start-up takes) and ``--fd`` takes a single socket. This module is a
drop-in command line::

    nodrop run --listen tcp://0.0.0.0:8000 -- python -m nodrop.adapters.uvicorn app:app

It accepts every uvicorn option (``--factory``, ``--app-dir``,
``--log-level``, ...; not ``--host/--port/--uds/--fd/--workers/--reload``,
nodrop owns those), serves on every socket from ``LISTEN_FDS``, sends
``READY=1`` once the application's lifespan start-up has completed (a
start-up that fails exits 3, and ``nodrop reload`` rolls back), and on
SIGTERM drains without failing a request: nothing more is accepted, the next
response on each kept-alive connection says ``Connection: close``, idle
connections close only at their keep-alive timeout, WebSocket sessions
close with 1012; under ``nodrop run`` (connection handoff, unless
``--no-handoff``) idle connections move to the new generation instead.
asyncio and uvloop, h11 and httptools alike; see
:mod:`nodrop.adapters.uvicorn_internals`. Plain ``uvicorn --fd 3`` was
measured to fail requests on every reload (new connections closed
unanswered or reset; kept-alive ones closed under their clients); this
adapter fails none.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import Any

import uvicorn
from uvicorn.main import main as uvicorn_command

from nodrop.adapters.uvicorn_internals import NodropServer
from nodrop.connhandoff import AsyncHandoff
from nodrop.errors import ActivationError
from nodrop.systemd.activation import listen_fds
from nodrop.systemd.notify import ready

OWNED_BY_NODROP = ("host", "port", "uds", "fd", "workers", "reload")

# uvicorn.main.main's parameters that are not Config's (or differ in form).
_CLI_ONLY = ("app_dir",)


def config_from_argv(argv: Sequence[str]) -> uvicorn.Config:
    """A ``uvicorn.Config`` from uvicorn's own command line (pure but for imports).

    Raises:
        SystemExit: bad options (uvicorn's own message), or an option nodrop owns.
    """
    ctx = uvicorn_command.make_context("python -m nodrop.adapters.uvicorn", list(argv))
    params: dict[str, Any] = dict(ctx.params)
    defaults = {p.name: p.default for p in uvicorn_command.params}
    clashes = [
        name for name in OWNED_BY_NODROP if params.get(name) not in (defaults.get(name), None)
    ]
    if clashes:
        options = ", ".join("--" + name.replace("_", "-") for name in clashes)
        raise SystemExit(f"{options}: nodrop passes the listening sockets and runs the workers")
    for name in (*OWNED_BY_NODROP, *_CLI_ONLY):
        params.pop(name, None)
    app_dir = ctx.params.get("app_dir")
    if app_dir is not None:
        sys.path.insert(0, app_dir)
    # Empty tuples from click mean "not given" for these list options.
    for name in ("reload_dirs", "reload_includes", "reload_excludes"):
        params.pop(name, None)
    params["headers"] = [tuple(h.split(":", 1)) for h in params.get("headers") or ()]
    if params.get("log_config") is None:
        params.pop("log_config", None)
    return uvicorn.Config(params.pop("app"), **params)


def main(argv: Sequence[str] | None = None) -> int:
    """Run uvicorn on the inherited sockets; the exit status of ``python -m``."""
    config = config_from_argv(sys.argv[1:] if argv is None else argv)
    try:
        inherited = listen_fds(unset_environment=True)
    except ActivationError as exc:
        raise SystemExit(f"nodrop.adapters.uvicorn: {exc}") from exc
    if not inherited:
        raise SystemExit(
            "nodrop.adapters.uvicorn: no LISTEN_FDS for this process; run it under "
            "`nodrop run --listen ...` or a systemd .socket unit"
        )
    server = NodropServer(
        config,
        on_started=lambda: ready(status="uvicorn serving"),
        handoff=AsyncHandoff.from_environ(),
    )
    server.run(sockets=[s.socket for s in inherited])
    return 0 if server.started else 3


if __name__ == "__main__":
    sys.exit(main())
