"""``nodrop demo``: the bundled app under ``nodrop run``, reloaded under load.

Starts the supervisor (2 workers of :mod:`nodrop.demo.app` on a free loopback
port, a private control socket), waits for it the way systemd would (its
``READY=1``), runs the load generator for the duration with the reloads, prints
the table and writes the HTML report, then stops everything it started.
"""

from __future__ import annotations

import contextlib
import os
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from typing import TextIO

from nodrop.errors import NodropError
from nodrop.load import LoadConfig, LoadResult, Mode, run_load
from nodrop.load.control_reloader import ControlReloader
from nodrop.supervisor.control import request
from nodrop.systemd.receiver import NotifyReceiver

START_TIMEOUT = 30.0


@dataclass(frozen=True)
class DemoOptions:
    duration: float = 20.0
    reloads: int = 10
    workers: int = 2
    concurrency: int = 32
    mode: Mode = Mode.CLOSE
    strategy: str = "inherit"
    report: str = "nodrop-demo-report.html"


class DemoError(NodropError):
    pass


def _wait_ready(receiver: NotifyReceiver, proc: subprocess.Popen[bytes], log_path: str) -> None:
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            break
        if select.select([receiver], [], [], 0.2)[0]:
            note = receiver.receive()
            if note is not None and note.fields.get("READY") == "1":
                return
    with open(log_path, errors="replace") as f:
        log = f.read()[-3000:]
    raise DemoError(f"the supervisor did not start; its log:\n{log}")


def run_demo(options: DemoOptions, out: TextIO = sys.stderr) -> tuple[LoadResult, str]:
    """Run the demo; returns the load result and the report's path."""
    workdir = tempfile.mkdtemp(prefix="nodrop-demo-")
    control = os.path.join(workdir, "control.sock")
    log_path = os.path.join(workdir, "supervisor.log")
    receiver = NotifyReceiver(os.path.join(workdir, "notify"))
    proc: subprocess.Popen[bytes] | None = None
    try:
        env = dict(os.environ, NOTIFY_SOCKET=receiver.path)
        argv = [
            sys.executable, "-m", "nodrop", "run",
            "--control", control,
            "--listen", "tcp://127.0.0.1:0?name=web",
            "--workers", str(options.workers),
            "--strategy", options.strategy,
            "--ready-grace", "0.2",
            "--drain-timeout", "10",
            # Keep-alive clients: hand idle connections to the new generation.
            *(["--handoff"] if options.mode is Mode.KEEPALIVE else ["--no-handoff"]),
            "--", sys.executable, "-m", "nodrop.demo.app",
        ]  # fmt: skip
        with open(log_path, "wb") as log:
            proc = subprocess.Popen(
                argv, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
            )
        _wait_ready(receiver, proc, log_path)
        status = request(control, "status", timeout=10)
        port = int(status["listeners"][0]["address"].rsplit(":", 1)[1])
        print(
            f"nodrop demo: {options.workers} workers of the demo app on 127.0.0.1:{port} "
            f"(pid {status['pid']}); {options.mode.value} load for {options.duration:g}s "
            f"with {options.reloads} reloads...",
            file=out,
            flush=True,
        )
        config = LoadConfig(
            host="127.0.0.1",
            port=port,
            mode=options.mode,
            concurrency=options.concurrency,
            duration=options.duration,
            timeout=5.0,
            reload_every=options.duration / (options.reloads + 1),
            reloads=options.reloads,
        )
        result = run_load(config, ControlReloader(control))
        with contextlib.suppress(NodropError):
            request(control, "stop", timeout=30)
        proc.wait(timeout=30)
        return result, options.report
    finally:
        if proc is not None and proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)
        receiver.close()
        shutil.rmtree(workdir, ignore_errors=True)
