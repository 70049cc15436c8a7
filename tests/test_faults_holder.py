"""Fault matrix: kill -9 of the holder while it holds a parked listener
(issue 13, item 4).

What the docs promise (docs/holder.md, "parked sockets die with the
holder") and nothing more: the parked socket closes with the holder, so
the connections queued on it are reset and new ones refused -- no client
hangs -- and the successor, finding no holder, binds the port afresh (no
EADDRINUSE, no stale socket file in its way) and serves.
"""

from __future__ import annotations

import os
import signal
import socket
from pathlib import Path

import pytest

from conftest import Procs
from test_holder import start_holder
from test_holder_e2e import park, start_server


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
