"""The rows of the matrix: start a server, reload it, stop it.

Each ``start_*`` is a context manager yielding a :class:`Target`: where to
send load and a ``reload()`` that returns a
:class:`~nodrop.load.reload.ReloadRecord` with a window as exact as the tool
allows -- from the reload request until the old generation's processes have
exited (nodrop's supervisor says so itself; for the other tools the old
worker pids are watched in /proc).

All servers bind 127.0.0.1 and are started with config files, pid files and
logs in the row's private temporary directory, and stopped by pid.
"""

from __future__ import annotations

import contextlib
import os
import select
import shutil
import signal
import string
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from baselines import procs
from nodrop.errors import NodropError
from nodrop.load.control_reloader import ControlReloader
from nodrop.load.reload import ReloadRecord
from nodrop.supervisor.control import request
from nodrop.systemd.receiver import NotifyReceiver

HERE = Path(__file__).resolve().parent
HOST = "127.0.0.1"
#: Worker processes per generation, for every tool that has a notion of it.
WORKERS = 2
#: Deadline for a server to start, and for one reload to finish (seconds).
START_TIMEOUT = 30.0
RELOAD_TIMEOUT = 30.0


class StartError(NodropError):
    """A server could not be started; the row is reported as not run."""


@dataclass
class Target:
    """A running server under test.

    Attributes:
        port: where it listens on 127.0.0.1.
        reload: one reload, returning its record (never raises).
        notes: facts worth printing next to the row (versions, methods).
    """

    port: int
    reload: Callable[[], ReloadRecord]
    notes: list[str] = field(default_factory=list)


def _guarded(action: Callable[[float], ReloadRecord]) -> Callable[[], ReloadRecord]:
    """Wrap a reload so that an exception becomes a failed record."""

    def reload() -> ReloadRecord:
        started = time.monotonic()
        try:
            return action(started)
        except Exception as exc:
            return ReloadRecord(
                started, None, None, False, f"reload raised {exc!r}", time.monotonic()
            )

    return reload


def _watch_handover(started: float, master: int, old: set[int], what: str) -> ReloadRecord:
    """After a reload signal: wait for a new worker to appear and every old one to exit."""
    ready = procs.wait_until(lambda: bool(procs.children_of(master) - old), RELOAD_TIMEOUT)
    exited = procs.wait_until(lambda: all(procs.is_zombie_or_gone(p) for p in old), RELOAD_TIMEOUT)
    ok = ready is not None and exited is not None
    message = f"{what}: old workers {sorted(old)} " + ("exited" if exited else "still running")
    return ReloadRecord(started, ready, exited, ok, message, time.monotonic())


# --- availability -----------------------------------------------------------


def which(tool: str) -> str | None:
    """The path of a tool: the venv's bin first (gunicorn), then PATH and sbin."""
    venv_bin = str(Path(sys.executable).parent)
    path = os.pathsep.join([venv_bin, os.environ.get("PATH", ""), "/usr/sbin", "/sbin"])
    return shutil.which(tool, path=path)


def version(argv: list[str]) -> str:
    """First line a tool prints about its version ('' if it cannot run)."""
    try:
        out = subprocess.run(argv, capture_output=True, text=True, timeout=10, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return ""
    text = (out.stdout or out.stderr).strip()
    return text.splitlines()[0] if text else ""


# --- nodrop -----------------------------------------------------------------


def _wait_notify_ready(
    receiver: NotifyReceiver, count: int, proc: subprocess.Popen[bytes], timeout: float
) -> set[int]:
    """Wait for ``READY=1`` from ``count`` distinct pids; returns them.

    Raises:
        StartError: the process exited or the deadline passed.
    """
    ready: set[int] = set()
    deadline = time.monotonic() + timeout
    while len(ready) < count:
        left = deadline - time.monotonic()
        if left <= 0 or proc.poll() is not None:
            raise StartError(f"not ready (READY=1 from {len(ready)} of {count})")
        if select.select([receiver], [], [], min(left, 0.2))[0]:
            with contextlib.suppress(NodropError):
                note = receiver.receive()
                if note is not None:
                    note.close_fds()
                    if note.fields.get("READY") == "1":
                        ready.add(note.pid)
    return ready


@contextlib.contextmanager
def start_nodrop(
    workdir: str, strategy: str, app: list[str], *, handoff: bool = False
) -> Iterator[Target]:
    """The demo app (``app``: its argv), 2 workers, under ``nodrop run --strategy STRATEGY``
    (``--handoff``: with the connection broker, so idle connections move across)."""
    control = os.path.join(workdir, "control.sock")
    log_path = os.path.join(workdir, f"nodrop-{strategy}.log")
    receiver = NotifyReceiver(os.path.join(workdir, "notify"))
    argv = [
        sys.executable, "-m", "nodrop", "run",
        "--control", control,
        "--listen", f"tcp://{HOST}:0?name=web",
        "--workers", str(WORKERS),
        "--strategy", strategy,
        "--ready-grace", "0.2",
        "--drain-timeout", "10",
        "--handoff" if handoff else "--no-handoff",
        "--", *app,
    ]  # fmt: skip
    proc = procs.spawn(argv, log_path, env=dict(os.environ, NOTIFY_SOCKET=receiver.path))
    try:
        try:
            _wait_notify_ready(receiver, 1, proc, START_TIMEOUT)
            status = request(control, "status", timeout=10)
            port = int(status["listeners"][0]["address"].rsplit(":", 1)[1])
        except (NodropError, KeyError, IndexError, ValueError) as exc:
            raise StartError(
                f"nodrop run --strategy {strategy}: {exc}\n{procs.tail(log_path)}"
            ) from exc
        notes = [
            line.removeprefix("nodrop: ").strip()
            for line in procs.tail(log_path, 4000).splitlines()
            if workdir not in line
            and any(word in line for word in ("strategy", "warning", "handoff", "broker"))
        ]
        yield Target(port, ControlReloader(control, timeout=RELOAD_TIMEOUT).reload, notes[:3])
    finally:
        with contextlib.suppress(NodropError):
            request(control, "stop", timeout=20)
        procs.stop(proc, timeout=20)
        receiver.close()


# --- the naive baselines: the same demo app, without a supervisor --------------


class _DemoApps:
    """Generations of ``WORKERS`` demo-app processes, each binding the port itself.

    The demo app binds with SO_REUSEPORT when given ``--port``, so two
    generations can listen at once; on SIGTERM it stops accepting, finishes
    its requests and exits, closing its listener.
    """

    def __init__(self, workdir: str, port: int, app: list[str]) -> None:
        self.app = app
        self.workdir = workdir
        self.port = port
        self.receiver = NotifyReceiver(os.path.join(workdir, "notify"))
        self.current: list[subprocess.Popen[bytes]] = []
        self.all: list[subprocess.Popen[bytes]] = []
        self.generation = 0

    def start_generation(self) -> list[subprocess.Popen[bytes]]:
        self.generation += 1
        env = dict(
            os.environ, NOTIFY_SOCKET=self.receiver.path, NODROP_GENERATION=str(self.generation)
        )
        log_path = os.path.join(self.workdir, "demo-app.log")
        argv = [*self.app, "--port", str(self.port)]
        gen = [procs.spawn(argv, log_path, env=env) for _ in range(WORKERS)]
        self.all += gen
        ready: set[int] = set()
        deadline = time.monotonic() + START_TIMEOUT
        while not {p.pid for p in gen} <= ready:
            dead = [p for p in gen if p.poll() is not None]
            if dead or time.monotonic() > deadline:
                raise StartError(f"demo app did not start:\n{procs.tail(log_path)}")
            ready |= _wait_notify_ready(self.receiver, 1, gen[0], deadline - time.monotonic())
        return gen

    @staticmethod
    def stop_generation(gen: list[subprocess.Popen[bytes]]) -> float | None:
        for p in gen:
            with contextlib.suppress(ProcessLookupError):
                os.kill(p.pid, signal.SIGTERM)
        return procs.wait_until(lambda: all(p.poll() is not None for p in gen), RELOAD_TIMEOUT)

    def close(self) -> None:
        for p in self.all:
            procs.stop(p, timeout=5)
        self.receiver.close()


@contextlib.contextmanager
def start_naive(workdir: str, kind: str, app: list[str]) -> Iterator[Target]:
    """``stop-start``: SIGTERM the old processes, wait for them, start new ones.
    ``reuseport``: start new processes on the same port (SO_REUSEPORT, no
    migration), then SIGTERM the old ones."""
    with procs.reserved_port(HOST) as port:
        yield from _run_naive(workdir, kind, _DemoApps(workdir, port, app))


def _run_naive(workdir: str, kind: str, apps: _DemoApps) -> Iterator[Target]:
    try:
        apps.current = apps.start_generation()

        def stop_start(started: float) -> ReloadRecord:
            old = apps.current
            exited = apps.stop_generation(old)
            apps.current = apps.start_generation()
            ready = time.monotonic()
            return ReloadRecord(
                started, ready, exited, exited is not None, "stopped, then started", ready
            )

        def reuseport(started: float) -> ReloadRecord:
            old = apps.current
            apps.current = apps.start_generation()
            ready = time.monotonic()
            exited = apps.stop_generation(old)
            return ReloadRecord(
                started,
                ready,
                exited,
                exited is not None,
                "started beside, then stopped old",
                time.monotonic(),
            )

        action = stop_start if kind == "stop-start" else reuseport
        notes = [f"{WORKERS} demo-app processes, each binding 127.0.0.1 with SO_REUSEPORT"]
        if kind == "reuseport":
            with contextlib.suppress(OSError):
                notes.append(
                    "net.ipv4.tcp_migrate_req="
                    + Path("/proc/sys/net/ipv4/tcp_migrate_req").read_text().strip()
                )
        yield Target(apps.port, _guarded(action), notes)
    finally:
        apps.close()


# --- nginx, HAProxy, gunicorn ---------------------------------------------------


def render_config(template: str, workdir: str, port: int) -> str:
    text = string.Template((HERE / template).read_text()).substitute(dir=workdir, port=port)
    path = os.path.join(workdir, template.removesuffix(".template"))
    Path(path).write_text(text)
    return path


@contextlib.contextmanager
def _master(
    argv: list[str], workdir: str, name: str, port: int
) -> Iterator[subprocess.Popen[bytes]]:
    log_path = os.path.join(workdir, f"{name}.log")
    proc = procs.spawn(argv, log_path)
    try:
        if not procs.wait_http(HOST, port, START_TIMEOUT, proc):
            raise StartError(f"{name} did not answer:\n{procs.tail(log_path)}")
        yield proc
    finally:
        procs.stop(proc, signal.SIGTERM, timeout=15)


@contextlib.contextmanager
def start_nginx(workdir: str, app: list[str]) -> Iterator[Target]:
    """nginx, 2 workers, ``return 200``; reloaded with ``nginx -s reload``."""
    del app  # nginx serves its own response
    nginx = which("nginx")
    if nginx is None:
        raise StartError("nginx is not installed")
    with procs.reserved_port(HOST) as port:
        for sub in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"):
            os.makedirs(os.path.join(workdir, sub), exist_ok=True)
        conf = render_config("nginx.conf.template", workdir, port)
        with _master([nginx, "-p", workdir, "-c", conf], workdir, "nginx", port) as proc:

            def action(started: float) -> ReloadRecord:
                old = procs.children_of(proc.pid)
                subprocess.run(
                    [nginx, "-p", workdir, "-c", conf, "-s", "reload"],
                    capture_output=True,
                    timeout=30,
                    check=True,
                )
                return _watch_handover(started, proc.pid, old, "nginx -s reload")

            yield Target(port, _guarded(action), [version([nginx, "-v"])])


@contextlib.contextmanager
def start_haproxy(workdir: str, app: list[str]) -> Iterator[Target]:
    """HAProxy master-worker (``-W``), answering itself; reloaded with SIGUSR2 to the master."""
    del app
    haproxy = which("haproxy")
    if haproxy is None:
        raise StartError("haproxy is not installed")
    with procs.reserved_port(HOST) as port:
        conf = render_config("haproxy.cfg.template", workdir, port)
        with _master([haproxy, "-W", "-f", conf], workdir, "haproxy", port) as proc:

            def action(started: float) -> ReloadRecord:
                old = procs.children_of(proc.pid)
                os.kill(proc.pid, signal.SIGUSR2)
                return _watch_handover(started, proc.pid, old, "SIGUSR2 to the master")

            yield Target(port, _guarded(action), [version([haproxy, "-v"])])


@contextlib.contextmanager
def start_gunicorn(workdir: str, app: list[str]) -> Iterator[Target]:
    """gunicorn, 2 gthread workers, a tiny WSGI app; reloaded with SIGHUP to the master."""
    del app
    gunicorn = which("gunicorn")
    if gunicorn is None:
        raise StartError("gunicorn is not installed (pip install gunicorn)")
    with procs.reserved_port(HOST) as port:
        argv = [
            gunicorn, "--chdir", str(HERE), "--bind", f"{HOST}:{port}",
            "--workers", str(WORKERS), "--worker-class", "gthread", "--threads", "8",
            "--keep-alive", "60", "--graceful-timeout", "10",
            "--pid", os.path.join(workdir, "gunicorn.pid"),
            "--worker-tmp-dir", workdir, "--log-level", "warning",
            "wsgi_app:app",
        ]  # fmt: skip
        with _master(argv, workdir, "gunicorn", port) as proc:

            def action(started: float) -> ReloadRecord:
                old = procs.children_of(proc.pid)
                os.kill(proc.pid, signal.SIGHUP)
                return _watch_handover(started, proc.pid, old, "SIGHUP to the master")

            notes = [version([gunicorn, "--version"]) + ", gthread workers, keep-alive 60 s"]
            yield Target(port, _guarded(action), notes)


#: The demo app's argv (``--port`` is appended for the naive rows).
DEMO_APP = [sys.executable, "-m", "nodrop.demo.app"]

Starter = Callable[[str, list[str]], contextlib.AbstractContextManager[Target]]
#: Row id -> (label, starter taking the row's work directory and the demo app's argv).
ROWS: dict[str, tuple[str, Starter]] = {
    "nodrop-inherit": ("nodrop run (inherit)", lambda d, a: start_nodrop(d, "inherit", a)),
    "nodrop-handoff": (
        "nodrop run (inherit, --handoff)",
        lambda d, a: start_nodrop(d, "inherit", a, handoff=True),
    ),
    "nodrop-reuseport": ("nodrop run (reuseport)", lambda d, a: start_nodrop(d, "reuseport", a)),
    "naive-stop-start": ("naive stop-then-start", lambda d, a: start_naive(d, "stop-start", a)),
    "naive-reuseport": ("naive SO_REUSEPORT handover", lambda d, a: start_naive(d, "reuseport", a)),
    "nginx": ("nginx -s reload", start_nginx),
    "haproxy": ("HAProxy master-worker USR2", start_haproxy),
    "gunicorn": ("gunicorn gthread HUP", start_gunicorn),
}
