"""Keep-alive load across reloads: failed requests and reconnects caused by reloads.

    python benchmarks/keepalive_reload.py [--reloads 20] [--duration 10] [--concurrency 64]

Runs the demo app under ``nodrop run`` (2 workers), with and without the
connection handoff (``--no-handoff``), drives nodrop's load generator in
keep-alive mode and reloads through the control socket. Prints a markdown
table. Loopback only. Peers (nginx, HAProxy, gunicorn) are measured by
``benchmarks/reload_matrix.py`` when installed; they are reported here as
"not installed" otherwise.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
from typing import Any

from nodrop.load import LoadConfig, Mode, run_load
from nodrop.load.control_reloader import ControlReloader
from nodrop.supervisor.control import request
from nodrop.testing.waiting import wait_for


def start(handoff: bool, workdir: str) -> tuple[subprocess.Popen[bytes], str, int]:
    """The demo app under `nodrop run` on port 0; the port is read back from its status."""
    control = os.path.join(workdir, f"control-{int(handoff)}.sock")
    argv = [
        sys.executable, "-m", "nodrop", "run", "--control", control,
        "--listen", "tcp://127.0.0.1:0", "--workers", "2", "--ready-grace", "0.05",
        "--handoff" if handoff else "--no-handoff",
        "--", sys.executable, "-m", "nodrop.demo.app",
    ]  # fmt: skip
    log = open(os.path.join(workdir, f"supervisor-{int(handoff)}.log"), "wb")  # noqa: SIM115
    proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    log.close()

    def serving() -> dict[str, Any] | None:
        if proc.poll() is not None:
            raise TimeoutError("the supervisor exited")
        try:
            status = request(control, "status", timeout=2)
        except Exception:
            return None
        return status if status.get("active_generation") else None

    try:
        status = wait_for(serving, 30, "the supervisor to serve", interval=0.05)
    except TimeoutError:
        proc.kill()
        proc.wait(10)
        raise SystemExit(f"the supervisor did not start; see {workdir}") from None
    port = int(status["listeners"][0]["address"].rsplit(":", 1)[1])
    return proc, control, port


def stop(proc: subprocess.Popen[bytes], control: str) -> None:
    try:
        request(control, "stop", timeout=60)
        proc.wait(timeout=30)
    except Exception:
        proc.kill()
        proc.wait(timeout=10)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reloads", type=int, default=20)
    parser.add_argument("--duration", type=float, default=10.0)
    parser.add_argument("--concurrency", type=int, default=64)
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory(prefix="nodrop-bench-") as workdir:
        for handoff in (True, False):
            proc, control, port = start(handoff, workdir)
            try:
                config = LoadConfig(
                    host="127.0.0.1", port=port, mode=Mode.KEEPALIVE,
                    concurrency=args.concurrency, duration=args.duration, processes=1,
                    reload_every=args.duration / (args.reloads + 1), reloads=args.reloads,
                    timeout=5.0,
                )  # fmt: skip
                result = run_load(config, ControlReloader(control))
                handoff_stats = request(control, "status", timeout=10).get("handoff") or {}
            finally:
                stop(proc, control)
            rows.append(
                (
                    "nodrop + demo app"
                    + (" (connection handoff)" if handoff else " (--no-handoff)"),
                    f"{sum(r.ok for r in result.reloads)}/{len(result.reloads)}",
                    result.ok,
                    result.failed,
                    result.reconnects,
                    result.reconnects_in_reload,
                    handoff_stats.get("placed", "-"),
                )
            )
    print(
        f"\nKeep-alive HTTP/1.1, {args.concurrency} connections, {args.reloads} reloads in "
        f"{args.duration:g} s (nodrop's load generator, loopback)\n"
    )
    print(
        "| server | reloads ok | requests ok | failed | reconnects | reconnects in reloads | connections handed over |"
    )
    print("|---|---|---|---|---|---|---|")
    for row in rows:
        print("| " + " | ".join(str(x) for x in row) + " |")
    for peer in ("nginx", "haproxy", "gunicorn"):
        if shutil.which(peer) is None:
            print(f"| {peer} | not installed | | | | | |")


if __name__ == "__main__":
    main()
