"""The rows of the latency benchmark: start a server, reload it, stop it.

* ``demo``: ``nodrop run --workers 2 -- python -m nodrop.demo.app`` (what
  ``nodrop demo`` runs);
* ``fastapi``: the stack matrix's FastAPI/uvicorn cell (its app, its adapter
  command ``python -m nodrop.adapters.uvicorn``, its ``nodrop run`` options);
* ``nginx`` and ``haproxy``: the reload matrix's peers (their config
  templates and reload commands, ``benchmarks/baselines/servers.py``).

Each reload returns the moments :mod:`latency.phases` cuts it at: nodrop
says them itself (the control socket's answer with ``wait="drained"``, and
``status`` for the workers' pids and the generation's start); for nginx and
HAProxy the harness watches the master's children in ``/proc``.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from baselines import procs, servers
from latency.phases import ReloadMoments
from nodrop.supervisor.control import request
from stack_matrix import cells as stack_cells
from stack_matrix.launch import child_pythonpath

START_TIMEOUT = 60.0
RELOAD_TIMEOUT = 60.0


class RowError(Exception):
    """A row could not start or reload; it is reported, with the reason."""


@dataclass
class Row:
    """A running server: where to send load, how to reload it, what to note."""

    port: int
    root: int
    reload: Callable[[], ReloadMoments]
    path: str = "/"
    notes: list[str] = field(default_factory=list)
    status: Callable[[], dict[str, Any] | None] = lambda: None


def _wait_serving(control: str, proc: subprocess.Popen[bytes], log: str) -> dict[str, Any]:
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RowError(f"nodrop run exited with {proc.returncode}:\n{procs.tail(log)}")
        with contextlib.suppress(Exception):
            status: dict[str, Any] = request(control, "status", timeout=5)
            if status.get("active_generation") is not None:
                return status
        time.sleep(0.05)
    raise RowError(f"nodrop run not serving after {START_TIMEOUT:g}s:\n{procs.tail(log)}")


def _active_workers(status: dict[str, Any]) -> tuple[frozenset[int], dict[str, Any] | None]:
    for gen in status["generations"]:
        if gen["generation"] == status["active_generation"]:
            return frozenset(w["pid"] for w in gen["workers"]), gen
    return frozenset(), None


def nodrop_reload(control: str) -> ReloadMoments:
    """One ``nodrop reload`` that waits for the old generation to exit."""
    before = request(control, "status", timeout=10)
    old_pids, _ = _active_workers(before)
    answer = request(control, "reload", wait="drained", timeout=RELOAD_TIMEOUT)
    asked = time.monotonic()
    if not answer.get("ok"):
        raise RowError(f"reload failed: {answer.get('message')}")
    after = request(control, "status", timeout=10)
    now = time.monotonic()
    new_pids, gen = _active_workers(after)
    spawned = None if gen is None else now - float(gen["age"])
    started = float(answer["started"])
    ready = float(answer["ready"])
    switched = float(answer["finished"])
    old_exited = float(answer.get("old_exited") or asked)
    return ReloadMoments(started, ready, switched, old_exited, spawned, new_pids, old_pids)


@contextlib.contextmanager
def start_nodrop(
    workdir: str,
    command: list[str],
    run_args: list[str],
    env: dict[str, str] | None = None,
    path: str = "/",
) -> Iterator[Row]:
    control = os.path.join(workdir, "control.sock")
    log = os.path.join(workdir, "nodrop.log")
    argv = [
        sys.executable, "-m", "nodrop", "run", "--control", control,
        "--listen", f"tcp://{servers.HOST}:0", *run_args, "--", *command,
    ]  # fmt: skip
    full_env = dict(os.environ, **(env or {}))
    full_env.pop("NOTIFY_SOCKET", None)
    proc = procs.spawn(argv, log, env=full_env)
    try:
        status = _wait_serving(control, proc, log)
        # Active means every worker said READY=1: serving (the FastAPI app has no "/").
        port = int(status["listeners"][0]["address"].rsplit(":", 1)[1])

        def status_now() -> dict[str, Any] | None:
            try:
                reply: dict[str, Any] = request(control, "status", timeout=10)
            except Exception:
                return None
            return reply

        yield Row(port, proc.pid, lambda: nodrop_reload(control), path, [], status_now)
    finally:
        with contextlib.suppress(Exception):
            request(control, "stop", timeout=20)
        procs.stop(proc, timeout=20)


def demo_row(workdir: str, run_args: list[str]) -> contextlib.AbstractContextManager[Row]:
    args = ["--workers", "2", "--ready-grace", "0.2", "--drain-timeout", "10", *run_args]
    return start_nodrop(workdir, list(servers.DEMO_APP), args)


FASTAPI_CELL = "fastapi/uvicorn-h11"


def fastapi_row(workdir: str, run_args: list[str]) -> contextlib.AbstractContextManager[Row]:
    """The stack matrix's cell, with the app's simulated start-up sleep at 0
    (a sleep costs no CPU; what the app imports and builds still does)."""
    cell = next(c for c in stack_cells.CELLS if c.id == FASTAPI_CELL)
    if reason := cell.missing():
        raise RowError(reason)
    args = ["--workers", str(cell.workers), "--ready-timeout", "60", "--drain-timeout", "30"]
    env = {
        "PYTHONPATH": child_pythonpath(),
        "APP_VERSION": "good",
        "STARTUP_SECONDS": "0",
        **cell.env,
    }
    return start_nodrop(
        workdir, cell.command(), [*args, *cell.run_args, *run_args], env, path="/fast"
    )


def _peer_reload(master: int, what: Callable[[], None]) -> ReloadMoments:
    old = frozenset(procs.children_of(master))
    started = time.monotonic()
    what()
    ready = procs.wait_until(lambda: bool(procs.children_of(master) - old), RELOAD_TIMEOUT)
    exited = procs.wait_until(lambda: all(procs.is_zombie_or_gone(p) for p in old), RELOAD_TIMEOUT)
    if ready is None or exited is None:
        raise RowError(f"reload: new workers {ready is not None}, old exited {exited is not None}")
    new = frozenset(procs.children_of(master) - old)
    return ReloadMoments(started, ready, ready, exited, None, new, old)


@contextlib.contextmanager
def peer_row(workdir: str, name: str) -> Iterator[Row]:
    """nginx (``-s reload``) or HAProxy (USR2 to the master), from the reload matrix."""
    binary = servers.which(name)
    if binary is None:
        raise RowError(f"{name} is not installed (apt-get install {name})")
    os.chmod(workdir, 0o755)  # nginx workers run as nobody
    with procs.reserved_port(servers.HOST) as port:
        if name == "nginx":
            for sub in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"):
                os.makedirs(os.path.join(workdir, sub), exist_ok=True)
            conf = servers.render_config("nginx.conf.template", workdir, port)
            argv = [binary, "-p", workdir, "-c", conf]
        else:
            conf = servers.render_config("haproxy.cfg.template", workdir, port)
            argv = [binary, "-W", "-f", conf]
        log = os.path.join(workdir, f"{name}.log")
        proc = procs.spawn(argv, log)
        try:
            if not procs.wait_http(servers.HOST, port, START_TIMEOUT, proc):
                raise RowError(f"{name} did not answer:\n{procs.tail(log)}")

            def reload_nginx() -> None:
                subprocess.run(
                    [binary, "-p", workdir, "-c", conf, "-s", "reload"],
                    capture_output=True,
                    timeout=30,
                    check=True,
                )

            def reload_haproxy() -> None:
                os.kill(proc.pid, signal.SIGUSR2)

            action = reload_nginx if name == "nginx" else reload_haproxy
            notes = [servers.version([binary, "-v"])]
            yield Row(port, proc.pid, lambda: _peer_reload(proc.pid, action), "/", notes)
        finally:
            procs.stop(proc, signal.SIGTERM, timeout=15)


Starter = Callable[[str, list[str]], contextlib.AbstractContextManager[Row]]
#: Row id -> (label, starter(workdir, extra nodrop run args)).
ROWS: dict[str, tuple[str, Starter]] = {
    "demo": ("nodrop demo app (2 workers)", demo_row),
    "fastapi": ("FastAPI/uvicorn cell under nodrop (2 workers)", fastapi_row),
    "nginx": ("nginx -s reload (2 workers)", lambda d, a: peer_row(d, "nginx")),
    "haproxy": ("HAProxy master-worker USR2 (nbthread 2)", lambda d, a: peer_row(d, "haproxy")),
}
NODROP_ROWS = ("demo", "fastapi")


def nodrop_source() -> str:
    """Where the ``nodrop`` the rows run comes from (a worktree's src, or site-packages)."""
    import nodrop

    return str(Path(nodrop.__file__).resolve().parent)
