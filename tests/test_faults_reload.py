"""Fault matrix: reloads under stress -- 100 in a second, a full accept
queue, a worker killed at each phase of a reload (issue 13, item 4).

Each test asserts what the clients saw and the state nodrop ends in.
"""

from __future__ import annotations

import concurrent.futures
import os
import signal
import socket
import threading
import time
from typing import Any

import pytest

from nodrop.load import run_load
from nodrop.load.outcome import Outcome
from nodrop.load.reload import ReloadRecord
from nodrop.testing.waiting import wait_for
from supervisor_harness import SERVER, Start, Supervised, close_mode_load


def settled(sup: Supervised) -> list[str]:
    return [
        g["state"] for g in sup.status()["generations"] if g["state"] not in ("exited", "failed")
    ]


def test_a_hundred_reloads_in_one_second_under_load_drop_nothing(supervise: Start) -> None:
    sup = supervise("--listen", "tcp://127.0.0.1:0", "--workers", "2", "--ready-grace", "0.05")
    port = sup.port()

    class Burst:
        answers: list[dict[str, Any]] = []

        def reload(self) -> ReloadRecord:
            started = time.monotonic()

            def later(delay: float) -> dict[str, Any]:
                time.sleep(delay)  # the burst itself: requests spread over one second
                return sup.reload()

            with concurrent.futures.ThreadPoolExecutor(100) as pool:
                self.answers = list(pool.map(later, [i / 100 for i in range(100)]))
            done = time.monotonic()
            return ReloadRecord(started, None, None, True, "burst", done)

    burst = Burst()
    config = close_mode_load(port, reload_every=0.5)
    result = run_load(config, burst)
    assert result.failed == 0, result.outcomes
    assert len(burst.answers) == 100
    assert all(a["ok"] for a in burst.answers), [a["message"] for a in burst.answers if not a["ok"]]
    # Coalesced: far fewer generations than requests, each answer names one.
    generations = {a["generation"] for a in burst.answers}
    assert 1 < len(generations) < 100
    wait_for(lambda: settled(sup) == ["active"], what="old generations to exit")
    status = sup.status()
    assert status["active_generation"] == max(generations)
    assert sup.stop() == 0


def test_a_reload_while_the_accept_queue_is_full_loses_nothing(supervise: Start) -> None:
    """The only worker is frozen (SIGSTOP) with a queue of 8 full; clients keep
    connecting (the kernel drops their SYNs, they retry). A reload's new
    generation serves the queue and every waiting client."""
    sup = supervise("--listen", "tcp://127.0.0.1:0?backlog=8", "--ready-grace", "0.05")
    port = sup.port()
    [old] = sup.status()["generations"][0]["workers"]
    os.kill(old["pid"], signal.SIGSTOP)
    answers: list[str] = []
    errors: list[BaseException] = []

    def client() -> None:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=30) as conn:
                conn.sendall(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
                data = b""
                while chunk := conn.recv(4096):
                    data += chunk
            answers.append(data.split(b"\r\n\r\n", 1)[1].decode())
        except OSError as exc:
            errors.append(exc)

    threads = [threading.Thread(target=client) for _ in range(24)]
    for t in threads:
        t.start()
    wait_for(
        lambda: (sup.status()["listeners"][0]["accept_queue"] or 0) >= 8 or None, 30, "a full queue"
    )
    try:
        reply = sup.reload()
    finally:
        os.kill(old["pid"], signal.SIGCONT)
    for t in threads:
        t.join(timeout=60)
    assert reply["ok"], reply
    assert not errors, errors
    assert len(answers) == 24
    assert any(a.startswith("gen=2 ") for a in answers)
    wait_for(lambda: settled(sup) == ["active"], what="generation 1 to exit")
    assert sup.stop() == 0


@pytest.mark.parametrize("phase", ["starting", "draining", "active"])
def test_kill_9_of_a_worker_at_each_phase_of_a_reload(supervise: Start, phase: str) -> None:
    """starting: the new generation's worker dies before READY=1 -> rolled
    back, the old keeps serving. draining: an old worker dies while it drains
    -> the reload stands. active: a new worker dies after the reload -> restarted.
    Clients lose at most the requests the killed worker held."""
    sup = supervise(
        "--listen",
        "tcp://127.0.0.1:0",
        "--workers",
        "2",
        "--ready-grace",
        "0.05",
        command=[*SERVER, "--ready-after", "0.5"],
    )
    port = sup.port()
    outcome: dict[str, Any] = {}

    class KillDuringReload:
        def reload(self) -> ReloadRecord:
            started = time.monotonic()
            thread = threading.Thread(target=lambda: outcome.update(sup.reload()))
            thread.start()
            wait_for(lambda: len(sup.status()["generations"]) == 2 or None, 30)
            if phase == "starting":
                victim = sup.status()["generations"][1]["workers"][0]["pid"]
            else:
                thread.join(timeout=30)
            if phase == "draining":
                victim = sup.status()["generations"][0]["workers"][0]["pid"]
            elif phase == "active":
                victim = sup.status()["generations"][1]["workers"][0]["pid"]
            os.kill(victim, signal.SIGKILL)
            thread.join(timeout=30)
            done = time.monotonic()
            return ReloadRecord(started, None, None, True, f"kill {victim}", done)

    config = close_mode_load(port, duration=3.0, reload_every=0.5)
    result = run_load(config, KillDuringReload())
    failures = {k: v for k, v in result.outcomes.items() if k != Outcome.OK.label and v}
    # A SIGKILL loses what the worker had accepted and not answered: at most
    # one request per client connection in flight, and only as a reset or EOF.
    assert set(failures) <= {Outcome.RESET.label, Outcome.EOF.label}, failures
    assert sum(failures.values()) <= config.concurrency
    status = sup.status()
    if phase == "starting":
        assert outcome["ok"] is False
        assert "rolled back" in outcome["message"]
        assert status["active_generation"] == 1
    else:
        assert outcome["ok"] is True, outcome
        assert status["active_generation"] == 2
    if phase == "active":
        wait_for(lambda: sup.status()["generations"][-1]["workers"][0]["restarts"] == 1 or None, 30)
    wait_for(lambda: settled(sup) == ["active"], what="the other generation to exit")
    wait_for(lambda: not sup.status()["degraded"] or None, 30, "every worker ready")
    assert sup.stop() == 0
