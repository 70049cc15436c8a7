"""The load generator against real servers on 127.0.0.1: classification,
keepalive reconnects, and whole runs with a fake reloader.

Every server is a thread the test owns; every wait has a deadline.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import socket
import struct
import threading
import time
from collections.abc import Iterator

import pytest

from nodrop.load import (
    CommandReloader,
    LoadConfig,
    Mode,
    Outcome,
    ReloadRecord,
    classify,
    format_table,
    run_load,
)
from nodrop.load.client import KeptConnection, http_close_attempt, tcp_line_attempt
from nodrop.load.http import build_request

DEADLINE = 10.0
ADDR_FAMILY = socket.AF_INET


class Behaviour(enum.Enum):
    OK = "ok"  # HTTP 200, keep-alive unless asked to close
    STATUS_503 = "503"
    RESET = "reset"  # SO_LINGER 0 + close right after accept
    EOF = "eof"  # read the request, close without answering
    STALL = "stall"  # read the request, never answer (until teardown)
    GARBAGE = "garbage"  # answer something that is not HTTP
    CLOSE_HEADER = "close-header"  # 200 with Connection: close, every time
    ECHO_LINE = "echo-line"  # raw TCP: echo one line


class Server:
    """A threaded test server on 127.0.0.1:0 with a chosen behaviour."""

    def __init__(self, behaviour: Behaviour) -> None:
        self.behaviour = behaviour
        self.lsock = socket.create_server(("127.0.0.1", 0), backlog=128)
        self.port: int = self.lsock.getsockname()[1]
        self.stopping = threading.Event()
        self.accepted = 0
        self.requests = 0
        self.lock = threading.Lock()
        self.changed = threading.Condition(self.lock)
        self.conns: set[socket.socket] = set()
        self.draining: set[socket.socket] = set()
        self.threads: list[threading.Thread] = []
        self._wake_r, self._wake_w = socket.socketpair()
        self._acceptor = threading.Thread(target=self._accept_loop, daemon=True)
        self._acceptor.start()

    def _accept_loop(self) -> None:
        import selectors

        with selectors.DefaultSelector() as sel:
            sel.register(self.lsock, selectors.EVENT_READ)
            sel.register(self._wake_r, selectors.EVENT_READ)
            while not self.stopping.is_set():
                for key, _ in sel.select():
                    if key.fileobj is self._wake_r:
                        return
                    conn, _ = self.lsock.accept()
                    with self.changed:
                        self.accepted += 1
                        self.conns.add(conn)
                        self.changed.notify_all()
                    t = threading.Thread(target=self._handle, args=(conn,), daemon=True)
                    self.threads.append(t)
                    t.start()

    def _handle(self, conn: socket.socket) -> None:
        try:
            self._serve(conn)
        except OSError:
            pass
        finally:
            # Closed first: once a waiter sees the connection gone, its FIN
            # or RST is already on the client's side (loopback is synchronous).
            conn.close()
            with self.changed:
                self.conns.discard(conn)
                self.changed.notify_all()

    def _serve(self, conn: socket.socket) -> None:
        b = self.behaviour
        if b is Behaviour.RESET:
            conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            return
        buf = bytearray()
        while True:
            sep = b"\n" if b is Behaviour.ECHO_LINE else b"\r\n\r\n"
            while sep not in buf:
                data = conn.recv(65536)
                if not data:
                    return
                buf += data
            end = buf.index(sep) + len(sep)
            request = bytes(buf[:end])
            del buf[:end]
            with self.changed:
                self.requests += 1
                self.changed.notify_all()
            if b is Behaviour.ECHO_LINE:
                conn.sendall(request)
                continue
            if b is Behaviour.EOF:
                return
            if b is Behaviour.STALL:
                self.stopping.wait(DEADLINE)
                return
            if b is Behaviour.GARBAGE:
                conn.sendall(b"SSH-2.0-OpenSSH\r\n\r\n")
                return
            with self.lock:
                draining = conn in self.draining
            close = (
                b"connection: close" in request.lower() or b is Behaviour.CLOSE_HEADER or draining
            )
            status = b"503 Service Unavailable" if b is Behaviour.STATUS_503 else b"200 OK"
            conn.sendall(
                b"HTTP/1.1 "
                + status
                + b"\r\nContent-Length: 2\r\n"
                + (b"Connection: close\r\n" if close else b"")
                + b"\r\nok"
            )
            if close:
                return

    def wait_for(self, predicate: object, what: str) -> None:
        """Wait (with a deadline) until ``predicate()`` holds under the lock."""
        assert callable(predicate)
        with self.changed:
            if not self.changed.wait_for(predicate, timeout=DEADLINE):
                raise AssertionError(f"timed out waiting for {what}")

    def drain(self) -> int:
        """Graceful: every open connection's next response says Connection: close."""
        with self.changed:
            self.draining = set(self.conns)
            return len(self.draining)

    def drop_all(self, *, reset: bool = False) -> int:
        """Close every open connection from the server side; return how many."""
        with self.changed:
            conns = list(self.conns)
        for conn in conns:
            if reset:
                conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            # Wakes the handler's recv, which then closes. SHUT_RDWR sends a
            # FIN at once; SHUT_RD sends nothing, so linger 0 makes it an RST.
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RD if reset else socket.SHUT_RDWR)
        return len(conns)

    def close(self) -> None:
        self.stopping.set()
        self._wake_w.send(b"x")
        self._acceptor.join(DEADLINE)
        self.drop_all()
        for t in self.threads:
            t.join(DEADLINE)
        assert not self._acceptor.is_alive()
        assert not any(t.is_alive() for t in self.threads)
        self.lsock.close()
        self._wake_r.close()
        self._wake_w.close()


@pytest.fixture
def server_factory() -> Iterator[object]:
    servers: list[Server] = []

    def make(behaviour: Behaviour) -> Server:
        server = Server(behaviour)
        servers.append(server)
        return server

    yield make
    for server in servers:
        server.close()


def _close_attempt(port: int, timeout: float = 2.0) -> Outcome:
    request = build_request("127.0.0.1", port, "/", keep_alive=False)
    outcome, _ = asyncio.run(http_close_attempt(ADDR_FAMILY, ("127.0.0.1", port), request, timeout))
    return outcome


# --- classification, provoked for real ------------------------------------


@pytest.mark.parametrize(
    ("behaviour", "expected"),
    [
        (Behaviour.OK, Outcome.OK),
        (Behaviour.STATUS_503, Outcome.BAD_STATUS),
        (Behaviour.GARBAGE, Outcome.BAD_STATUS),
        (Behaviour.RESET, Outcome.RESET),
        (Behaviour.EOF, Outcome.EOF),
    ],
)
def test_close_mode_classifies_real_servers(
    server_factory: object, behaviour: Behaviour, expected: Outcome
) -> None:
    assert callable(server_factory)
    server = server_factory(behaviour)
    assert _close_attempt(server.port) is expected


def test_refused_port(refused_port: int) -> None:
    assert _close_attempt(refused_port) is Outcome.REFUSED


def test_stalled_server_times_out(server_factory: object) -> None:
    assert callable(server_factory)
    server = server_factory(Behaviour.STALL)
    started = time.monotonic()
    assert _close_attempt(server.port, timeout=0.3) is Outcome.TIMEOUT
    assert 0.3 <= time.monotonic() - started < 2.0


def test_tcp_line_mode(server_factory: object, refused_port: int) -> None:
    assert callable(server_factory)
    echo = server_factory(Behaviour.ECHO_LINE)

    async def attempt(port: int) -> Outcome:
        return await tcp_line_attempt(ADDR_FAMILY, ("127.0.0.1", port), b"ping\n", 2.0)

    assert asyncio.run(attempt(echo.port)) is Outcome.OK
    assert asyncio.run(attempt(refused_port)) is Outcome.REFUSED
    eof = server_factory(Behaviour.EOF)  # reads to "\r\n\r\n": never, then teardown
    reset = server_factory(Behaviour.RESET)
    assert asyncio.run(attempt(reset.port)) is Outcome.RESET
    del eof


def test_broken_pipe_provoked_on_a_real_socket(server_factory: object) -> None:
    """EPIPE: send again after the peer's RST was already reported.

    The generator itself sends one request per attempt, so it meets EPIPE
    only in a race; here the errno is provoked deterministically and fed to
    the classifier.
    """
    assert callable(server_factory)
    server = server_factory(Behaviour.OK)
    with socket.create_connection(("127.0.0.1", server.port), timeout=DEADLINE) as sock:
        server.wait_for(lambda: server.conns, "the server to accept")
        server.drop_all(reset=True)
        with pytest.raises(ConnectionResetError) as first:
            sock.recv(1)  # blocks until the RST arrives (bounded by the timeout)
        assert classify(error=first.value) is Outcome.RESET
        with pytest.raises(BrokenPipeError) as second:
            sock.send(b"GET / HTTP/1.1\r\n\r\n")
        assert classify(error=second.value) is Outcome.BROKEN_PIPE


# --- keepalive reconnects ---------------------------------------------------


async def _kept_attempts(
    port: int, drops: list[object], n: int
) -> tuple[list[Outcome], list[tuple[float, Outcome | None]]]:
    """n attempts on one KeptConnection; before attempt i, call drops[i] if set."""
    request = build_request("127.0.0.1", port, "/", keep_alive=True)
    conn = KeptConnection(ADDR_FAMILY, ("127.0.0.1", port), request, 2.0)
    outcomes = []
    try:
        for i in range(n):
            action = drops[i] if i < len(drops) else None
            if action is not None:
                assert callable(action)
                action()
            outcomes.append(await conn.attempt())
    finally:
        conn.close()
    return outcomes, conn.lost


def test_keepalive_reuses_one_connection(server_factory: object) -> None:
    assert callable(server_factory)
    server = server_factory(Behaviour.OK)
    outcomes, lost = asyncio.run(_kept_attempts(server.port, [], 5))
    assert outcomes == [Outcome.OK] * 5
    assert lost == []
    assert server.accepted == 1


def test_keepalive_counts_clean_close_while_idle(server_factory: object) -> None:
    assert callable(server_factory)
    server = server_factory(Behaviour.OK)

    def drop() -> None:
        assert server.drop_all() == 1
        server.wait_for(lambda: not server.conns, "the server to close the connection")

    outcomes, lost = asyncio.run(_kept_attempts(server.port, [None, None, drop, None, drop], 6))
    assert outcomes == [Outcome.OK] * 6  # the idle check reconnects before sending
    assert [cause for _, cause in lost] == [None, None]
    assert server.accepted == 3


def test_keepalive_counts_reset_while_idle(server_factory: object) -> None:
    assert callable(server_factory)
    server = server_factory(Behaviour.OK)

    def drop() -> None:
        server.drop_all(reset=True)
        server.wait_for(lambda: not server.conns, "the server to reset the connection")

    outcomes, lost = asyncio.run(_kept_attempts(server.port, [None, drop], 3))
    assert outcomes == [Outcome.OK] * 3
    assert [cause for _, cause in lost] == [Outcome.RESET]


def test_keepalive_connection_close_header_reconnects(server_factory: object) -> None:
    assert callable(server_factory)
    server = server_factory(Behaviour.CLOSE_HEADER)
    outcomes, lost = asyncio.run(_kept_attempts(server.port, [], 4))
    assert outcomes == [Outcome.OK] * 4
    assert [cause for _, cause in lost] == [None] * 4
    assert server.accepted == 4


def test_keepalive_failure_reconnects(server_factory: object) -> None:
    assert callable(server_factory)
    server = server_factory(Behaviour.EOF)  # reads the request, closes: each attempt fails
    outcomes, lost = asyncio.run(_kept_attempts(server.port, [], 3))
    assert outcomes == [Outcome.EOF] * 3
    assert [cause for _, cause in lost] == [Outcome.EOF] * 3


# --- whole runs ------------------------------------------------------------


class FakeReloader:
    """Counts calls; each reload drains every kept connection gracefully (the
    next response says ``Connection: close``) and waits until the clients
    reconnected: the window covers every reconnect it caused."""

    def __init__(self, server: Server) -> None:
        self.server = server
        self.calls = 0
        self.records: list[ReloadRecord] = []

    def reload(self) -> ReloadRecord:
        self.calls += 1
        started = time.monotonic()
        before = self.server.accepted
        dropped = self.server.drain()
        self.server.wait_for(
            lambda: self.server.accepted >= before + dropped, "clients to reconnect"
        )
        record = ReloadRecord(started, time.monotonic(), time.monotonic(), True, "fake")
        self.records.append(record)
        return record


def test_run_load_with_reloads(server_factory: object) -> None:
    assert callable(server_factory)
    server = server_factory(Behaviour.OK)
    reloader = FakeReloader(server)
    config = LoadConfig(
        host="127.0.0.1",
        port=server.port,
        mode=Mode.KEEPALIVE,
        concurrency=4,
        processes=2,
        duration=1.5,
        reload_every=0.5,
        reloads=2,
        timeout=2.0,
    )
    result = run_load(config, reloader)
    assert reloader.calls == 2
    assert result.reloads == tuple(reloader.records)
    for i, rec in enumerate(result.reloads):
        # Scheduled every 0.5 s from the start; a slow machine may run late, never early.
        assert rec.started - result.started >= 0.5 * (i + 1)
        assert rec.window == (rec.started, rec.old_exited)
    assert result.failed == 0, format_table(result)
    assert result.ok == result.attempts > 0
    assert result.processes == 2
    # Each reload dropped the 4 kept connections; each worker task noticed inside the window.
    assert result.reconnects == 8
    assert result.reconnects_in_reload == 8
    assert result.reconnect_causes == {"clean_close": 8}
    assert result.reload.count + result.steady.count == result.ok
    assert result.reload.count > 0
    assert sum(s.attempts for s in result.timeline) == result.attempts
    assert len(result.timeline) == 2  # 1.5 s -> seconds 0 and 1


def test_run_load_is_bounded_by_count(server_factory: object) -> None:
    assert callable(server_factory)
    server = server_factory(Behaviour.OK)
    config = LoadConfig(
        host="127.0.0.1",
        port=server.port,
        mode=Mode.CLOSE,
        concurrency=3,
        processes=2,
        duration=30.0,
        max_requests=41,
    )
    started = time.monotonic()
    result = run_load(config)
    assert result.attempts == result.ok == 41
    assert server.requests == 41
    assert time.monotonic() - started < 15


def test_run_load_counts_refused(refused_port: int) -> None:
    config = LoadConfig(
        host="127.0.0.1",
        port=refused_port,
        mode=Mode.TCP,
        concurrency=2,
        processes=1,
        duration=0.3,
        max_requests=20,
    )
    result = run_load(config)
    assert result.attempts == result.outcomes["refused"] == 20
    assert result.failed_per_million == 1e6
    assert "refused" in format_table(result)


def test_command_reloader_records_the_command() -> None:
    ok = CommandReloader("true", settle=0.0).reload()
    assert ok.ok
    assert ok.ready is None
    assert ok.old_exited is None
    assert ok.finished is not None
    assert ok.window == (ok.started, ok.finished)
    failed = CommandReloader("echo nope >&2; exit 3").reload()
    assert not failed.ok
    assert "exited 3" in failed.message
    assert "nope" in failed.message
    slow = CommandReloader("exec sleep 5", timeout=0.2).reload()
    assert not slow.ok
    assert "timed out" in slow.message
