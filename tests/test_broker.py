"""The connection broker in this process, with real receiving workers as
child processes and real TCP connections on loopback."""

from __future__ import annotations

import asyncio
import socket
import subprocess
import sys
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from conftest import CHILDREN, Procs
from nodrop.connhandoff.broker import ConnectionBroker
from nodrop.connhandoff.client import Giver, GiveResult
from nodrop.supervisor.model import GenState, WorkerState


class FakeHost:
    """The supervisor as the broker sees it: every peer is a ready worker of
    the active generation 2."""

    def __init__(self, *, workers: bool = True) -> None:
        self.active: Any = SimpleNamespace(number=2, state=GenState.ACTIVE)
        self.logs: list[str] = []
        self.workers = workers
        """False: no peer is a worker."""

    def worker_of(self, pid: int) -> Any:
        if not self.workers:
            return None
        return SimpleNamespace(pid=pid, state=WorkerState.READY), self.active

    def log(self, message: str) -> None:
        self.logs.append(message)


@pytest.fixture
def tcp_pairs() -> Iterator[Any]:
    with ExitStack() as stack:
        listener = stack.enter_context(socket.create_server(("127.0.0.1", 0)))

        def make(n: int) -> list[tuple[socket.socket, socket.socket]]:
            pairs = []
            for _ in range(n):
                client = stack.enter_context(
                    socket.create_connection(listener.getsockname(), timeout=5)
                )
                server, _ = listener.accept()
                stack.callback(server.close)
                pairs.append((client, server))
            return pairs

        yield make


def start_receiver(procs: Procs, path: str, room: int, mode: str) -> subprocess.Popen[bytes]:
    proc = procs.popen(
        [sys.executable, str(CHILDREN / "keepalive_receiver.py"), path, str(room), mode],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
    )
    assert proc.stdout is not None
    assert proc.stdout.readline() == b"registered\n"
    return proc


async def give_with_broker(
    broker: ConnectionBroker, conns: list[socket.socket], before: Any = None
) -> GiveResult:
    def give() -> GiveResult:
        if before is not None:
            before()
        giver = Giver.connect(broker.path, timeout=10)
        try:
            return giver.give(conns)
        finally:
            giver.close()

    return await asyncio.to_thread(give)


def run_broker(
    tmp_path: Path, scenario: Any, host: FakeHost | None = None, **kwargs: Any
) -> tuple[Any, ConnectionBroker]:
    broker = ConnectionBroker(str(tmp_path / "broker.sock"), **kwargs)
    host = host or FakeHost()

    async def main() -> Any:
        await broker.start(host)
        try:
            return await scenario(broker)
        finally:
            broker.close()

    return asyncio.run(main()), broker


def test_receiver_dies_mid_handoff_connections_closed_gracefully_and_counted(
    procs: Procs, tmp_path: Path, tcp_pairs: Any
) -> None:
    pairs = tcp_pairs(5)
    path = str(tmp_path / "broker.sock")
    proc: list[subprocess.Popen[bytes]] = []

    async def scenario(broker: ConnectionBroker) -> GiveResult:
        # The receiver registers while the broker's loop runs (in the giver's thread).
        def register() -> None:
            proc.append(start_receiver(procs, path, 100, "die"))

        return await give_with_broker(broker, [s for _, s in pairs], before=register)

    host = FakeHost()
    result, broker = run_broker(tmp_path, scenario, host, linger=0.5)
    assert result == GiveResult(placed=0, closed=5, unknown=0, returned=())
    assert proc[0].wait(timeout=10) == 3
    for client, _server in pairs:
        assert client.recv(10) == b""  # a FIN, not a reset: the close was graceful
    stats = broker.stats()
    assert stats["closed"] == 5
    assert stats["receivers_lost"] == 1
    assert stats["placed"] == 0
    assert stats["lingering"] == 0
    assert any("died or stalled" in line for line in host.logs)


def test_no_receiver_returns_every_connection_untouched(tmp_path: Path, tcp_pairs: Any) -> None:
    pairs = tcp_pairs(3)

    async def scenario(broker: ConnectionBroker) -> GiveResult:
        return await give_with_broker(broker, [s for _, s in pairs])

    result, broker = run_broker(tmp_path, scenario)
    assert result.returned == (0, 1, 2)
    assert result.placed == 0
    for client, server in pairs:  # still ours, still open: nothing was read or closed
        client.sendall(b"ping")
        assert server.recv(10) == b"ping"
    assert broker.stats()["returned"] == 3


def test_room_is_respected_and_the_rest_returned(
    procs: Procs, tmp_path: Path, tcp_pairs: Any
) -> None:
    pairs = tcp_pairs(5)
    path = str(tmp_path / "broker.sock")
    proc: list[subprocess.Popen[bytes]] = []

    async def scenario(broker: ConnectionBroker) -> GiveResult:
        def register() -> None:
            proc.append(start_receiver(procs, path, 3, "take"))

        return await give_with_broker(broker, [s for _, s in pairs], before=register)

    result, _broker = run_broker(tmp_path, scenario)
    assert result.placed == 3
    assert result.returned == (3, 4)
    out = proc[0].stdout
    assert out is not None
    assert out.readline() == b"got 3\n"
    # The placed ones live in the receiver: our copies are closed, theirs not.
    for client, _ in pairs[:3]:
        client.sendall(b"x")
    assert proc[0].poll() is None
    assert proc[0].stdin is not None
    proc[0].stdin.close()
    assert proc[0].wait(timeout=10) == 0


def test_a_peer_that_is_not_a_worker_is_refused(tmp_path: Path) -> None:
    from nodrop.errors import ProtocolError

    async def scenario(broker: ConnectionBroker) -> str:
        def try_give() -> str:
            from nodrop.connhandoff.client import Receiver

            with pytest.raises(ProtocolError) as info:
                Receiver.register(broker.path)
            return str(info.value)

        return await asyncio.to_thread(try_give)

    message, _ = run_broker(tmp_path, scenario, FakeHost(workers=False))
    assert "not a worker" in message
