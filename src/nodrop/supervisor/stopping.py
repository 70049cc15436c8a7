"""What ``nodrop stop`` promises: no connection the kernel accepted is reset.

A plain stop would drain the workers at once: they stop accepting, and
whatever waits in the listening socket's accept queue -- connections the
kernel already completed, whose clients have sent their requests -- is reset
when the last worker exits and the socket closes. So a stop goes in two
steps (:func:`quiesce`, then the drain):

1. A classic BPF socket filter on each TCP listening socket drops every
   *new* SYN (SYN set, ACK clear). Nothing new enters the queues from then
   on: clients see no answer and retry their SYN, and once the socket is
   closed they get a clean "connection refused" -- the answer of a service
   that is stopped -- never a reset of a connection they thought open.
   Handshakes already under way complete (their ACK passes).
2. The workers keep accepting until every accept queue is empty, and
   still is :data:`SETTLE` seconds later (bounded by the active generation's drain
   timeout); only then does every generation get its drain signal and
   finish what it accepted.

Unix-domain and UDP listeners get no filter (there is no SYN to drop); they
are drained as before.
"""

from __future__ import annotations

import asyncio
import ctypes
import socket
import struct
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

from nodrop.listeners.held import HeldSocket
from nodrop.listeners.queue import accept_queue

if TYPE_CHECKING:
    from nodrop.supervisor.generations import GenerationSet

SO_ATTACH_FILTER = 26
SETTLE = 0.05
"""Seconds after the queues were seen empty before they are checked once
more: handshakes in flight when the filter went on have completed by then
(one round trip) and queued, or been accepted."""
POLL = 0.005

# BPF opcodes (linux/filter.h)
_LD_B_ABS = 0x30  # BPF_LD | BPF_B | BPF_ABS
_ALU_AND_K = 0x54  # BPF_ALU | BPF_AND | BPF_K
_JEQ_K = 0x15  # BPF_JMP | BPF_JEQ | BPF_K
_RET_K = 0x06  # BPF_RET | BPF_K
TCP_FLAGS_OFFSET = 13
"""A TCP socket filter sees the segment from its TCP header on."""
SYN, ACK = 0x02, 0x10

DROP_NEW_SYNS: tuple[tuple[int, int, int, int], ...] = (
    (_LD_B_ABS, 0, 0, TCP_FLAGS_OFFSET),
    (_ALU_AND_K, 0, 0, SYN | ACK),
    (_JEQ_K, 0, 1, SYN),  # a SYN without ACK: drop; anything else: keep
    (_RET_K, 0, 0, 0),
    (_RET_K, 0, 0, 0xFFFFFFFF),
)


class _SockFilter(ctypes.Structure):
    _fields_ = [
        ("code", ctypes.c_uint16),
        ("jt", ctypes.c_uint8),
        ("jf", ctypes.c_uint8),
        ("k", ctypes.c_uint32),
    ]


def drop_new_connections(sock: socket.socket) -> bool:
    """Attach the SYN-dropping filter to a TCP listener; False for any other
    socket (or if the kernel refuses)."""
    if sock.type != socket.SOCK_STREAM or sock.family not in (socket.AF_INET, socket.AF_INET6):
        return False
    program = (_SockFilter * len(DROP_NEW_SYNS))(*(_SockFilter(*ins) for ins in DROP_NEW_SYNS))
    fprog = struct.pack("@HP", len(DROP_NEW_SYNS), ctypes.addressof(program))
    try:
        sock.setsockopt(socket.SOL_SOCKET, SO_ATTACH_FILTER, fprog)
    except OSError:
        return False
    return True


def queued(listeners: Sequence[HeldSocket]) -> int:
    total = 0
    for held in listeners:
        if held.sock.fileno() >= 0:
            queue = accept_queue(held.sock)
            total += 0 if queue is None else queue[0]
    return total


async def quiesce(
    listeners: Sequence[HeldSocket],
    timeout: float,
    clock: Callable[[], float],
    log: Callable[[str], None],
) -> None:
    """Stop new connections reaching ``listeners``; return once what was
    queued has been accepted (or after ``timeout`` seconds)."""
    filtered = [h for h in listeners if drop_new_connections(h.sock)]
    if not filtered:
        return
    started = clock()
    deadline = started + timeout
    while clock() < deadline:
        if queued(filtered):
            await asyncio.sleep(POLL)  # the workers are accepting it
            continue
        # Empty: wait one settle time for handshakes in flight, and check again.
        await asyncio.sleep(SETTLE)
        if not queued(filtered):
            break
    left = queued(filtered)
    log(
        f"stopping: new connections refused on {len(filtered)} listener(s); "
        f"the queue served in {clock() - started:.3f}s"
        + (f", {left} connection(s) still queued at the timeout" if left else "")
    )


async def stop_gracefully(
    gens: GenerationSet, clock: Callable[[], float], log: Callable[[str], None]
) -> None:
    """The supervisor stops: :func:`quiesce` the listeners of every live
    generation (while the active one keeps accepting), then drain them all."""
    gen = gens.active
    if gen is not None and not gen.finished:
        live = {id(h): h for g in gens.all if g.live_workers() for h in g.listeners}
        await quiesce(list(live.values()), gen.config.drain_timeout, clock, log)
    gens.drain_all()
