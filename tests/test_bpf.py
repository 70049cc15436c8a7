"""nodrop.kernel.bpf: the assembler (pure, table-driven) and the steering program and
sockarray against the real kernel, in private network namespaces."""

from __future__ import annotations

import errno
import fcntl
import os
import socket
import struct
from pathlib import Path
from typing import Any

import pytest

from nodrop.errors import BpfError, NodropError
from nodrop.kernel.bpf import (
    BPF_SK_REUSEPORT_SELECT_OR_MIGRATE,
    R0,
    R1,
    R2,
    R3,
    R4,
    R10,
    Insn,
    ReuseportSteering,
    add64_imm,
    call,
    encode,
    exit_,
    ld_map_fd,
    load_program,
    mov64_imm,
    mov64_reg,
    probe_ebpf,
    socket_cookie,
    st_mem,
    steering_program,
    stx_mem,
)
from nodrop.testing import netns
from nodrop.testing.waiting import wait_for

HERE = str(Path(__file__).resolve())

# --- the assembler: bytes checked against the canonical encodings -------------


@pytest.mark.parametrize(
    ("insns", "expected"),
    [
        (mov64_imm(R0, 1), "b7 00 0000 01000000"),
        (mov64_imm(R4, 0), "b7 04 0000 00000000"),
        (mov64_imm(R0, -1), "b7 00 0000 ffffffff"),
        (mov64_reg(R3, R10), "bf a3 0000 00000000"),
        (add64_imm(R3, -4), "07 03 0000 fcffffff"),
        (st_mem(R10, -4, 0), "62 0a fcff 00000000"),
        (stx_mem(R10, -8, R1), "63 1a f8ff 00000000"),
        (ld_map_fd(R2, 5), "18 12 0000 05000000 00 00 0000 00000000"),
        (call(82), "85 00 0000 52000000"),
        (exit_(), "95 00 0000 00000000"),
    ],
)
def test_assembler_encodes(insns: list[Insn], expected: str) -> None:
    assert encode(insns) == bytes.fromhex(expected.replace(" ", ""))


def test_steering_program_shape() -> None:
    prog = steering_program(map_fd=7)
    code = encode(prog)
    assert len(code) == 9 * 8  # 8 instructions, ld_imm64 takes two slots
    assert prog[1] == Insn(0x18, dst=R2, src=1, imm=7)  # BPF_PSEUDO_MAP_FD
    assert call(82)[0] in prog
    assert prog[-2:] == [*mov64_imm(R0, 1), *exit_()]  # return SK_PASS


# --- against the kernel -------------------------------------------------------


def _need_bpf() -> None:
    ok, why = probe_ebpf()
    if not ok:
        pytest.skip(f"eBPF steering unavailable: {why}")


def _need_netns() -> None:
    ok, why = netns.can_unshare_net()
    if not ok:
        pytest.skip(why)
    _need_bpf()


def _in_netns(func: str, *args: str) -> Any:
    _need_netns()
    return netns.run_in_netns(f"{HERE}:{func}", *args, timeout=30)


def test_program_loads_with_cloexec_fds_and_closes() -> None:
    _need_bpf()
    with ReuseportSteering() as steering:
        fds = steering.fds
        for fd in fds:
            assert fcntl.fcntl(fd, fcntl.F_GETFD) & fcntl.FD_CLOEXEC
            assert os.readlink(f"/proc/self/fd/{fd}").startswith("anon_inode:bpf-")
    assert steering.fds == (-1, -1)
    for fd in fds:
        with pytest.raises(OSError, match="Bad file descriptor"):
            os.fstat(fd)  # really closed (unless reused, which nothing here does)
    with pytest.raises(BpfError, match="closed"):
        steering.active_cookie()


def test_load_failure_carries_errno_and_verifier_log() -> None:
    _need_bpf()
    r, w = os.pipe()  # an fd that is not a map
    try:
        with pytest.raises(
            BpfError, match=r"verifier log:\n.*not pointing to valid bpf_map"
        ) as info:
            load_program(r, BPF_SK_REUSEPORT_SELECT_OR_MIGRATE)
    finally:
        os.close(r)
        os.close(w)
    assert info.value.errno == errno.EINVAL


def test_select_only_program_loads() -> None:
    _need_bpf()
    ok, why = probe_ebpf(migrate=False)
    assert ok, why


def test_bpf_error_is_a_nodrop_oserror() -> None:
    exc = BpfError(errno.EPERM, "x")
    assert isinstance(exc, NodropError)
    assert isinstance(exc, OSError)
    assert exc.errno == errno.EPERM


def _listener(port: int = 0, *, listen: bool = True, reuseport: bool = True) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    if reuseport:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind(("127.0.0.1", port))
    if listen:
        sock.listen(128)
    return sock


def _queue_len(listener: socket.socket) -> int:
    info = listener.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 104)
    return int(struct.unpack_from("=I", info, 24)[0])  # tcpi_unacked: accept queue


def _wait_queues(listeners: list[socket.socket], total: int) -> list[int]:
    """The accept queues' lengths once ``total`` connections are queued."""
    wait_for(
        lambda: sum(_queue_len(s) for s in listeners) >= total,
        what=f"{total} connections in the accept queues",
    )
    return [_queue_len(s) for s in listeners]


def _connect_many(port: int, n: int) -> list[socket.socket]:
    clients = []
    for _ in range(n):
        c = socket.create_connection(("127.0.0.1", port), timeout=10)
        clients.append(c)
    return clients


def child_rejects() -> dict[str, object]:
    """Which sockets the sockarray refuses, and how it says so."""
    out: dict[str, object] = {}
    with ReuseportSteering() as steering:
        cases = {
            "bound_not_listening": _listener(listen=False),
            "listening_without_reuseport": _listener(reuseport=False),
            "udp": socket.socket(socket.AF_INET, socket.SOCK_DGRAM),
        }
        for name, sock in cases.items():
            with sock:
                try:
                    steering.steer_to(sock)
                except BpfError as exc:
                    out[name] = [exc.errno, str(exc)]
                else:
                    out[name] = "accepted"
        with _listener() as good:
            steering.steer_to(good)
            try:
                steering.steer_to(good)
            except BpfError as exc:
                out["twice"] = [exc.errno, str(exc)]
    return out


def test_map_rejects_sockets_that_cannot_listen_for_the_group() -> None:
    out = _in_netns("child_rejects")
    for name in ("bound_not_listening", "listening_without_reuseport", "udp"):
        assert out[name] != "accepted", (name, out)
        err, msg = out[name]
        assert err in (errno.EINVAL, errno.EOPNOTSUPP), (name, out)
        assert "listening TCP" in msg
        assert "SO_REUSEPORT" in msg
    err, msg = out["twice"]
    assert err == errno.EBUSY
    assert "already the active listener" in msg


def child_steering(n: str) -> dict[str, list[int]]:
    """Two listeners of one group; steer to each in turn; count where new
    connections land."""
    count = int(n)
    with ReuseportSteering() as steering, _listener() as a:
        port = a.getsockname()[1]
        with _listener(port) as b:
            steering.attach(a)
            out: dict[str, list[int]] = {}
            for name, target in (("to_b", b), ("to_a", a)):
                steering.steer_to(target)
                clients = _connect_many(port, count)
                out[name] = _wait_queues([a, b], count)
                for c in clients:
                    c.close()
                for listener in (a, b):  # drain both accept queues
                    listener.setblocking(False)
                    for _ in range(count):
                        try:
                            listener.accept()[0].close()
                        except BlockingIOError:
                            break
            # Without steering the kernel hashes across both (sanity check
            # that the test could see a difference at all).
            steering.clear()
            clients = _connect_many(port, count)
            out["cleared"] = _wait_queues([a, b], count)
            for c in clients:
                c.close()
    return out


def test_steering_sends_all_new_connections_to_the_chosen_listener() -> None:
    n = 64
    out = _in_netns("child_steering", str(n))
    assert out["to_b"] == [0, n]
    assert out["to_a"] == [n, 0]
    assert sum(out["cleared"]) == n
    assert min(out["cleared"]) > 0, "hashing should spread 64 connections over both"


def child_cookie() -> dict[str, object]:
    with ReuseportSteering() as steering:
        before = steering.active_cookie()
        a = _listener()
        b = _listener(a.getsockname()[1])
        steering.attach(a)
        steering.steer_to(a)
        got_a = steering.active_cookie()
        steering.steer_to(b)  # replaces slot 0
        got_b = steering.active_cookie()
        cookies = [socket_cookie(a), socket_cookie(b)]
        b.close()
        after_close = steering.active_cookie()
        # The program belongs to the group: it outlives `a`, through which it
        # was attached. Steer to c, close a, and c still gets everything.
        c = _listener(a.getsockname()[1])
        d = _listener(a.getsockname()[1])
        steering.steer_to(c)
        a.close()
        clients = _connect_many(c.getsockname()[1], 32)
        lens = _wait_queues([c, d], 32)
        for s in [*clients, c, d]:
            s.close()
    return {
        "before": before,
        "a": got_a,
        "b": got_b,
        "cookies": cookies,
        "after_close": after_close,
        "after_attach_socket_closed": lens,
    }


def test_cookie_readback_and_slot_empties_on_close() -> None:
    out = _in_netns("child_cookie")
    assert out["before"] is None
    assert [out["a"], out["b"]] == out["cookies"]
    assert out["cookies"][0] != out["cookies"][1]
    assert out["after_close"] is None
    assert out["after_attach_socket_closed"] == [32, 0]
