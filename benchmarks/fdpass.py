#!/usr/bin/env python3
"""Time per fd to hand over listening sockets, against the raw kernel floor.

usage: python benchmarks/fdpass.py [--sockets 10000] [--rounds 7]

Two processes joined by a SOCK_SEQPACKET socketpair. Each round moves all N
listening sockets to the child and waits for its acknowledgement; the child
then closes them (untimed). Two ways, in the same run:

* floor: bare sendmsg/recvmsg with 253 fds a message, no manifest, no checks;
* nodrop: Channel.give / Channel.take (JSON manifest with every socket's name
  and kernel identity, count checks, MSG_CTRUNC detection, the ok reply).

Prints the median time per fd of each and their ratio (target: within 3x).
"""

from __future__ import annotations

import argparse
import array
import os
import socket
import statistics
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "src"))

from nodrop.fdwire import Channel
from nodrop.kernel.fdpass import MAX_FDS_PER_MESSAGE, ensure_fd_room
from nodrop.listeners.held import HeldSocket


def raw_send(sock: socket.socket, fds: list[int]) -> None:
    for i in range(0, len(fds), MAX_FDS_PER_MESSAGE):
        chunk = fds[i : i + MAX_FDS_PER_MESSAGE]
        sock.sendmsg([b"x"], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", chunk))])


def raw_recv(sock: socket.socket, n: int) -> list[int]:
    got: list[int] = []
    space = socket.CMSG_SPACE(MAX_FDS_PER_MESSAGE * 4)
    while len(got) < n:
        _, anc, flags, _ = sock.recvmsg(16, space, socket.MSG_CMSG_CLOEXEC)
        if flags & socket.MSG_CTRUNC:
            raise SystemExit("floor receiver: fds truncated (RLIMIT_NOFILE too low)")
        for _, _, data in anc:
            fds = array.array("i")
            fds.frombytes(data)
            got.extend(fds)
    return got


def child(sock: socket.socket, n: int, rounds: int) -> None:
    channel = Channel(sock, timeout=None)
    for _ in range(rounds):
        fds = raw_recv(sock, n)
        sock.send(b"k")
        for fd in fds:
            os.close(fd)
        transfer = channel.take()
        transfer.close()
    os._exit(0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sockets", type=int, default=10_000)
    parser.add_argument("--rounds", type=int, default=7)
    args = parser.parse_args()
    n = args.sockets
    ensure_fd_room(n + 64)
    held = []
    for i in range(n):
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        s.listen(1)
        held.append(HeldSocket.adopt(s, f"web{i}"))
    fds = [h.fileno() for h in held]
    parent_sock, child_sock = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    pid = os.fork()
    if pid == 0:
        # fork copied the 10k listeners: close them, the child must start
        # with an fd table of its own size, like a real receiver.
        parent_sock.close()
        for h in held:
            h.sock.close()
        child(child_sock, n, args.rounds)
    child_sock.close()
    channel = Channel(parent_sock, timeout=None)
    floor, ours = [], []
    for _ in range(args.rounds):
        t0 = time.perf_counter()
        raw_send(parent_sock, fds)
        assert parent_sock.recv(1) == b"k"
        floor.append((time.perf_counter() - t0) / n)
        t0 = time.perf_counter()
        channel.give(held)
        ours.append((time.perf_counter() - t0) / n)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    f, o = statistics.median(floor), statistics.median(ours)
    print(f"sockets per round: {n}, rounds: {args.rounds}")
    print("| path | median time per fd | ratio to floor |")
    print("|---|---|---|")
    print(f"| raw sendmsg/recvmsg (floor) | {f * 1e6:.2f} µs | 1.00x |")
    print(f"| nodrop handoff (give/take) | {o * 1e6:.2f} µs | {o / f:.2f}x |")
    for h in held:
        h.sock.close()
    parent_sock.close()


if __name__ == "__main__":
    main()
