"""Connection handoff end to end: a real `nodrop run`, the demo app, real clients."""

from __future__ import annotations

import concurrent.futures
import socket
import sys
from pathlib import Path

import pytest

from nodrop.load import LoadConfig, Mode, run_load
from nodrop.load.control_reloader import ControlReloader
from supervisor_harness import Start

DEMO = [sys.executable, "-m", "nodrop.demo.app"]

pytestmark = pytest.mark.slow


def ask(conn: socket.socket) -> str:
    """One keep-alive request on ``conn``; the body (or raise on EOF)."""
    conn.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    data = b""
    while b"\r\n\r\n" not in data or not data.endswith(b"\n"):
        chunk = conn.recv(4096)
        if not chunk:
            raise ConnectionError(f"EOF after {data!r}")
        data += chunk
    head, body = data.split(b"\r\n\r\n", 1)
    assert b"Connection: keep-alive" in head, head
    return body.decode()


def test_keepalive_load_twenty_reloads_no_failure_no_reconnect(supervise: Start) -> None:
    sup = supervise(
        "--handoff",
        "--listen",
        "tcp://127.0.0.1:0",
        "--workers",
        "2",
        "--ready-grace",
        "0.05",
        command=DEMO,
    )
    config = LoadConfig(
        host="127.0.0.1",
        port=sup.port(),
        mode=Mode.KEEPALIVE,
        concurrency=16,
        duration=8.0,
        processes=1,
        reload_every=0.35,
        reloads=20,
        timeout=5.0,
    )
    result = run_load(config, ControlReloader(sup.control))
    assert len(result.reloads) == 20
    assert all(r.ok for r in result.reloads), [r.message for r in result.reloads if not r.ok]
    assert result.ok > 1000, "the load generator barely ran"
    assert result.failed == 0, result.outcomes
    assert result.reconnects == 0, result.reconnect_causes
    handoff = sup.status()["handoff"]
    assert handoff["placed"] > 0, handoff
    assert handoff["closed"] == 0, handoff
    assert f"placed {handoff['placed']}, returned" in sup.cli("status").stdout
    assert sup.stop() == 0


def test_500_idle_connections_survive_5_reloads(supervise: Start) -> None:
    sup = supervise(
        "--handoff",
        "--listen",
        "tcp://127.0.0.1:0",
        "--workers",
        "2",
        "--ready-grace",
        "0.05",
        command=DEMO,
    )
    port = sup.port()
    conns = [socket.create_connection(("127.0.0.1", port), timeout=10) for _ in range(500)]
    try:
        ports = [c.getsockname()[1] for c in conns]
        assert {ask(c).split(",")[0] for c in conns} == {"hello from generation 1"}
        for number in range(2, 7):
            answer = sup.reload(wait="drained")
            assert answer["ok"], answer
            bodies = [ask(c) for c in conns]  # raises on any closed connection
            assert {b.split(",")[0] for b in bodies} == {f"hello from generation {number}"}
        assert [c.getsockname()[1] for c in conns] == ports
        handoff = sup.status()["handoff"]
        assert handoff["placed"] == 5 * 500, handoff
        assert handoff["closed"] == 0, handoff
    finally:
        for c in conns:
            c.close()
    assert sup.stop() == 0


SESSIONS = [sys.executable, str(Path(__file__).parent / "children" / "keepalive_sessions.py")]


def _ws_client(port: int) -> socket.socket:
    conn = socket.create_connection(("127.0.0.1", port), timeout=10)
    conn.sendall(
        b"GET /echo HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
    )
    head = b""
    while b"\r\n\r\n" not in head:
        chunk = conn.recv(1)
        assert chunk, "EOF during the WebSocket handshake"
        head += chunk
    assert b"s3pPLMBiTxaQ9kYGzzhZRbK+xOo=" in head, head
    return conn


def _ws_echo(conn: socket.socket, text: str) -> str:
    from nodrop.connhandoff.websocket import OP_TEXT, encode_frame

    conn.sendall(encode_frame(OP_TEXT, text.encode(), mask=b"\x01\x02\x03\x04"))
    b0, b1 = _recv_exact(conn, 2)
    n = b1 & 0x7F
    if n == 126:
        n = int.from_bytes(_recv_exact(conn, 2), "big")
    assert b0 & 0x0F == OP_TEXT
    return _recv_exact(conn, n).decode()


def _recv_exact(conn: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = conn.recv(n - len(data))
        if not chunk:
            raise ConnectionError("EOF")
        data += chunk
    return data


def _line(conn: socket.socket, text: str) -> str:
    conn.sendall(text.encode() + b"\n")
    data = b""
    while not data.endswith(b"\n"):
        chunk = conn.recv(4096)
        if not chunk:
            raise ConnectionError("EOF")
        data += chunk
    return data.decode().strip()


def test_websocket_and_line_sessions_survive_5_reloads_with_state(supervise: Start) -> None:
    sup = supervise(
        "--handoff",
        "--listen",
        "tcp://127.0.0.1:0?name=line",
        "--listen",
        "tcp://127.0.0.1:0?name=ws",
        "--ready-grace",
        "0.05",
        command=SESSIONS,
    )
    line = socket.create_connection(("127.0.0.1", sup.port(0)), timeout=10)
    ws = _ws_client(sup.port(1))
    try:
        first_line = _line(line, "hello")
        first_ws = _ws_echo(ws, "hi")
        line_session = first_line.split()[1]
        ws_session = first_ws.split()[1]
        assert first_line.endswith("count=1 gen=1")
        assert first_ws.endswith("count=1 gen=1")
        for number in range(2, 7):
            assert sup.reload(wait="drained")["ok"]
            assert _line(line, "hello") == f"hello {line_session} count={number} gen={number}"
            assert _ws_echo(ws, "hi") == f"hi {ws_session} count={number} gen={number}"
        handoff = sup.status()["handoff"]
        assert handoff["placed"] == 10, handoff
        assert handoff["closed"] == 0, handoff
    finally:
        line.close()
        ws.close()
    assert sup.stop() == 0


def test_reexec_with_handoff_on_keeps_handing_over(supervise: Start) -> None:
    sup = supervise(
        "--handoff", "--listen", "tcp://127.0.0.1:0", "--workers", "2", "--ready-grace", "0.05",
        command=DEMO,
    )  # fmt: skip
    port = sup.port()
    config = LoadConfig(
        host="127.0.0.1", port=port, mode=Mode.KEEPALIVE, concurrency=8, duration=6.0,
        processes=1, timeout=5.0,
    )  # fmt: skip
    # Idle keep-alive connections of our own: whether or not the load still
    # runs by the last reload, these are open and idle when generation 2 drains.
    idle = [socket.create_connection(("127.0.0.1", port), timeout=10) for _ in range(4)]
    try:
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            load = pool.submit(run_load, config)
            assert sup.reload(wait="drained")["ok"]  # generation 2 registers its receivers
            assert {ask(c).split(",")[0] for c in idle} == {"hello from generation 2"}
            for _ in range(2):
                done = sup.cli("reexec")
                assert done.returncode == 0, done.stdout + done.stderr
            placed_before = sup.status()["handoff"]["placed"]
            # Generation 2's drain after the re-execs goes through the adopted broker.
            answer = sup.reload(wait="drained")
            assert answer["ok"], answer
            bodies = [ask(c) for c in idle]  # raises on a connection that was closed
            result = load.result()
    finally:
        for c in idle:
            c.close()
    assert {b.split(",")[0] for b in bodies} == {"hello from generation 3"}
    status = sup.status()
    assert status["reexecs"] == 2
    placed = status["handoff"]["placed"]
    assert placed >= placed_before + len(idle), (placed_before, status["handoff"])
    assert result.failed == 0, result.outcomes
    assert result.reconnects == 0, result.reconnect_causes
    assert sup.stop() == 0
