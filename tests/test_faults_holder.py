"""Fault matrix (issue 13, item 4): kill -9 of the holder while it holds a
parked listener, and the holder's TTL against a slow start.

The TTL is a hard deadline on the *claim*, not on the start-up: `nodrop
exec` claims before it runs the server, so a slow start costs nothing; an
Upgrader that claims too late gets a fresh socket and says so; `nodrop exec
--names` refuses to run a server without a socket it asked for.

kill -9 of the holder:
What the docs promise (docs/holder.md, "parked sockets die with the
holder") and nothing more: the parked socket closes with the holder, so
the connections queued on it are reset and new ones refused -- no client
hangs -- and the successor, finding no holder, binds the port afresh (no
EADDRINUSE, no stale socket file in its way) and serves.
"""

from __future__ import annotations

import json
import os
import select
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from conftest import CHILDREN, Procs
from nodrop.cli import EXIT_ERROR
from nodrop.holder import client
from nodrop.testing.waiting import wait_for
from test_holder import RunningHolder, start_holder
from test_holder_e2e import park, start_server

sys.path.insert(0, str(CHILDREN))
from holder_load import Load

SLOW = CHILDREN / "slow_start_server.py"
ACTIVATION = CHILDREN / "activation_child.py"


def answer(conn: socket.socket) -> str:
    """What a waiting client got: its reply, or "reset"."""
    try:
        return conn.recv(64).decode() or "closed unanswered"
    except ConnectionResetError:
        return "reset"


def test_kill_9_of_the_holder_holding_a_socket(procs: Procs, tmp_path: Path) -> None:
    holder = start_holder(procs, tmp_path)
    old, first = start_server(procs, holder, "tcp://127.0.0.1:0?name=web")
    port = first["port"]
    park(old)
    # Clients that arrive while the socket is parked wait in its queue.
    waiting = [socket.create_connection(("127.0.0.1", port), timeout=10) for _ in range(3)]
    for conn in waiting:
        conn.sendall(b"ping\n")
    holder.proc.send_signal(signal.SIGKILL)
    assert holder.proc.wait(timeout=10) == -signal.SIGKILL
    for conn in waiting:
        with conn:
            assert answer(conn) == "reset"
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", port), timeout=5).close()
    # The successor: the holder is gone, so it binds the same port afresh.
    new, second = start_server(procs, holder, f"tcp://127.0.0.1:{port}?name=web")
    assert second["port"] == port
    assert second["inode"] != first["inode"]
    with socket.create_connection(("127.0.0.1", port), timeout=10) as conn:
        conn.sendall(b"ping\n")
        assert conn.recv(64) == f"{second['pid']}\n".encode()
    new.kill()
    new.wait(timeout=10)
    for stream in (new.stdin, new.stdout):
        if stream is not None:
            stream.close()
    assert not os.path.exists(f"/proc/{holder.proc.pid}")


# -- the holder's TTL during a slow start ---------------------------------------------


def read_event(proc: subprocess.Popen[bytes], timeout: float) -> dict[str, Any]:
    """The next JSON line a child prints, within ``timeout`` seconds."""
    assert proc.stdout is not None
    if not select.select([proc.stdout], [], [], timeout)[0]:
        raise TimeoutError(f"pid {proc.pid} printed nothing within {timeout:g}s")
    line = proc.stdout.readline()
    assert line, f"pid {proc.pid} exited: {proc.wait(10)}"
    event: dict[str, Any] = json.loads(line)
    return event


def exec_argv(holder: RunningHolder, *args: str) -> list[str]:
    return [sys.executable, "-m", "nodrop", "exec", "--from-holder", holder.path, *args]


TTL = 1.5
"""The deposit's TTL: shorter than the server's start-up, longer than the time
`nodrop exec` itself takes to claim on a busy 2-core machine (~0.7 s)."""
START_UP = 3.0


@pytest.mark.slow
def test_exec_claims_before_a_start_up_longer_than_the_ttl(procs: Procs, tmp_path: Path) -> None:
    holder = start_holder(procs, tmp_path)
    web = socket.create_server(("127.0.0.1", 0), backlog=128)
    port = web.getsockname()[1]
    inode = os.fstat(web.fileno()).st_ino
    client.deposit(holder.path, {"web": web}, ttl=TTL)
    web.close()
    deposited = time.monotonic()
    # Clients keep connecting from now on: first into the holder's socket,
    # then into the same socket while the server is still starting.
    load = Load("127.0.0.1", port, threads=4, timeout=15.0, max_seconds=60).start()
    try:
        server = procs.popen(
            exec_argv(holder, "--names", "web", "--", sys.executable, str(SLOW), str(START_UP)),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
        )
        started = read_event(server, 30)
        assert started["pid"] == server.pid  # exec: `nodrop exec` became the server
        assert started["inode"] == inode  # the very socket the clients queue on
        ready = read_event(server, 30)
        assert time.monotonic() - deposited > TTL + 1  # the start-up outlived the TTL
        assert ready["inode"] == inode
        served = load.ok_count()
        wait_for(lambda: load.ok_count() >= served + 50, what="load after the start-up")
    finally:
        load.stop()
    assert load.failures() == {}
    # Some requests waited through the whole start-up, and were answered.
    assert max(a.latency for a in load.attempts) >= START_UP * 0.5
    assert client.list_parked(holder.path) == []
    assert "expired" not in holder.log_text()
    assert "claimed 1 socket(s)" in holder.log_text()
    assert server.stdin is not None
    server.stdin.close()
    assert server.wait(10) == 0


def start_upgrader_server(
    procs: Procs, holder: RunningHolder, spec: str, ttl: float, stderr: Path
) -> tuple[subprocess.Popen[bytes], dict[str, Any]]:
    with open(stderr, "wb") as err:
        proc = procs.popen(
            [sys.executable, str(CHILDREN / "holder_server.py"), holder.path, spec, str(ttl)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=err,
        )
    return proc, read_event(proc, 30)


def test_upgrader_says_when_the_ttl_ran_out_before_its_claim(procs: Procs, tmp_path: Path) -> None:
    holder = start_holder(procs, tmp_path)
    first_err, second_err, third_err = (tmp_path / f"{n}.err" for n in ("1", "2", "3"))
    old, first = start_upgrader_server(procs, holder, "tcp://127.0.0.1:0?name=web", 30, first_err)
    port = first["port"]
    spec = f"tcp://127.0.0.1:{port}?name=web"
    # Claimed in time: the same socket, and not a word about it.
    park(old)
    mid, second = start_upgrader_server(procs, holder, spec, 2.0, second_err)
    assert second["inode"] == first["inode"]
    assert "fresh" not in second_err.read_text()
    # Parked for 2 s with a client queued, and nobody claims in time.
    park(mid)
    waiting = socket.create_connection(("127.0.0.1", port), timeout=10)
    waiting.sendall(b"ping\n")
    wait_for(lambda: "expired, closed 1" in holder.log_text(), what="the TTL's end")
    with waiting:
        assert answer(waiting) == "reset"  # the holder closed the socket it was queued on
    new, third = start_upgrader_server(procs, holder, spec, 30, third_err)
    assert third["port"] == port
    assert third["inode"] != first["inode"]  # a new kernel socket...
    # ...and the successor says so, in one line.
    assert third_err.read_text().splitlines() == [_note(spec, holder.path)]
    with socket.create_connection(("127.0.0.1", port), timeout=10) as conn:
        conn.sendall(b"ping\n")
        assert conn.recv(64) == f"{third['pid']}\n".encode()
    assert new.stdin is not None
    new.stdin.close()  # EOF: it parks (for 30 s) and exits
    assert new.wait(10) == 0
    client.release(holder.path, everything=True)


def test_exec_refuses_to_run_without_a_name_it_asked_for(procs: Procs, tmp_path: Path) -> None:
    holder = start_holder(procs, tmp_path)
    api = socket.create_server(("127.0.0.1", 0))
    inode = os.fstat(api.fileno()).st_ino
    client.deposit(holder.path, {"api": api}, ttl=60)
    api.close()
    marker = tmp_path / "ran"
    proc = procs.popen(
        exec_argv(holder, "--names", "web,api", "--", "touch", str(marker)),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == EXIT_ERROR
    assert out == b""
    assert err.decode().splitlines() == [
        "nodrop exec: not held: web (its TTL ran out or it was never parked); command not run"
    ]
    assert not marker.exists()
    # Nothing was claimed: what was held is still held, the same socket.
    assert [(p.name, p.inode) for p in client.list_parked(holder.path)] == [("api", inode)]
    assert "claimed" not in holder.log_text()
    client.release(holder.path, everything=True)


def test_exec_listen_says_which_listener_it_bound_fresh(procs: Procs, tmp_path: Path) -> None:
    holder = start_holder(procs, tmp_path)
    with socket.socket() as probe:  # a free port to ask for; nothing is parked on it
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    spec = f"tcp://127.0.0.1:{port}?name=web"
    proc = procs.popen(
        exec_argv(holder, "--listen", spec, "--", sys.executable, str(ACTIVATION)),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 0
    assert json.loads(out)["names"] == ["web"]  # bound, and the command ran with it
    assert err.decode().splitlines() == [f"nodrop exec: {_note(spec, holder.path)}"]


def _note(spec: str, path: str) -> str:
    return (
        f"bound {spec} fresh: the holder at {path} did not hold it (its TTL ran out before "
        "this claim, the holder is gone, or it was never parked); a TTL longer than the "
        "time to claim keeps the same socket"
    )
