"""The fd handoff protocol, between real processes, with hostile input."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from conftest import CHILDREN, Procs
from nodrop.errors import PeerDeniedError, ProtocolError, TruncatedError
from nodrop.fdwire import (
    MAX_MESSAGE,
    Channel,
    accept,
    channel_pair,
    decode,
    encode,
    listen,
    parse_fds_chunk,
)
from nodrop.kernel.fdpass import ensure_fd_room, send_with_fds
from nodrop.listeners.held import HeldSocket
from nodrop.listeners.identity import SocketIdentity


def listeners(n: int) -> list[HeldSocket]:
    out = []
    for i in range(n):
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        sock.listen(8)
        out.append(HeldSocket.adopt(sock, f"l{i}"))
    return out


@pytest.fixture
def pair() -> Iterator[tuple[Channel, Channel]]:
    a, b = channel_pair()
    yield a, b
    a.close()
    b.close()


def inode(fd: int) -> int:
    return os.fstat(fd).st_ino


def test_round_trip_in_one_process(pair: tuple[Channel, Channel]) -> None:
    a, b = pair
    held = listeners(3)
    try:
        a.send_sockets(held, meta={"generation": 4})
        transfer = b.take()
        assert a.expect_ok() == {"v": 1, "op": "ok", "count": 3}
        assert [s.name for s in transfer.sockets] == ["l0", "l1", "l2"]
        assert [s.identity for s in transfer.sockets] == [h.identity for h in held]
        assert [inode(s.fd) for s in transfer.sockets] == [inode(h.fileno()) for h in held]
        assert transfer.meta == {"generation": 4}
        sock = transfer.sockets[0].socket()
        assert sock.getsockname() == held[0].sock.getsockname()
        sock.close()
        transfer.close()
    finally:
        for h in held:
            h.sock.close()


def test_empty_transfer(pair: tuple[Channel, Channel]) -> None:
    a, b = pair
    a.send_sockets([])
    assert b.take().sockets == []
    assert a.expect_ok()["count"] == 0


@pytest.fixture
def handoff_path(tmp_path: Path) -> Path:
    return tmp_path / "handoff.sock"


def spawn_receiver(procs: Procs, path: Path, *limits: int) -> subprocess.Popen[bytes]:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    return procs.popen(
        [sys.executable, str(CHILDREN / "handoff_child.py"), str(path), *map(str, limits)],
        env=env,
        stdout=subprocess.PIPE,
    )


def give_to_child(
    procs: Procs, path: Path, held: list[HeldSocket], *limits: int
) -> tuple[dict[str, Any], Exception | None]:
    server = listen(str(path))
    try:
        proc = spawn_receiver(procs, path, *limits)
        channel, creds = accept(server, timeout=60)
        assert creds.pid == proc.pid
        error = None
        with channel:
            try:
                channel.give(held, meta={"from": "test"})
            except (ProtocolError, OSError) as exc:
                error = exc
        assert proc.stdout is not None
        report = json.loads(proc.stdout.readline())
        proc.wait(timeout=30)
        return report, error
    finally:
        server.close()


@pytest.mark.timeout(300)
def test_ten_thousand_listeners_between_processes(procs: Procs, handoff_path: Path) -> None:
    ensure_fd_room(10_000)
    held = listeners(10_000)
    try:
        report, error = give_to_child(procs, handoff_path, held)
        assert error is None
        assert report["count"] == 10_000
        assert report["inodes"] == sorted(inode(h.fileno()) for h in held)
        assert report["names"] == ["l0", "l1", "l2", "l3", "l4"]
        assert report["identities"][0] == str(held[0].identity)
        assert report["meta"] == {"from": "test"}
    finally:
        for h in held:
            h.sock.close()


def test_receiver_without_room_gets_a_clear_error_and_nothing_is_lost(
    procs: Procs, handoff_path: Path
) -> None:
    """Near RLIMIT_NOFILE the kernel would truncate SCM_RIGHTS: never silently."""
    held = listeners(600)
    try:
        report, error = give_to_child(procs, handoff_path, held, 64, 64)
        assert report["type"] == "TruncatedError"
        assert "RLIMIT_NOFILE" in report["error"] or "truncated" in report["error"]
        assert isinstance(error, ProtocolError)  # the sender was told
        for h in held:  # and still holds every socket
            assert h.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN) == 1
    finally:
        for h in held:
            h.sock.close()


def test_receiver_raises_its_soft_limit_when_it_can(procs: Procs, handoff_path: Path) -> None:
    held = listeners(600)
    try:
        report, error = give_to_child(procs, handoff_path, held, 300, 4096)
        assert error is None
        assert report["count"] == 600
    finally:
        for h in held:
            h.sock.close()


IDENT = SocketIdentity(2, 1, 6, ("inet", "127.0.0.1", 80), True, False).to_wire()

# (header, number of fds sent along, error fragment)
MALFORMED: list[tuple[Any, int, str]] = [
    ({"op": "fds", "total": 1, "offset": 0, "fds": []}, 1, "0 sockets but 1 fds"),
    ({"op": "fds", "total": 1, "offset": 0, "fds": [["a", *IDENT]]}, 0, "1 sockets but 0 fds"),
    ({"op": "fds", "total": 2, "offset": 1, "fds": [["a", *IDENT]]}, 1, "offset 1, expected 0"),
    ({"op": "fds", "total": 10**9, "offset": 0, "fds": [["a", *IDENT]]}, 1, "total"),
    ({"op": "fds", "total": 1, "offset": 0, "fds": [["a", [1]]]}, 1, "bad identity"),
    ({"op": "fds", "total": 1, "offset": 0, "fds": [["", *IDENT]]}, 1, "name empty"),
    ({"op": "fds", "total": 1, "offset": 0, "fds": [[7, *IDENT]]}, 1, "[name, *identity]"),
    ({"op": "fds", "total": 1, "offset": 0, "fds": [["a", *IDENT]], "meta": []}, 1, "meta"),
    ({"op": "fds", "total": 0, "offset": 0, "fds": [["a", *IDENT]]}, 1, "more fds"),
    ({"op": "deposit"}, 0, "expected an fds message"),
    ("not an object", 0, "not a JSON object"),
]


@pytest.mark.parametrize(("header", "nfds", "error"), MALFORMED)
def test_malformed_transfers_are_refused_and_fds_closed(
    pair: tuple[Channel, Channel], header: Any, nfds: int, error: str
) -> None:
    a, b = pair
    with socket.socket() as carried:
        data = json.dumps(header if not isinstance(header, dict) else {"v": 1, **header}).encode()
        send_with_fds(a.sock, data, [carried.fileno()] * nfds)
        with pytest.raises(ProtocolError) as info:
            b.recv_sockets()
        assert error in str(info.value)
        reply, _ = a.recv()
        assert reply["op"] == "error"
        assert error in reply["message"]
    # the autouse fixture checks that the received duplicates were closed


@pytest.mark.parametrize(
    "data",
    [b"\xff", b"[" * 100_000, b'{"v": 2, "op": "fds"}', b'{"v": 1}', b"{}"],
    ids=["not-utf8", "deep-nesting", "version", "no-op", "empty-object"],
)
def test_decode_rejects(data: bytes) -> None:
    with pytest.raises(ProtocolError):
        decode(data)


def test_oversized_message_is_truncation_not_a_crash(pair: tuple[Channel, Channel]) -> None:
    a, b = pair
    a.sock.send(b"x" * (MAX_MESSAGE + 10))
    with pytest.raises(TruncatedError):
        b.recv()
    with pytest.raises(ProtocolError):
        encode({"op": "x", "pad": "y" * MAX_MESSAGE})


def test_peer_closing_mid_transfer(pair: tuple[Channel, Channel]) -> None:
    a, b = pair
    held = listeners(300)
    try:
        # first chunk only (253), then the sender goes away
        header = {
            "op": "fds",
            "total": 300,
            "offset": 0,
            "fds": [[h.name, *h.identity.to_wire()] for h in held[:253]],
        }
        a.send(header, [h.fileno() for h in held[:253]])
        a.sock.shutdown(socket.SHUT_WR)
        with pytest.raises(ProtocolError, match="peer closed"):
            b.recv_sockets()
    finally:
        for h in held:
            h.sock.close()


def test_parse_chunk_is_pure() -> None:
    header = {"v": 1, "op": "fds", "total": 1, "offset": 0, "fds": [["web", *IDENT]]}
    total, entries, meta = parse_fds_chunk(header, 1, 0, 10)
    assert (total, entries[0][0], meta) == (1, "web", {})


NOBODY_PEER = """
import socket, sys, json
s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
s.connect(sys.argv[1])
print(s.recv(65536).decode(), flush=True)
"""


@pytest.mark.skipif(
    os.geteuid() != 0 or shutil.which("setpriv") is None,
    reason="needs root and setpriv to run a peer as nobody",
)
def test_peer_of_another_uid_is_denied_and_told(procs: Procs) -> None:
    python = shutil.which("python3", path="/usr/bin:/bin")
    if python is None:
        pytest.skip("no system python3 that uid nobody can run")
    directory = tempfile.mkdtemp(prefix="nodrop-test-")
    try:
        os.chmod(directory, 0o755)
        path = os.path.join(directory, "h.sock")
        server = listen(path, mode=0o666)
        with server:
            proc = procs.popen(
                [
                    "setpriv",
                    "--reuid=nobody",
                    "--regid=nogroup",
                    "--clear-groups",
                    python,
                    "-c",
                    NOBODY_PEER,
                    path,
                ],
                stdout=subprocess.PIPE,
            )
            with pytest.raises(PeerDeniedError, match="uid 65534"):
                accept(server)
            assert proc.stdout is not None
            reply = json.loads(proc.stdout.readline())
            assert reply["op"] == "error"
            assert "65534" in reply["message"]
            proc.wait(timeout=10)
            # and the server still accepts an allowed peer
            peer = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
            peer.connect(path)
            channel, creds = accept(server)
            assert creds.uid == 0
            channel.close()
            peer.close()
    finally:
        shutil.rmtree(directory)
