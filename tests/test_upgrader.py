"""nodrop.upgrader.Upgrader: self-upgrade of a Python server under load."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import pytest

from conftest import CHILDREN, Procs
from nodrop.errors import UpgradeError
from nodrop.testing.waiting import wait_for
from nodrop.upgrader import State, Upgrader

sys.path.insert(0, str(CHILDREN))
from holder_load import Load


class Generations:
    """Reads the JSON lines every generation writes to the shared stdout."""

    def __init__(self, proc: subprocess.Popen[bytes], procs: Procs) -> None:
        assert proc.stdout is not None
        self.stdout = proc.stdout
        self.procs = procs
        self.pending: list[dict[str, Any]] = []

    def next(self, event: str) -> dict[str, Any]:
        """The next record of this kind; others are kept (generations write in
        any order: the new one's ready and the old one's upgrade race)."""
        for _ in range(100):  # bounded; each readline is bounded by the test timeout
            for i, record in enumerate(self.pending):
                if record["event"] == event:
                    return self.pending.pop(i)
            line = self.stdout.readline()
            assert line, f"no more output while waiting for {event}"
            record = json.loads(line)
            if record["event"] == "ready":
                self.procs.adopt(record["pid"])  # every generation is reaped/killed
            self.pending.append(record)
        raise AssertionError(f"no {event} event")


def start(procs: Procs, env: dict[str, str] | None = None) -> tuple[Generations, dict[str, Any]]:
    proc = procs.popen(
        [sys.executable, str(CHILDREN / "upgrader_server.py"), "tcp://127.0.0.1:0?name=web"],
        stdout=subprocess.PIPE,
        env=dict(os.environ, **(env or {})),
    )
    gens = Generations(proc, procs)
    return gens, gens.next("ready")


@pytest.mark.slow
def test_twenty_upgrades_under_load_drop_nothing(procs: Procs) -> None:
    gens, first = start(procs)
    load = Load("127.0.0.1", first["port"], threads=4, timeout=10.0, max_seconds=100).start()
    current = first
    served_by: set[int] = set()
    try:
        wait_for(lambda: load.ok_count() >= 20, what="load flowing")
        for i in range(20):
            os.kill(current["pid"], signal.SIGHUP)
            result = gens.next("upgrade")
            assert result["ok"], result
            ready = gens.next("ready")
            assert ready["pid"] == result["new_pid"]
            assert ready["generation"] == i + 2
            assert ready["port"] == first["port"]
            current = ready
        before = load.ok_count()
        wait_for(lambda: load.ok_count() >= before + 20, what="load after upgrades")
    finally:
        load.stop()
    served_by = {int(a.reply) for a in load.attempts if a.outcome == "ok"}
    assert load.failures() == {}
    assert len(served_by) >= 10, served_by
    print(f"\n{len(load.attempts)} requests over 20 upgrades, 0 failed")
    os.kill(current["pid"], signal.SIGKILL)


def test_failed_successor_leaves_the_old_one_serving(procs: Procs, tmp_path: Path) -> None:
    fail_file = tmp_path / "fail"
    gens, first = start(procs, {"UPGRADER_FAIL_FILE": str(fail_file)})
    fail_file.touch()
    os.kill(first["pid"], signal.SIGHUP)
    result = gens.next("upgrade")
    assert not result["ok"]
    assert "exited with status 3 before ready" in result["reason"]
    import socket

    with socket.create_connection(("127.0.0.1", first["port"]), timeout=5) as conn:
        conn.sendall(b"ping\n")
        assert conn.recv(64) == f"{first['pid']}\n".encode()
    fail_file.unlink()
    os.kill(first["pid"], signal.SIGHUP)
    result = gens.next("upgrade")
    assert result["ok"], result
    ready = gens.next("ready")
    os.kill(ready["pid"], signal.SIGKILL)


def test_refusals_and_single_flight(procs: Procs) -> None:
    up = Upgrader(listen=["tcp://127.0.0.1:0?name=web", "tcp://127.0.0.1:0"], environ={})
    try:
        socks = up.listeners()
        assert list(socks) == ["web", "tcp://127.0.0.1:0"]
        with pytest.raises(UpgradeError, match="not ready"):
            up.upgrade()
        up.ready()
        argv = [sys.executable, "-c", "import time; time.sleep(60)"]  # never ready
        results = []
        first = threading.Thread(
            target=lambda: results.append(up.upgrade(argv, timeout=1.0)), daemon=True
        )
        first.start()
        wait_for(lambda: up.state is State.UPGRADING, what="upgrade running")
        with pytest.raises(UpgradeError, match="already in progress"):
            up.upgrade(argv)
        first.join(15)
        (result,) = results
        assert not result.ok
        assert "not ready within 1s" in result.reason
        assert result.exit_status == -signal.SIGKILL
        assert up.state is State.READY
    finally:
        up.close()


def test_inherits_listen_fds_and_binds_missing(tmp_path: Path) -> None:
    up = Upgrader(listen=["unix://" + str(tmp_path / "s.sock") + "?name=u"], environ={})
    try:
        (sock,) = up.listeners().values()
        assert sock.getsockname() == str(tmp_path / "s.sock")
        assert up.generation == 1
        assert not up.has_predecessor
    finally:
        up.close()
