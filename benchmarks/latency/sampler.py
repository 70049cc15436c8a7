"""Watch a run from outside: every process's CPU time and the listening
socket's accept queue, sampled on a thread every :data:`PERIOD` seconds.

CPU comes from ``/proc/PID/stat`` (utime + stime) of this process and every
process below it (the servers and the load generator's workers are its
children); the accept queue from the kernel's ``sock_diag`` dump of
listening sockets (for a socket in ``LISTEN``, ``rqueue`` is the number of
connections waiting for ``accept()``), summed over the sockets on the port.
"""

from __future__ import annotations

import contextlib
import os
import socket
import struct
import threading
import time

from latency.phases import CpuSeries, parse_stat_cpu
from nodrop.supervisor import procfs, sockdiag

PERIOD = 0.01
TCP_LISTEN = 10
_TICKS = os.sysconf("SC_CLK_TCK")


def parse_listen_queue(data: bytes, port: int) -> tuple[int, bool]:
    """Sum of ``rqueue`` over listening sockets on ``port`` in one ``recv`` of
    a sock_diag dump, and whether it was the last part (pure)."""
    total = 0
    offset = 0
    header = struct.Struct("=IHHII")
    while offset + header.size <= len(data):
        length, kind, _flags, _seq, _pid = header.unpack_from(data, offset)
        if length < header.size or kind in (sockdiag.NLMSG_DONE, sockdiag.NLMSG_ERROR):
            return total, True
        body = offset + header.size
        if kind == sockdiag.SOCK_DIAG_BY_FAMILY and body + 72 <= len(data):
            (sport,) = struct.unpack_from(">H", data, body + 4)
            (rqueue,) = struct.unpack_from("=I", data, body + 56)
            if sport == port:
                total += rqueue
        offset += (length + 3) & ~3
    return total, False


def listen_queue(port: int) -> int | None:
    """Connections waiting in the accept queues of the listeners on ``port``."""
    total = 0
    try:
        with socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, sockdiag.NETLINK_SOCK_DIAG) as s:
            s.settimeout(1.0)
            for seq, family in enumerate((socket.AF_INET, socket.AF_INET6), start=1):
                s.send(sockdiag.dump_request(family, (TCP_LISTEN,), seq))
                done = False
                while not done:
                    part, done = parse_listen_queue(s.recv(65536), port)
                    total += part
    except OSError:
        return None
    return total


def process_cpu(pids: list[int]) -> dict[int, float]:
    out: dict[int, float] = {}
    for pid in pids:
        with contextlib.suppress(OSError, ValueError, IndexError), open(f"/proc/{pid}/stat") as f:
            out[pid] = parse_stat_cpu(f.read(), _TICKS)
    return out


class Sampler:
    """A thread sampling CPU and the accept queue of ``port`` until stopped."""

    def __init__(self, port: int, server: int, period: float = PERIOD) -> None:
        self.port = port
        self.server = server
        self.server_pids: set[int] = set()
        self.period = period
        self.cpu = CpuSeries()
        self.queue: list[tuple[float, int]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="latency-sampler", daemon=True)
        self.own_cpu = 0.0

    def __enter__(self) -> Sampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def _run(self) -> None:
        me = os.getpid()
        t0 = time.thread_time()
        while not self._stop.is_set():
            now = time.monotonic()
            self.server_pids.update(procfs.descendants(self.server))
            self.cpu.add(now, process_cpu(procfs.descendants(me)))
            depth = listen_queue(self.port)
            if depth is not None:
                self.queue.append((now, depth))
            self._stop.wait(self.period)
        self.own_cpu = time.thread_time() - t0

    def max_queue(self, start: float, end: float) -> int | None:
        values = [d for t, d in self.queue if start <= t < end]
        return max(values) if values else None
