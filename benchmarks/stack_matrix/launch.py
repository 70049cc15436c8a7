"""Start a cell, reload it, stop it: under ``nodrop run``, or under the
server's own master for the ``own`` rows.

The app version and start-up time reach every generation through the
environment: under ``nodrop run`` through a ``--config`` file holding only
an ``[env]`` table, which the supervisor reads again on every reload (so the
next generation can be ``APP_VERSION=broken-start``); the command line and
the listener stay on the command line.
"""

from __future__ import annotations

import contextlib
import json
import os
import select
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from nodrop.supervisor.control import request
from stack_matrix.cells import APPS, Cell, Kind

DEFAULT_STARTUP = 1.0
START_TIMEOUT = 60.0
RELOAD_TIMEOUT = 120.0
DRAIN_WAIT = 60.0
NODROP_OPTIONS = ("--ready-timeout", "60", "--drain-timeout", "30")
"""What every nodrop cell runs with beyond the listener and the workers."""


@dataclass(frozen=True)
class ReloadResult:
    ok: bool
    message: str
    duration: float
    generation: int | None = None

    @classmethod
    def from_answer(cls, answer: dict[str, Any], elapsed: float) -> ReloadResult:
        """From the control socket's answer to ``reload``."""
        return cls(
            bool(answer.get("ok")),
            str(answer.get("message")),
            float(answer.get("duration") or elapsed),
            answer.get("generation"),
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "message": self.message,
            "duration": round(self.duration, 3),
            "generation": self.generation,
        }


def child_pythonpath(extra: list[str] | None = None) -> str:
    """The apps first, then this interpreter's path (so the children import
    the same nodrop as this process, e.g. a branch's ``src`` on PYTHONPATH)."""
    return os.pathsep.join([str(APPS), *(extra or []), *[p for p in sys.path if p]])


def app_env(cell: Cell, version: str = "good", startup: float = DEFAULT_STARTUP) -> dict[str, str]:
    return {"APP_VERSION": version, "STARTUP_SECONDS": f"{startup:g}", **cell.env}


def write_env_config(path: Path, env: dict[str, str]) -> None:
    """A ``nodrop run --config`` file with only an ``[env]`` table."""
    lines = ["[env]"] + [f"{key} = {json.dumps(value)}" for key, value in sorted(env.items())]
    tmp = path.with_suffix(".tmp")
    tmp.write_text("\n".join(lines) + "\n")
    tmp.replace(path)  # the supervisor never reads half a file


def nodrop_run_args(cell: Cell, config: Path) -> list[str]:
    """``nodrop run`` options for a cell (after ``--control``, before ``--``)."""
    return [
        "--config", str(config), "--listen", "tcp://127.0.0.1:0",
        "--workers", str(cell.workers), *NODROP_OPTIONS, *cell.run_args,
    ]  # fmt: skip


def wait_drained(status: Callable[[], dict[str, Any] | None], timeout: float = DRAIN_WAIT) -> bool:
    """Poll ``nodrop status`` until no generation is starting or draining.

    Returns:
        False if one still was after ``timeout`` seconds.
    """
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        answer = status()
        if answer is None:
            return True
        busy = [g for g in answer["generations"] if g["state"] in ("draining", "starting")]
        if not busy and not answer.get("reload_in_progress"):
            return True
        time.sleep(0.05)
    return False


class StartError(Exception):
    """The stack did not come up; the message carries its log's tail."""


class Stack:
    """A running cell: ``port``, :meth:`reload`, :meth:`settle`, :meth:`stop`."""

    port: int

    def __init__(self, cell: Cell, workdir: Path) -> None:
        self.cell = cell
        self.workdir = workdir
        self.log_path = workdir / "server.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def log(self, tail: int = 3000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-tail:]
        except OSError:
            return ""

    def reload(self) -> ReloadResult:
        raise NotImplementedError

    def settle(self) -> None:
        """Wait until no old generation is draining (bounded)."""

    def stop(self) -> int | None:
        """Stop gracefully; kill the process group if that takes over 30 s."""
        proc = self.proc
        if proc is None:
            return None
        if proc.poll() is None:
            self._ask_to_stop()
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=30)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)  # whatever is left of the group
        code = proc.wait(timeout=10)
        self.close()
        return code

    def _ask_to_stop(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)

    def close(self) -> None:
        """Release what the harness holds (fds)."""

    def _popen(self, argv: list[str], env: dict[str, str], pass_fds: tuple[int, ...] = ()) -> None:
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(
                argv,
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                pass_fds=pass_fds,
                start_new_session=True,
            )

    def _check_alive(self, what: str) -> None:
        assert self.proc is not None
        if self.proc.poll() is not None:
            raise StartError(f"{what}: exited with {self.proc.returncode}\n{self.log()}")


class NodropStack(Stack):
    """``nodrop run ... -- CMD``; reloads with the control socket."""

    def __init__(self, cell: Cell, workdir: Path, startup: float = DEFAULT_STARTUP) -> None:
        super().__init__(cell, workdir)
        self.control = str(workdir / "control.sock")
        self.config = workdir / "nodrop.toml"
        self.startup = startup
        self.set_version("good")

    def set_version(self, version: str) -> None:
        """The app version the next generation starts with."""
        write_env_config(self.config, app_env(self.cell, version, self.startup))

    def start(self) -> NodropStack:
        argv = [sys.executable, "-m", "nodrop", "run", "--control", self.control]
        argv += [*nodrop_run_args(self.cell, self.config), "--", *self.cell.command()]
        env = dict(os.environ, PYTHONPATH=child_pythonpath())
        env.pop("NOTIFY_SOCKET", None)
        self._popen(argv, env)
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            self._check_alive("nodrop run")
            status = self._status()
            if status is not None and status.get("active_generation") is not None:
                address = status["listeners"][0]["address"]
                self.port = int(address.rsplit(":", 1)[1])
                return self
            if time.monotonic() > deadline:
                raise StartError(f"not serving after {START_TIMEOUT:g}s\n{self.log()}")
            time.sleep(0.05)

    def _status(self) -> dict[str, Any] | None:
        if not os.path.exists(self.control):
            return None
        try:
            return request(self.control, "status", timeout=10)
        except Exception:  # not up yet, or gone: the caller's deadline decides
            return None

    def status(self) -> dict[str, Any]:
        return request(self.control, "status", timeout=10)

    def reload(self) -> ReloadResult:
        started = time.monotonic()
        try:
            answer = request(self.control, "reload", wait="ready", timeout=RELOAD_TIMEOUT)
        except Exception as exc:
            return ReloadResult(False, f"control socket: {exc!r}", time.monotonic() - started)
        return ReloadResult.from_answer(answer, time.monotonic() - started)

    def settle(self) -> None:
        wait_drained(self._status)

    def _ask_to_stop(self) -> None:
        try:
            request(self.control, "stop", timeout=5)
        except Exception:
            super()._ask_to_stop()


class OwnStack(Stack):
    """The server's own master on a socket the harness bound (port 0), passed
    as ``{fd}``; reloaded with the cell's signal. The servers tell nobody
    when a reload is done, so the apps do: each process appends its pid to
    ``STACKS_READY_FILE`` once its start-up completed. A reload is done when
    every old worker has exited and as many new ones reported ready."""

    def __init__(
        self, cell: Cell, workdir: Path, startup: float = DEFAULT_STARTUP, workers: int = 2
    ) -> None:
        super().__init__(cell, workdir)
        self.startup = startup
        self.workers = workers
        self.ready_file = workdir / "ready.pids"
        self._pidfds: dict[int, int] = {}
        self._seen: set[int] = set()
        self._read_at = 0

    def start(self) -> OwnStack:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            sock.listen(1024)
            self.port = sock.getsockname()[1]
            fd = sock.fileno()
            os.set_inheritable(fd, True)
            env = dict(
                os.environ,
                PYTHONPATH=child_pythonpath(),
                **app_env(self.cell, "good", self.startup),
            )
            env["STACKS_READY_FILE"] = str(self.ready_file)
            for name in ("NOTIFY_SOCKET", "LISTEN_FDS", "LISTEN_PID", "NODROP_GENERATION"):
                env.pop(name, None)
            self._popen(self.cell.command(fd), env, pass_fds=(fd,))
        # Our copy is closed: if the server dies, connecting is refused, as it would be.
        deadline = time.monotonic() + START_TIMEOUT
        while len(self._live()) < self.workers:
            self._check_alive(self.cell.id)
            if time.monotonic() > deadline:
                raise StartError(
                    f"{len(self._live())} of {self.workers} workers ready after {START_TIMEOUT:g}s\n{self.log()}"
                )
            time.sleep(0.05)
        return self

    def _live(self) -> set[int]:
        """Pids that reported ready and have not exited."""
        try:
            with open(self.ready_file, "rb") as f:
                f.seek(self._read_at)
                data = f.read()
        except FileNotFoundError:
            data = b""
        complete = data[: data.rfind(b"\n") + 1]
        self._read_at += len(complete)
        for line in complete.splitlines():
            pid = int(line.split()[0])
            if pid in self._seen:
                continue
            self._seen.add(pid)
            with contextlib.suppress(ProcessLookupError):  # already gone
                self._pidfds[pid] = os.pidfd_open(pid)
        live = set()
        for pid, pidfd in list(self._pidfds.items()):
            if select.select([pidfd], [], [], 0)[0]:  # readable: the process exited
                os.close(pidfd)
                del self._pidfds[pid]
            else:
                live.add(pid)
        return live

    def reload(self) -> ReloadResult:
        assert self.proc is not None
        assert self.cell.reload_signal is not None
        started = time.monotonic()
        old = self._live()
        self.proc.send_signal(self.cell.reload_signal)
        deadline = started + RELOAD_TIMEOUT
        while True:
            live = self._live()
            new = live - old
            if not (live & old) and len(new) >= self.workers:
                return ReloadResult(
                    True,
                    f"workers {sorted(old)} replaced by {sorted(new)}",
                    time.monotonic() - started,
                )
            if self.proc.poll() is not None:
                return ReloadResult(
                    False,
                    f"the master exited with {self.proc.returncode}",
                    time.monotonic() - started,
                )
            if time.monotonic() > deadline:
                last = self.log(400).strip().splitlines()[-1:] or [""]
                return ReloadResult(
                    False,
                    f"after {RELOAD_TIMEOUT:g}s: old {sorted(live & old)} still up, "
                    f"new ready {sorted(new)}; server log: {last[0]}",
                    time.monotonic() - started,
                )
            time.sleep(0.02)

    def close(self) -> None:
        for pidfd in self._pidfds.values():
            os.close(pidfd)
        self._pidfds.clear()


def launch(cell: Cell, workdir: Path, startup: float = DEFAULT_STARTUP) -> Stack:
    """Start ``cell`` in ``workdir``; raises :class:`StartError`."""
    stack: NodropStack | OwnStack
    if cell.kind is Kind.NODROP:
        stack = NodropStack(cell, workdir, startup)
    else:
        stack = OwnStack(cell, workdir, startup)
    try:
        return stack.start()
    except BaseException:
        stack.stop()
        raise
