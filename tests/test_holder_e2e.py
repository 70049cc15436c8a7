"""End to end under load: a server parks its listener in the holder and exits,
nothing listens in user space for 2 s, a new server claims it. Every client
waits in the kernel's accept queue: zero refused, zero reset."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from conftest import CHILDREN, Procs
from nodrop.holder import client
from nodrop.testing.waiting import wait_for
from test_holder import RunningHolder, start_holder

sys.path.insert(0, str(CHILDREN))
from holder_load import Load, percentile

GAP = 2.0  # the scenario: seconds with no server at all


def start_server(
    procs: Procs, holder: RunningHolder, spec: str, ttl: float = 30.0
) -> tuple[subprocess.Popen[bytes], dict[str, Any]]:
    proc = procs.popen(
        [sys.executable, str(CHILDREN / "holder_server.py"), holder.path, spec, str(ttl)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
    )
    assert proc.stdout is not None
    line = proc.stdout.readline()
    assert line, "server exited before ready"
    return proc, json.loads(line)


def park(proc: subprocess.Popen[bytes]) -> None:
    assert proc.stdin is not None
    assert proc.stdout is not None
    proc.stdin.write(b"park\n")
    proc.stdin.flush()
    assert json.loads(proc.stdout.readline())["event"] == "parked"
    assert proc.wait(10) == 0
    proc.stdin.close()
    proc.stdout.close()


@pytest.mark.slow
def test_park_gap_claim_under_load(procs: Procs, tmp_path: Path) -> None:
    holder = start_holder(procs, tmp_path)
    old, first = start_server(procs, holder, "tcp://127.0.0.1:0?name=web")
    port = first["port"]
    spec = f"tcp://127.0.0.1:{port}?name=web"
    load = Load("127.0.0.1", port, threads=4, timeout=10.0, max_seconds=60).start()
    try:
        wait_for(lambda: load.ok_count() >= 50, what="load flowing")
        park(old)
        gap_start = time.monotonic()
        time.sleep(GAP)  # the scenario under test, not a wait for readiness
        new, second = start_server(procs, holder, spec)
        gap_end = time.monotonic()
        assert second["inode"] == first["inode"]  # the very same kernel socket
        served = load.ok_count()
        wait_for(lambda: load.ok_count() >= served + 50, what="load after claim")
    finally:
        load.stop()
    assert load.failures() == {}
    assert client.list_parked(holder.path) == []
    # Requests in flight at any moment of the gap (each thread's one waits it out).
    in_gap = [
        a.latency for a in load.attempts if a.start < gap_end and a.start + a.latency > gap_start
    ]
    pids = {a.reply for a in load.attempts}
    assert {f"{first['pid']}\n".encode(), f"{second['pid']}\n".encode()} <= pids
    print(
        f"\n{len(load.attempts)} requests, 0 failed; {len(in_gap)} in flight in the "
        f"{gap_end - gap_start:.2f}s gap: p50 {percentile(in_gap, 0.5) * 1000:.0f} ms, "
        f"p99 {percentile(in_gap, 0.99) * 1000:.0f} ms, max {max(in_gap) * 1000:.0f} ms"
    )
    assert in_gap
    assert max(in_gap) >= GAP * 0.5
    new.kill()


def test_park_and_ttl_expiry_releases_everything(procs: Procs, tmp_path: Path) -> None:
    holder = start_holder(procs, tmp_path)
    # At most this many: the holder may still be closing the socket it sent
    # READY=1 on when it is counted.
    baseline = holder.fd_count()
    old, first = start_server(procs, holder, "tcp://127.0.0.1:0?name=web", ttl=0.5)
    park(old)
    assert [h.inode for h in client.list_parked(holder.path)] == [first["inode"]]
    # The holder closes the sockets, then logs it: wait for both.
    wait_for(
        lambda: holder.fd_count() <= baseline and "expired, closed 1" in holder.log_text(),
        what="held fds released at expiry, and the log line saying so",
    )
    import socket

    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", first["port"]), timeout=5).close()
