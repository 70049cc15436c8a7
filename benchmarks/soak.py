#!/usr/bin/env python3
"""Soak: many reloads under continuous load; nothing fails, nothing grows.

usage: python benchmarks/soak.py [--reloads 10000] [--workers 2] [--concurrency 8]
                                 [--max-duration S] [--json]

Starts ``nodrop run`` on loopback with a minimal stand-in server
(``tests/children/server.py``: LISTEN_FDS, READY=1, drains on SIGTERM),
keeps ``--concurrency`` clients opening a connection per request
(nodrop's load generator) for the whole run, and performs ``--reloads``
reloads back to back through the control socket. Before the first reload
(after a warm-up of 5) and after the last, it reads the supervisor's open
fds, RSS, children and zombie children from /proc, and prints both.

Exit status: 0 when every reload succeeded, no request failed, and the
supervisor's fds, children and zombies did not grow (RSS is printed, and
judged by the reader: Python's allocator keeps some arenas); 1 otherwise.
The load runs for ``--max-duration`` seconds (default: twice the time the
reloads take without load, measured first, plus 5 s); reloads not done by
then are reported as missing, and the load goes on to its end after the
last reload.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "src"))

from nodrop.load import LoadConfig, Mode, run_load
from nodrop.load.reload import ReloadRecord
from nodrop.supervisor.control import request
from nodrop.testing.waiting import wait_for

SERVER = [
    sys.executable,
    "-S",
    str(Path(__file__).resolve().parent.parent / "tests" / "children" / "server.py"),
]
WARM_UP = 5


def footprint(pid: int) -> dict[str, int]:
    """The supervisor's open fds, RSS (KiB), children and zombie children."""
    fds = len(os.listdir(f"/proc/{pid}/fd"))
    rss = 0
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                rss = int(line.split()[1])
    children = zombies = 0
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat", "rb") as f:
                data = f.read()
        except OSError:
            continue
        fields = data[data.rindex(b")") + 2 :].split()
        if int(fields[1]) == pid:
            children += 1
            zombies += fields[0] == b"Z"
    return {"fds": fds, "rss_kib": rss, "children": children, "zombies": zombies}


class Soaker:
    """Called once by the load runner: performs every reload, back to back,
    until the count or the load's end."""

    def __init__(self, control: str, pid: int, reloads: int, until: float) -> None:
        self.control = control
        self.pid = pid
        self.reloads = reloads
        self.until = until
        self.done = 0
        self.failed: list[str] = []
        self.before: dict[str, int] = {}
        self.after: dict[str, int] = {}

    def _one(self) -> None:
        answer = request(self.control, "reload", wait="drained", timeout=60)
        self.done += 1
        if not answer["ok"]:
            self.failed.append(str(answer["message"]))

    def reload(self) -> ReloadRecord:
        started = time.monotonic()
        for _ in range(min(WARM_UP, self.reloads)):
            self._one()
        self.before = footprint(self.pid)
        while self.done < self.reloads and time.monotonic() < self.until:
            self._one()
        # The last reload's control connection may still be closing on the
        # supervisor's side: transient, not growth. Give it a moment.
        with contextlib.suppress(TimeoutError):
            wait_for(lambda: footprint(self.pid)["fds"] <= self.before["fds"], 5, "fds to settle")
        self.after = footprint(self.pid)
        done = time.monotonic()
        return ReloadRecord(started, None, None, not self.failed, f"{self.done} reloads", done)


def soak(
    reloads: int, workers: int = 2, concurrency: int = 8, max_duration: float | None = None
) -> dict[str, Any]:
    """Run the soak; its figures (see the module docstring)."""
    duration = max_duration or 0.0
    with tempfile.TemporaryDirectory() as tmp:
        control = os.path.join(tmp, "c.sock")
        proc = subprocess.Popen(
            [
                sys.executable, "-m", "nodrop", "run", "--control", control,
                "--listen", "tcp://127.0.0.1:0", "--workers", str(workers),
                "--ready-grace", "0", "--", *SERVER,
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )  # fmt: skip
        try:
            wait_for(
                lambda: proc.poll() is None and _serving(control),
                30,
                "the supervisor to serve",
                interval=0.05,
            )
            port = int(
                request(control, "status", timeout=10)["listeners"][0]["address"].rsplit(":", 1)[1]
            )
            if max_duration is None:
                # Calibrate: how long does one reload take here (without load)?
                t0 = time.monotonic()
                for _ in range(WARM_UP):
                    request(control, "reload", wait="drained", timeout=60)
                duration = 2 * reloads * (time.monotonic() - t0) / WARM_UP + 5
            soaker = Soaker(control, proc.pid, reloads, time.monotonic() + duration - 1)
            config = LoadConfig(
                host="127.0.0.1",
                port=port,
                mode=Mode.CLOSE,
                concurrency=concurrency,
                duration=duration,
                processes=1,
                reload_every=0.5,
                reloads=1,
                timeout=5.0,
            )
            started = time.monotonic()
            result = run_load(config, soaker)
            elapsed = time.monotonic() - started
            request(control, "stop", timeout=60)
            code = proc.wait(timeout=60)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    grew = {
        k: (soaker.before[k], soaker.after[k])
        for k in ("fds", "children", "zombies")
        if soaker.after.get(k, 0) > soaker.before.get(k, 0)
    }
    ok = (
        soaker.done == reloads
        and not soaker.failed
        and result.failed == 0
        and not grew
        and code == 0
    )
    return {
        "ok": ok,
        "reloads": soaker.done,
        "reloads_asked": reloads,
        "reloads_failed": soaker.failed[:5],
        "requests": result.attempts,
        "requests_failed": result.failed,
        "outcomes": dict(result.outcomes),
        "seconds": round(elapsed, 1),
        "before": soaker.before,
        "after": soaker.after,
        "grew": grew,
        "supervisor_exit": code,
    }


def _serving(control: str) -> bool:
    try:
        return bool(request(control, "status", timeout=5).get("active_generation"))
    except Exception:
        return False


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--reloads", type=int, default=10_000)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--max-duration", type=float, metavar="S")
    parser.add_argument("--json", action="store_true", help="print the figures as JSON")
    args = parser.parse_args()
    r = soak(args.reloads, args.workers, args.concurrency, args.max_duration)
    if args.json:
        print(json.dumps(r, indent=2))
        return 0 if r["ok"] else 1
    print(f"uptime: {os.getloadavg()}; python {sys.version.split()[0]}; {os.cpu_count()} cores")
    print(
        f"{r['reloads']}/{r['reloads_asked']} reloads in {r['seconds']} s under load: "
        f"{r['requests']} requests, {r['requests_failed']} failed {r['outcomes']}"
    )
    for key in ("fds", "rss_kib", "children", "zombies"):
        print(f"  supervisor {key:9}: before {r['before'].get(key)}  after {r['after'].get(key)}")
    if r["reloads_failed"]:
        print(f"  failed reloads: {r['reloads_failed']}")
    if r["grew"]:
        print(f"  GREW: {r['grew']}")
    print("OK" if r["ok"] else "FAILED")
    return 0 if r["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
