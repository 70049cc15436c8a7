"""The baseline a report is measured against: the same load while a server
is restarted the naive way (stop, then start), measured in the same run.

The server is nodrop's bundled demo app (:mod:`nodrop.demo.app`) run on its
own, without nodrop, on a loopback port. A "reload" is what a plain restart
does: SIGTERM, wait for the process to exit, start a new one, wait for its
``READY=1``. Between the old one closing its listening socket and the new one
binding, connections are refused; the old one's queued connections are reset.
A load generator that counts those shows it can see a failed request, so its
"0 failed" against nodrop means something.
"""

from __future__ import annotations

import contextlib
import os
import select
import signal
import socket
import subprocess
import sys
import tempfile
import time

from nodrop.errors import NodropError
from nodrop.load.config import LoadConfig
from nodrop.load.reload import ReloadRecord
from nodrop.load.result import LoadResult
from nodrop.systemd.receiver import NotifyReceiver

START_TIMEOUT = 30.0
LABEL = "naive restart (stop, then start) of the demo app, without nodrop, same load"


class BaselineError(NodropError):
    pass


def _unused_loopback_port() -> int:
    """A port the kernel says is free now (a naive restart rebinds it each time)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


class NaiveRestart:
    """Runs the demo app on its own and restarts it naively on :meth:`reload`."""

    def __init__(self) -> None:
        self._dir = tempfile.mkdtemp(prefix="nodrop-baseline-")
        self._notify = NotifyReceiver(os.path.join(self._dir, "notify"))
        self.port = _unused_loopback_port()
        self._proc: subprocess.Popen[bytes] | None = None
        try:
            self._start()
        except BaseException:
            self.close()
            raise

    def _start(self) -> None:
        env = dict(os.environ, NOTIFY_SOCKET=self._notify.path, NODROP_GENERATION="naive")
        for key in ("LISTEN_FDS", "LISTEN_PID", "LISTEN_FDNAMES", "NODROP_HANDOFF"):
            env.pop(key, None)
        self._proc = subprocess.Popen(
            [sys.executable, "-m", "nodrop.demo.app", "--port", str(self.port)],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline and self._proc.poll() is None:
            if select.select([self._notify], [], [], 0.2)[0]:
                note = self._notify.receive()
                if note is not None and note.fields.get("READY") == "1":
                    return
        raise BaselineError("the baseline demo app did not start")

    def reload(self) -> ReloadRecord:
        started = time.monotonic()
        assert self._proc is not None
        self._proc.send_signal(signal.SIGTERM)
        try:
            self._proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            self._proc.wait(timeout=10)
        exited = time.monotonic()
        try:
            self._start()
        except BaselineError as exc:
            return ReloadRecord(started, None, None, False, str(exc), time.monotonic())
        ready = time.monotonic()
        # The window is the outage: from the stop until the new process is ready.
        return ReloadRecord(
            started, ready, None, True, f"stopped in {exited - started:.3f}s, "
            f"started again in {ready - exited:.3f}s", ready,
        )  # fmt: skip

    def close(self) -> None:
        if self._proc is not None and self._proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self._proc.pid, signal.SIGKILL)
            self._proc.wait(timeout=10)
        self._notify.close()
        with contextlib.suppress(OSError):
            os.unlink(os.path.join(self._dir, "notify"))
        with contextlib.suppress(OSError):
            os.rmdir(self._dir)


def run_baseline(config: LoadConfig) -> LoadResult:
    """``config``'s load (its host and port replaced) against naive restarts."""
    from dataclasses import replace

    from nodrop.load.runner import run_load

    server = NaiveRestart()
    try:
        return run_load(replace(config, host="127.0.0.1", port=server.port), server)
    finally:
        server.close()
