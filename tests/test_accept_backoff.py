"""Accept loops at the fd limit pause instead of spinning (src/nodrop/accept_backoff.py).

``accept(2)`` failing with ``EMFILE`` leaves the connection queued, so the
listening socket stays readable. The holder and the connection broker used
to log and return, be woken again at once, and spin at 100% CPU writing a
log line per turn. Each is run for real, at a soft ``RLIMIT_NOFILE`` that
leaves no free fd, with one connection waiting; its CPU time over a window
comes from ``/proc/PID/stat``.
"""

from __future__ import annotations

import contextlib
import errno
import os
import resource
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import CHILDREN, Procs
from nodrop.accept_backoff import FIRST_PAUSE, MAX_PAUSE, AcceptBackoff, out_of_resources
from nodrop.holder import client
from nodrop.testing.waiting import wait_for
from supervisor_harness import Start
from test_holder import start_holder

WINDOW = 1.0
"""Seconds of CPU time measured at the limit: the scenario, not a wait."""
MAX_CPU = 0.25
"""CPU seconds allowed in the window (a spinning loop uses about all of it)."""
WAITING = 3
"""Connections queued at the limit."""
EMFILE = OSError(errno.EMFILE, os.strerror(errno.EMFILE))


# -- the pure part ------------------------------------------------------------------


def test_an_episode_is_logged_once_and_its_pause_doubles_to_the_cap() -> None:
    lines: list[str] = []
    backoff = AcceptBackoff(lines.append, "x: accept")
    pauses = [backoff.failed(EMFILE, 10.0 + i) for i in range(8)]
    assert pauses == [min(MAX_PAUSE, FIRST_PAUSE * 2**i) for i in range(8)]
    assert backoff.paused
    assert lines == [
        "x: accept: Too many open files; pausing accepts until fds are free "
        "(clients wait in the queue)"
    ]
    backoff.accepted(13.5)
    assert not backoff.paused
    assert lines[1:] == ["x: accept: accepting again after 3.5s (8 failed attempt(s))"]
    backoff.accepted(14.0)  # no episode: nothing to say
    assert len(lines) == 2
    assert backoff.failed(EMFILE, 20.0) == FIRST_PAUSE  # a new episode starts short
    assert len(lines) == 3


@pytest.mark.parametrize(
    ("code", "pause"),
    [
        (errno.EMFILE, True),
        (errno.ENFILE, True),
        (errno.ENOBUFS, True),
        (errno.ENOMEM, True),
        (errno.ECONNABORTED, False),
        (errno.EPERM, False),
    ],
)
def test_which_accept_errors_pause(code: int, pause: bool) -> None:
    assert out_of_resources(OSError(code, os.strerror(code))) is pause


# -- real processes -----------------------------------------------------------------


def cpu_seconds(pid: int) -> float:
    """utime + stime of ``pid``, from /proc/PID/stat."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def cpu_over(pid: int, seconds: float) -> float:
    before = cpu_seconds(pid)
    time.sleep(seconds)  # the window measured
    return cpu_seconds(pid) - before


def accept_lines(log: str) -> int:
    return sum("accept" in line for line in log.splitlines())


def no_free_fd(pid: int) -> int:
    """The soft limit that leaves ``pid`` no fd to open: its lowest free number."""
    used = {int(fd) for fd in os.listdir(f"/proc/{pid}/fd")}
    return min(set(range(len(used) + 1)) - used)


def at_limit(pid: int) -> tuple[int, int]:
    """Lower ``pid``'s soft RLIMIT_NOFILE (only) so no fd is free; returns the
    limits to restore."""
    old = resource.prlimit(pid, resource.RLIMIT_NOFILE)
    resource.prlimit(pid, resource.RLIMIT_NOFILE, (no_free_fd(pid), old[1]))
    return old


def connect_waiting(path: str) -> list[socket.socket]:
    """Connections that stay queued: more than the process can accept (the
    fds it was closing while its limit was set may leave room for one)."""
    out = []
    for _ in range(WAITING):
        conn = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        out.append(conn)
        conn.connect(path)
    return out


def test_the_holder_at_its_fd_limit_pauses_accepting(procs: Procs, tmp_path: Path) -> None:
    holder = start_holder(procs, tmp_path)
    old = at_limit(holder.pid)
    waiting = connect_waiting(holder.path)
    try:
        wait_for(lambda: "Too many open files" in holder.log_text(), what="the first EMFILE")
        cpu = cpu_over(holder.pid, WINDOW)
        log = holder.log_text()
        assert cpu < MAX_CPU, f"the holder spun: {cpu:.2f}s of CPU in {WINDOW:g}s"
        assert accept_lines(log) == 1, log  # one line for the whole episode
        resource.prlimit(holder.pid, resource.RLIMIT_NOFILE, old)
        # Within a pause (at most MAX_PAUSE) the queued peers are taken...
        wait_for(lambda: "accepting again" in holder.log_text(), timeout=10, what="recovery")
        # ...and served.
        assert client.list_parked(holder.path) == []
    finally:
        for conn in waiting:
            conn.close()


def test_the_broker_at_its_fd_limit_pauses_accepting(procs: Procs, tmp_path: Path) -> None:
    path = str(tmp_path / "broker.sock")
    out = tmp_path / "broker.out"
    with open(out, "wb") as sink:  # a file: a spinning child must not block on a pipe
        proc = procs.popen(
            [sys.executable, str(CHILDREN / "broker_at_limit.py"), path],
            stdin=subprocess.PIPE,
            stdout=sink,
        )
    wait_for(lambda: "limit" in out.read_text(), what="the broker at its limit")
    old = at_limit(proc.pid)
    waiting = connect_waiting(path)
    try:
        wait_for(lambda: "Too many open files" in out.read_text(), what="the first EMFILE")
        cpu = cpu_over(proc.pid, WINDOW)
        log = out.read_text()
        assert cpu < MAX_CPU, f"the broker spun: {cpu:.2f}s of CPU in {WINDOW:g}s"
        assert accept_lines(log) == 1, log
        resource.prlimit(proc.pid, resource.RLIMIT_NOFILE, old)
        wait_for(lambda: "accepting again" in out.read_text(), timeout=10, what="recovery")
    finally:
        for conn in waiting:
            conn.close()
    assert proc.stdin is not None
    proc.stdin.close()
    assert proc.wait(10) == 0


def test_a_uvicorn_worker_at_its_fd_limit_pauses_accepting(supervise: Start) -> None:
    """nodrop's own accept loop (``adapters/accept.py``, every ASGI adapter)
    under ``nodrop run``: at the limit it pauses, then serves the clients
    that waited in the queue."""
    pytest.importorskip("uvicorn")
    servers = str(CHILDREN / "servers")
    sup = supervise(
        "--listen", "tcp://127.0.0.1:0", "--workers", "1", "--no-handoff",
        command=[sys.executable, "-m", "nodrop.adapters.uvicorn", "stack_starlette:app",
                 "--loop", "asyncio", "--http", "h11", "--log-level", "warning"],
        env={"PYTHONPATH": os.pathsep.join([servers, *sys.path]), "STARTUP_SECONDS": "0"},
    )  # fmt: skip
    [worker] = sup.status()["generations"][-1]["workers"]
    pid = int(worker["pid"])
    port = sup.port()
    limits = at_limit(pid)
    old: tuple[int, int] | None = limits
    waiting = [socket.create_connection(("127.0.0.1", port), timeout=10) for _ in range(WAITING)]
    try:
        # The clients are queued: a loop that spins does so from now on.
        cpu = cpu_over(pid, WINDOW)
        assert cpu < MAX_CPU, f"the worker spun: {cpu:.2f}s of CPU in {WINDOW:g}s"
        wait_for(lambda: "Too many open files" in sup.log(), what="the first EMFILE")
        assert sup.log().count("Too many open files") == 1, sup.log()[-2000:]
        resource.prlimit(pid, resource.RLIMIT_NOFILE, limits)
        old = None
        for conn in waiting:
            conn.sendall(b"GET /fast HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            assert conn.recv(4096).startswith(b"HTTP/1.1 200"), "a queued client was not served"
        wait_for(lambda: "accepting again" in sup.log(), timeout=10, what="recovery")
    finally:
        for conn in waiting:
            conn.close()
        if old is not None:  # failed at the limit: give the worker its fds back to exit
            with contextlib.suppress(ProcessLookupError):
                resource.prlimit(pid, resource.RLIMIT_NOFILE, old)
    assert sup.stop() == 0
