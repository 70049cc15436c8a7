"""Process plumbing for the matrix: spawn, find children, wait, stop -- by pid only.

Every server is started in its own session (``start_new_session``) so that a
last-resort ``killpg`` reaches exactly the processes this script started and
nothing else. Every wait has a deadline.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Iterator, Sequence

from nodrop.load.http import ResponseParser, build_request
from nodrop.testing.waiting import wait_for

#: Poll interval while waiting for processes to appear or exit (seconds).
POLL = 0.005


@contextlib.contextmanager
def reserved_port(host: str = "127.0.0.1") -> Iterator[int]:
    """A port of our own for a server that binds it itself, held while the row runs.

    A socket bound to port 0 and never listening keeps the port: the kernel
    gives it to no one else's ``bind(0)``, and a connection to it is refused
    while nothing listens. It has ``SO_REUSEADDR`` and ``SO_REUSEPORT`` set,
    so the server may bind the same port (nginx, gunicorn and HAProxy set
    ``SO_REUSEADDR``, the demo app ``SO_REUSEPORT``); since it never listens,
    it never receives a connection. (Binding, closing and reusing a port
    instead races with every other process on the host.)
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind((host, 0))
        yield int(sock.getsockname()[1])


def spawn(
    argv: Sequence[str], log_path: str, env: dict[str, str] | None = None
) -> subprocess.Popen[bytes]:
    """Start ``argv`` in a new session, stdout and stderr to ``log_path``."""
    with open(log_path, "ab") as log:
        return subprocess.Popen(
            list(argv),
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,
        )


def parent_of(pid: int) -> int | None:
    """The parent pid from ``/proc/PID/stat``, or None if the process is gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except OSError:
        return None
    # The command name may contain spaces and parentheses: split after the last ')'.
    fields = stat[stat.rfind(b")") + 2 :].split()
    return int(fields[1]) if len(fields) > 1 else None


def is_zombie_or_gone(pid: int) -> bool:
    """True when ``pid`` has exited (gone, or a zombie not yet reaped)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except OSError:
        return True
    return stat[stat.rfind(b")") + 2 :].startswith(b"Z")


def children_of(pid: int) -> set[int]:
    """Live child pids of ``pid`` (scans /proc)."""
    found: set[int] = set()
    for name in os.listdir("/proc"):
        if name.isdigit() and parent_of(int(name)) == pid and not is_zombie_or_gone(int(name)):
            found.add(int(name))
    return found


def wait_until(predicate: Callable[[], bool], timeout: float) -> float | None:
    """Poll ``predicate`` until true; the monotonic time it became true, or None on timeout."""
    try:
        wait_for(predicate, timeout, interval=POLL)
    except TimeoutError:
        return None
    return time.monotonic()


def http_ok(host: str, port: int, timeout: float = 1.0) -> bool:
    """One ``Connection: close`` GET /; True on a complete 2xx response."""
    parser = ResponseParser()
    try:
        with socket.create_connection((host, port), timeout=timeout) as s:
            s.sendall(build_request(host, port, "/", keep_alive=False))
            while not parser.complete:
                data = s.recv(65536)
                if not data:
                    parser.feed_eof()
                    break
                parser.feed(data)
    except Exception:
        return False
    return parser.complete and parser.status is not None and 200 <= parser.status < 300


def wait_http(
    host: str, port: int, timeout: float, proc: subprocess.Popen[bytes] | None = None
) -> bool:
    """Wait until the server answers 200 (False on timeout or if ``proc`` exits)."""

    def exited() -> bool:
        return proc is not None and proc.poll() is not None

    try:
        wait_for(lambda: exited() or http_ok(host, port), timeout, interval=0.05)
    except TimeoutError:
        return False
    return not exited()


def stop(proc: subprocess.Popen[bytes], sig: int = signal.SIGTERM, timeout: float = 15.0) -> None:
    """Ask a process we started to stop; after ``timeout`` kill its whole session.

    The session is the one ``spawn`` created for it, so only our processes
    are reached.
    """
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(proc.pid, sig)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=timeout)
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)  # stragglers of the session (workers)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=10)


def tail(path: str, chars: int = 1500) -> str:
    """The end of a log file, for error messages."""
    try:
        with open(path, errors="replace") as f:
            return f.read()[-chars:]
    except OSError:
        return ""
