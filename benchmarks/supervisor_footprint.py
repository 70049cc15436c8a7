#!/usr/bin/env python3
"""The supervisor's own footprint: memory, and what a reload costs it.

usage: python benchmarks/supervisor_footprint.py [--reloads 30] [--workers 1 4]

For each worker count, starts `nodrop run` with a minimal worker (a Python
process that sends READY=1 at once and then waits for SIGTERM), performs N
reloads through the control socket, and reports:

* RSS of the supervisor process (VmRSS) after start-up and after the reloads;
* reload duration as the supervisor measures it (request to every new worker
  ready; --ready-grace 0) and, subtracting the workers' own start-up time
  (from spawn to their READY=1), the control-plane overhead.

Targets (issue 3): RSS under 30 MB; control-plane overhead under 20 ms.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "src"))

from nodrop.supervisor.control import request
from nodrop.testing.waiting import wait_for

WORKER = (
    "import os,socket,signal;"
    "s=socket.socket(socket.AF_UNIX,socket.SOCK_DGRAM);"
    "s.connect(os.environ['NOTIFY_SOCKET']);s.send(b'READY=1');"
    "signal.sigwait({signal.SIGTERM})"
)


def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return -1


def wait_control(path: str, proc: subprocess.Popen[bytes]) -> None:
    def serving() -> bool:
        if proc.poll() is not None:
            raise SystemExit("supervisor exited")
        try:
            return bool(request(path, "status", timeout=5).get("active_generation"))
        except Exception:
            return False

    try:
        wait_for(serving, 30, "the supervisor to serve", interval=0.05)
    except TimeoutError:
        raise SystemExit("supervisor did not start") from None


def measure(workers: int, reloads: int) -> dict[str, float]:
    with tempfile.TemporaryDirectory() as tmp:
        control = os.path.join(tmp, "c.sock")
        proc = subprocess.Popen(
            [
                sys.executable, "-m", "nodrop", "run", "--control", control,
                "--listen", "tcp://127.0.0.1:0", "--workers", str(workers),
                "--ready-grace", "0", "--no-tag-output",
                "--", sys.executable, "-S", "-c", WORKER,
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )  # fmt: skip
        try:
            wait_control(control, proc)
            rss_start = rss_kib(proc.pid)
            durations, overheads = [], []
            for _ in range(reloads):
                answer = request(control, "reload", wait="drained", timeout=60)
                assert answer["ok"], answer
                status = request(control, "status", timeout=10)
                gen = next(
                    g for g in status["generations"] if g["generation"] == answer["generation"]
                )
                # The workers' own start-up: from the moment each was spawned
                # (posix_spawn returned) to its READY=1. What remains of the
                # reload's duration is the supervisor's: parsing, binding,
                # spawning, bookkeeping, the answer.
                startup = max(w["ready_after"] for w in gen["workers"])
                durations.append(answer["duration"])
                overheads.append(answer["duration"] - startup)
            rss_end = rss_kib(proc.pid)
            request(control, "stop", timeout=60)
            proc.wait(timeout=30)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    return {
        "workers": workers,
        "rss_start_mib": rss_start / 1024,
        "rss_end_mib": rss_end / 1024,
        "reload_median_ms": statistics.median(durations) * 1000,
        "overhead_median_ms": statistics.median(overheads) * 1000,
        "overhead_p95_ms": sorted(overheads)[int(0.95 * (len(overheads) - 1))] * 1000,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--reloads", type=int, default=30)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 4])
    args = parser.parse_args()
    print(
        f"reloads per row: {args.reloads}; python {sys.version.split()[0]}; {os.cpu_count()} cores"
    )
    print(
        "| workers | supervisor RSS at start | after reloads | reload (median) | control-plane overhead (median / p95) |"
    )
    print("|---|---|---|---|---|")
    for workers in args.workers:
        r = measure(workers, args.reloads)
        print(
            f"| {workers} | {r['rss_start_mib']:.1f} MiB | {r['rss_end_mib']:.1f} MiB | "
            f"{r['reload_median_ms']:.1f} ms | {r['overhead_median_ms']:.1f} / {r['overhead_p95_ms']:.1f} ms |"
        )


if __name__ == "__main__":
    main()
