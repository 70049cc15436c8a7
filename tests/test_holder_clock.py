"""The holder's timeouts -- deposit TTLs, idle and stalled peers, exit when
empty -- on a fake clock.

The :class:`~nodrop.holder.daemon.Holder` runs in this process on real
sockets, driven one turn at a time (:meth:`Holder.step`); its ``clock`` is a
:class:`~nodrop.testing.clock.FakeClock`, so a 60 s idle timeout passes when
the test says so, not after a minute. Blocking client calls run in a thread
while the test turns the holder's loop. The holder as a real process is
tested in ``test_holder.py`` and ``test_holder_e2e.py``.
"""

from __future__ import annotations

import concurrent.futures
import os
import socket
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest

from nodrop.fdwire import Channel, connect
from nodrop.holder import client
from nodrop.holder.config import DEFAULT_FIRST_MESSAGE_TIMEOUT, EMPTY_GRACE, HolderConfig
from nodrop.holder.daemon import Holder
from nodrop.testing import FakeClock

T = TypeVar("T")

#: Real seconds any one exchange with the in-process holder may take.
DEADLINE = 10.0
IDLE = 60.0
PEER = 10.0


class Driven:
    """An in-process holder on a fake clock, and its log lines."""

    def __init__(self, tmp_path: Path, **options: Any) -> None:
        self.clock = FakeClock()
        self.lines: list[str] = []
        self.path = str(tmp_path / "run" / "holder.sock")
        config = HolderConfig(
            self.path,
            peer_timeout=PEER,
            idle_timeout=IDLE,
            **options,
        )
        self.holder = Holder(config, log=self.lines.append, clock=self.clock)
        self.holder.open()

    def turn(self) -> None:
        """One turn of the holder's loop without waiting: whatever is ready
        now is handled, and whatever is due at the clock's time expires."""
        self.holder.step(0)

    def call(self, fn: Callable[[], T]) -> T:
        """Run a blocking client call in a thread while turning the holder's
        loop (each turn waits for the holder's sockets, up to 10 ms)."""
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            future = pool.submit(fn)
            deadline = time.monotonic() + DEADLINE
            while not future.done():
                if time.monotonic() > deadline:
                    raise TimeoutError("the client call did not finish")
                self.holder.step(0.01)
            return future.result()

    def log(self) -> str:
        return "\n".join(self.lines)

    def close(self) -> None:
        self.holder.close()


@pytest.fixture
def driven(tmp_path: Path) -> Iterator[Driven]:
    holder = Driven(tmp_path)
    yield holder
    holder.close()


def listener() -> socket.socket:
    return socket.create_server(("127.0.0.1", 0))


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def peer(driven: Driven) -> Channel:
    """A raw connection the holder has accepted."""
    channel = connect(driven.path, timeout=DEADLINE)
    driven.turn()
    assert len(driven.holder.peers) == 1
    return channel


def test_ttl_expiry_closes_every_held_fd_at_the_ttl(driven: Driven) -> None:
    baseline = open_fds()
    socks = [listener() for _ in range(5)]
    port = socks[0].getsockname()[1]
    result = driven.call(
        lambda: client.deposit(driven.path, [(f"l{i}", s) for i, s in enumerate(socks)], ttl=30)
    )
    assert len(result.ids) == 5
    assert result.ttl == 30
    for sock in socks:
        sock.close()
    held = open_fds()
    assert held == baseline + 5  # the holder's copies, in this process
    driven.clock.advance(29.9)
    driven.turn()
    assert open_fds() == held
    assert [p.expires_in for p in driven.call(lambda: client.list_parked(driven.path))] == [
        pytest.approx(0.1)
    ] * 5
    driven.clock.advance(0.1)
    driven.turn()
    assert open_fds() == baseline
    assert "expired, closed 5 socket(s)" in driven.log()
    assert driven.call(lambda: client.list_parked(driven.path)) == []
    # The last copy of the listening socket is gone: nothing listens on its port.
    with pytest.raises(ConnectionRefusedError), socket.create_connection(("127.0.0.1", port)):
        pass


def test_each_deposit_keeps_its_own_ttl(driven: Driven) -> None:
    short, long = listener(), listener()
    with short, long:
        driven.call(lambda: client.deposit(driven.path, {"short": short}, ttl=5))
        driven.clock.advance(3)
        driven.call(lambda: client.deposit(driven.path, {"long": long}, ttl=5))
        driven.clock.advance(2)
        driven.turn()
        assert [p.name for p in driven.call(lambda: client.list_parked(driven.path))] == ["long"]
        driven.clock.advance(3)
        driven.turn()
        assert driven.call(lambda: client.list_parked(driven.path)) == []


def test_an_idle_connection_is_closed_at_the_idle_timeout(driven: Driven) -> None:
    with peer(driven) as channel:
        channel.send({"op": "list"})  # it spoke: the idle timeout applies from here
        driven.turn()
        assert channel.recv()[0]["op"] == "ok"
        driven.clock.advance(IDLE - 0.001)
        driven.turn()
        assert len(driven.holder.peers) == 1
        driven.clock.advance(0.001)
        driven.turn()
        assert driven.holder.peers == {}
        assert channel.sock.recv(16) == b""  # closed without a word: it was idle


def test_a_connection_that_never_speaks_is_closed_at_the_first_message_deadline(
    driven: Driven,
) -> None:
    """Issue 13 D: a silent connection used to stay for the whole idle timeout."""
    with peer(driven) as channel:
        driven.clock.advance(DEFAULT_FIRST_MESSAGE_TIMEOUT - 0.001)
        driven.turn()
        assert len(driven.holder.peers) == 1
        driven.clock.advance(0.001)
        driven.turn()
        assert driven.holder.peers == {}
        assert channel.sock.recv(16) == b""


def test_a_request_restarts_the_idle_timeout(driven: Driven) -> None:
    with peer(driven) as channel:
        driven.clock.advance(IDLE - 1)
        channel.send({"op": "list"})
        driven.turn()
        assert channel.recv()[0]["op"] == "ok"
        driven.clock.advance(IDLE - 1)
        driven.turn()
        assert len(driven.holder.peers) == 1
        driven.clock.advance(1)
        driven.turn()
        assert driven.holder.peers == {}


def test_a_peer_that_stalls_mid_deposit_is_dropped_at_the_peer_timeout(
    driven: Driven,
) -> None:
    with peer(driven) as channel:
        channel.send({"op": "deposit", "ttl": 60})  # ...and the fds never come
        driven.turn()
        driven.clock.advance(PEER - 0.001)
        driven.turn()
        assert len(driven.holder.peers) == 1
        driven.clock.advance(0.001)
        driven.turn()
        assert driven.holder.peers == {}
        header, _ = channel.recv()
        assert header["op"] == "error"
        assert header["message"] == "timed out during receiving"
    assert "timed out during receiving" in driven.log()


def test_an_on_demand_holder_that_never_held_anything_exits_after_the_grace(
    tmp_path: Path,
) -> None:
    driven = Driven(tmp_path, exit_when_empty=True)
    try:
        driven.turn()
        driven.clock.advance(EMPTY_GRACE)
        started = time.monotonic()
        driven.holder.serve()  # returns at once: the grace is over by its clock
        assert time.monotonic() - started < DEADLINE
        assert "nothing held; exiting" in driven.log()
    finally:
        driven.close()


def test_an_on_demand_holder_exits_when_its_last_socket_expires(tmp_path: Path) -> None:
    driven = Driven(tmp_path, exit_when_empty=True)
    try:
        with listener() as sock:
            driven.call(lambda: client.deposit(driven.path, {"web": sock}, ttl=5))
        driven.turn()  # the depositor's hang-up
        driven.clock.advance(5)
        driven.holder.serve()  # expires it, then finds nothing held
        assert "expired, closed 1 socket(s)" in driven.log()
        assert driven.log().endswith("nothing held; exiting")
    finally:
        driven.close()


def test_bad_fdstore_datagrams_are_logged_at_a_bounded_rate(tmp_path: Path) -> None:
    """Issue 13 F, for the holder's fd store: one line per datagram was a log flood."""
    fdstore = str(tmp_path / "run" / "fdstore.sock")
    driven = Driven(tmp_path, fdstore_path=fdstore)
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sender:
            for _ in range(5):  # in bursts: a Unix datagram queue holds 10 (max_dgram_qlen)
                for _ in range(8):
                    sender.sendto(b"FDSTOREREMOVE=1", fdstore)  # no FDNAME=: refused
                driven.turn()
            assert driven.log().count("FDSTOREREMOVE=1 needs FDNAME=") == 1, driven.log()
            driven.clock.advance(10)
            driven.turn()
            assert "39 more bad fdstore datagrams in the last 10s" in driven.log(), driven.log()
    finally:
        driven.close()
