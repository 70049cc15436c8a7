"""Shared fixtures: processes the test owns, fd-leak checks, child scripts.

Rules every test follows: wait on events (a pipe byte, EOF, a socket), never
on sleeps; every wait has a deadline; every process started is reaped.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import select
import signal
import socket
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from nodrop.testing.waiting import wait_for

__all__ = ["CHILDREN", "HERE", "Procs", "wait_for", "waitpid_status"]

HERE = Path(__file__).parent
CHILDREN = HERE / "children"


def open_fds() -> set[int]:
    return {int(name) for name in os.listdir("/proc/self/fd")}


def fd_targets(fds: set[int]) -> dict[int, str]:
    out = {}
    for fd in fds:
        with contextlib.suppress(OSError):
            out[fd] = os.readlink(f"/proc/self/fd/{fd}")
    return out


@pytest.fixture(autouse=True)
def no_fd_leaks(request: pytest.FixtureRequest) -> Iterator[None]:
    """Fail a test that leaves fds open behind it."""
    before = open_fds()
    yield
    if request.node.get_closest_marker("allow_fd_leak"):
        return
    leaked = fd_targets(open_fds() - before)
    # A fd that /proc already shows as gone (the listdir's own) is not a leak.
    leaked = {fd: target for fd, target in leaked.items() if target}
    assert not leaked, f"test leaked fds: {leaked}"


@pytest.fixture(scope="session")
def uvloop_warmed_up() -> None:
    """uvloop opens a pipe, once per process, with its first loop: open it
    before the fd-leak check looks. A module whose tests run uvloop loops in
    process uses it (``pytestmark = pytest.mark.usefixtures("uvloop_warmed_up")``);
    being session-scoped, it is set up before the function-scoped
    :func:`no_fd_leaks` takes its snapshot, so that pipe alone is exempt."""
    try:
        import uvloop
    except ImportError:
        return
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(asyncio.sleep(0))


@dataclass
class Procs:
    """Owns every process a test starts; reaps them all at the end."""

    pids: list[int] = field(default_factory=list)
    popens: list[subprocess.Popen[bytes]] = field(default_factory=list)

    def adopt(self, pid: int) -> int:
        self.pids.append(pid)
        return pid

    def popen(self, argv: list[str], **kwargs: object) -> subprocess.Popen[bytes]:
        kwargs.setdefault("start_new_session", True)
        proc: subprocess.Popen[bytes] = subprocess.Popen(argv, **kwargs)  # type: ignore[call-overload]
        self.popens.append(proc)
        return proc

    def python(self, code: str, *args: str, **kwargs: object) -> subprocess.Popen[bytes]:
        return self.popen([sys.executable, "-c", code, *args], **kwargs)

    def cleanup(self) -> None:
        for proc in self.popens:
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(proc.pid, signal.SIGKILL)
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
            proc.wait(timeout=10)
            for stream in (proc.stdin, proc.stdout, proc.stderr):
                if stream is not None:
                    stream.close()
        for pid in self.pids:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(pid, signal.SIGKILL)
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
            with contextlib.suppress(ChildProcessError):
                os.waitpid(pid, 0)


@pytest.fixture
def procs() -> Iterator[Procs]:
    owner = Procs()
    try:
        yield owner
    finally:
        owner.cleanup()


@pytest.fixture
def refused_port() -> Iterator[int]:
    """A port that refuses connections for the whole test: bound (port 0) but
    never listening, so the kernel answers a SYN with RST and no other test
    can take the port meanwhile."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        yield sock.getsockname()[1]


def waitpid_status(pid: int, timeout: float = 10.0) -> int:
    """Wait for a child we spawned; return its exit code (-signal if killed)."""
    pidfd = os.pidfd_open(pid)
    try:
        if not select.select([pidfd], [], [], timeout)[0]:
            raise TimeoutError(f"pid {pid} did not exit within {timeout}s")
    finally:
        os.close(pidfd)
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status)


@pytest.fixture
def supervise(procs: Procs, tmp_path: Path) -> Iterator[Callable[..., Any]]:
    """Start `nodrop run` supervisors (:func:`supervisor_harness.start`); each
    is stopped (SIGTERM, SIGKILL after 30 s) and its notify socket closed
    after the test."""
    from supervisor_harness import Supervised, start

    started: list[Supervised] = []

    def _start(*args: str, **kwargs: Any) -> Supervised:
        sup = start(procs, tmp_path, *args, **kwargs)
        started.append(sup)
        return sup

    yield _start
    for sup in started:
        if sup.proc.poll() is None:
            sup.proc.send_signal(signal.SIGTERM)
            try:
                sup.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                sup.proc.kill()
                sup.proc.wait(timeout=10)
        sup.notify.close()
