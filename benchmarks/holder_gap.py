"""Latency and failures while a listener is parked in `nodrop hold`.

usage: python benchmarks/holder_gap.py [--gap SECONDS] [--threads N] [--ttl S]

A server serves "ping" -> "pong" on 127.0.0.1 (a new TCP connection per
request) while client threads load it; it parks its listener in a holder and
exits; for GAP seconds nothing listens in user space; a new server claims
the listener. Prints a markdown table: requests, failures by class, and the
latency of the requests in flight during the gap. Loopback only; bounded in
time and count.
"""

from __future__ import annotations

import argparse
import errno
import os
import select
import socket
import subprocess
import sys
import tempfile
import threading
import time

from nodrop.systemd.receiver import NotifyReceiver

SERVER = r"""
import os, sys
from nodrop.upgrader import Upgrader
up = Upgrader(listen=[sys.argv[2]], holder=sys.argv[1])
(lst,) = up.listeners().values()
lst.listen(4096)
up.ready()
print(lst.getsockname()[1], flush=True)
lst.settimeout(0.05)
checked = 0.0
while True:
    now = time.monotonic()
    if now - checked > 0.02:
        checked = now
        if os.path.exists(sys.argv[3]):
            up.park(ttl=float(sys.argv[4]))
            up.close()
            print("parked", flush=True)
            sys.exit(0)
    try:
        conn, _ = lst.accept()
    except TimeoutError:
        continue
    with conn:
        conn.settimeout(5)
        if conn.recv(64):
            conn.sendall(b"pong\n")
"""


def start_holder(path: str) -> subprocess.Popen[bytes]:
    with NotifyReceiver() as receiver:
        proc = subprocess.Popen(
            [sys.executable, "-m", "nodrop", "hold", "--path", path],
            env=dict(os.environ, NOTIFY_SOCKET=receiver.path),
            stderr=subprocess.DEVNULL,
        )
        if not select.select([receiver], [], [], 15)[0]:
            proc.kill()
            raise SystemExit("holder did not start")
        note = receiver.receive()
        if note is not None:
            note.close_fds()
    return proc


def server(holder: str, spec: str, flag: str, ttl: float) -> tuple[subprocess.Popen[str], int]:
    proc = subprocess.Popen(
        [sys.executable, "-c", "import time\n" + SERVER, holder, spec, flag, str(ttl)],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None
    return proc, int(proc.stdout.readline())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gap", type=float, default=2.0)
    parser.add_argument("--threads", type=int, default=8)
    parser.add_argument("--ttl", type=float, default=30.0)
    args = parser.parse_args()
    tmp = tempfile.mkdtemp(prefix="nodrop-bench-")
    path, flag = os.path.join(tmp, "holder.sock"), os.path.join(tmp, "park")
    holder = start_holder(path)
    old, port = server(path, "tcp://127.0.0.1:0?name=web", flag, args.ttl)
    spec = f"tcp://127.0.0.1:{port}?name=web"
    stop = threading.Event()
    records: list[tuple[float, float, str]] = []
    lock = threading.Lock()

    def worker() -> None:
        deadline = time.monotonic() + 120
        while not stop.is_set() and time.monotonic() < deadline and len(records) < 1_000_000:
            t0 = time.monotonic()
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
                    s.sendall(b"ping\n")
                    outcome = "ok" if s.recv(64) == b"pong\n" else "reset"
            except TimeoutError:
                outcome = "timeout"
            except OSError as exc:
                outcome = {errno.ECONNREFUSED: "refused", errno.ECONNRESET: "reset"}.get(
                    exc.errno or 0, "other"
                )
            with lock:
                records.append((t0, time.monotonic() - t0, outcome))

    threads = [threading.Thread(target=worker, daemon=True) for _ in range(args.threads)]
    for t in threads:
        t.start()
    try:
        time.sleep(1.0)  # steady load before the restart (benchmark pacing)
        open(flag, "w").close()
        assert old.stdout is not None
        old.stdout.readline()
        old.wait(10)
        os.unlink(flag)
        gap_start = time.monotonic()
        time.sleep(args.gap)  # the gap under test
        new, _ = server(path, spec, flag, args.ttl)
        gap_end = time.monotonic()
        time.sleep(1.0)
    finally:
        stop.set()
        for t in threads:
            t.join(15)
    new.kill()
    new.wait()
    holder.terminate()
    holder.wait(10)
    failed: dict[str, int] = {}
    for _, _, outcome in records:
        if outcome != "ok":
            failed[outcome] = failed.get(outcome, 0) + 1
    gap = sorted(lat for t0, lat, _ in records if t0 < gap_end and t0 + lat > gap_start)
    steady = sorted(lat for t0, lat, _ in records if t0 + lat <= gap_start)

    def pct(values: list[float], q: float) -> str:
        return f"{values[min(len(values) - 1, int(q * len(values)))] * 1000:.1f}" if values else "-"

    print(f"gap {gap_end - gap_start:.2f} s, {args.threads} client threads, new connection each\n")
    print("| requests | failed (by class) | phase | n | p50 ms | p99 ms | max ms |")
    print("|---:|---|---|---:|---:|---:|---:|")
    fail_text = ", ".join(f"{k}={v}" for k, v in sorted(failed.items())) or "0"
    print(
        f"| {len(records)} | {fail_text} | before the gap | {len(steady)} | {pct(steady, 0.5)} | "
        f"{pct(steady, 0.99)} | {pct(steady, 1.0)} |"
    )
    print(
        f"| | | in flight during the gap | {len(gap)} | {pct(gap, 0.5)} | {pct(gap, 0.99)} | "
        f"{pct(gap, 1.0)} |"
    )
    os.rmdir(tmp)


if __name__ == "__main__":
    main()
