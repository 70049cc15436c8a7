"""Start `nodrop run` as a real process and talk to it like a user would."""

from __future__ import annotations

import os
import select
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from conftest import CHILDREN, Procs
from nodrop.load import LoadConfig, Mode
from nodrop.supervisor.control import request
from nodrop.systemd.receiver import Notification, NotifyReceiver

# The stand-in server needs only the standard library: -S (no site module)
# starts it faster, and without coverage measuring it (it is not nodrop's code).
SERVER = [sys.executable, "-S", str(CHILDREN / "server.py")]


def http_get(port: int, timeout: float = 5.0) -> str:
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as conn:
        conn.sendall(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        data = b""
        while chunk := conn.recv(4096):
            data += chunk
    return data.split(b"\r\n\r\n", 1)[1].decode()


@dataclass
class Supervised:
    proc: subprocess.Popen[bytes]
    control: str
    notify: NotifyReceiver
    log_path: Path

    def notification(self, timeout: float = 15.0) -> Notification:
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not select.select([self.notify], [], [], remaining)[0]:
                raise TimeoutError(f"no notification from the supervisor; log:\n{self.log()}")
            note = self.notify.receive()
            if note is not None:
                return note

    def wait_for_field(self, key: str, value: str = "1", timeout: float = 15.0) -> Notification:
        while True:
            note = self.notification(timeout)
            if note.fields.get(key) == value:
                return note

    def reload(self, **extra: Any) -> dict[str, Any]:
        return request(self.control, "reload", timeout=60, **extra)

    def status(self) -> dict[str, Any]:
        return request(self.control, "status", timeout=10)

    def port(self, which: int | str = 0) -> int:
        """The port of a listener, by index or name, as ``nodrop status`` reports it
        (listen on port 0 and read it back: no port is ever guessed)."""
        listeners = self.status()["listeners"]
        if isinstance(which, str):
            [item] = [item for item in listeners if item["name"] == which]
        else:
            item = listeners[which]
        return int(item["address"].rsplit(":", 1)[1])

    def cli(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "nodrop", *args, "--control", self.control],
            capture_output=True,
            text=True,
            timeout=60,
        )

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self) -> int:
        request(self.control, "stop", timeout=60)
        return self.proc.wait(timeout=30)


# Puts the socket at fd 3 and sets LISTEN_PID/LISTEN_FDS/LISTEN_FDNAMES, as
# systemd's socket activation does, then execs the command (same pid).
_ACTIVATE = (
    "import os, sys\n"
    "fd = int(sys.argv[1])\n"
    "if fd != 3:\n"
    "    os.dup2(fd, 3)\n"
    "    os.close(fd)\n"
    "os.environ.update(LISTEN_PID=str(os.getpid()), LISTEN_FDS='1', LISTEN_FDNAMES=sys.argv[2])\n"
    "os.execvp(sys.argv[3], sys.argv[3:])\n"
)


def start(
    procs: Procs,
    tmp_path: Path,
    *run_args: str,
    command: list[str] | None = None,
    env: dict[str, str] | None = None,
    activate: tuple[socket.socket, str] | None = None,
    control: str | None = None,
    output: str | None = None,
) -> Supervised:
    """`nodrop run RUN_ARGS -- COMMAND`, started as systemd would (NOTIFY_SOCKET).

    ``activate`` (a listening socket and its name) is passed as systemd's
    socket activation would pass it: at fd 3, with ``LISTEN_FDS``. A test
    that must know the port before the server starts binds port 0 itself
    and hands the socket over this way. ``control``: the control socket
    (default: in ``tmp_path``). ``output``: a file for the supervisor's
    stdout and stderr instead of the log (``/dev/full``: a full disk); the
    log is then empty.
    """
    control = control or str(tmp_path / "control.sock")
    notify = NotifyReceiver(str(tmp_path / "service-notify.sock"))
    log_path = tmp_path / "supervisor.log"
    full_env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path), NOTIFY_SOCKET=notify.path)
    full_env.update(env or {})
    argv = [sys.executable, "-m", "nodrop", "run", "--control", control, *run_args, "--"]
    argv += command if command is not None else SERVER
    pass_fds: tuple[int, ...] = ()
    if activate is not None:
        sock, name = activate
        argv = [sys.executable, "-c", _ACTIVATE, str(sock.fileno()), name, *argv]
        pass_fds = (sock.fileno(),)
    log_path.touch()
    with open(output or log_path, "wb") as log:
        proc = procs.popen(
            argv, env=full_env, stdout=log, stderr=subprocess.STDOUT, pass_fds=pass_fds
        )
    sup = Supervised(proc, control, notify, log_path)
    try:
        sup.wait_for_field("READY")
    except BaseException:
        notify.close()
        raise
    return sup


Start = Callable[..., Supervised]


def close_mode_load(
    port: int,
    *,
    duration: float = 4.0,
    reload_every: float = 1.0,
    reloads: int = 1,
    concurrency: int = 8,
) -> LoadConfig:
    """The fault tests' load: one process of ``concurrency`` clients on
    loopback, a new connection per request, 5 s per attempt; the reloader
    is called ``reloads`` times, every ``reload_every`` seconds."""
    return LoadConfig(
        host="127.0.0.1",
        port=port,
        mode=Mode.CLOSE,
        concurrency=concurrency,
        duration=duration,
        processes=1,
        reload_every=reload_every,
        reloads=reloads,
        timeout=5.0,
    )
