"""How many connections wait in a listener's accept queue (TCP_INFO)."""

from __future__ import annotations

import socket
import struct

# struct tcp_info: 8 bytes of u8 fields, then u32 rto, ato, snd_mss, rcv_mss,
# unacked, sacked. For a listener the kernel reports the accept queue length
# in tcpi_unacked and the backlog in tcpi_sacked.
_TCP_INFO = struct.Struct("8x4I2I")


def accept_queue(sock: socket.socket) -> tuple[int, int] | None:
    """(queued, backlog) for a listening TCP socket, None for anything else."""
    if sock.type != socket.SOCK_STREAM or sock.family not in (socket.AF_INET, socket.AF_INET6):
        return None
    try:
        if not sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN):
            return None
        raw = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 104)
    except OSError:
        return None
    if len(raw) < _TCP_INFO.size:
        return None
    *_, unacked, sacked = _TCP_INFO.unpack_from(raw)
    return unacked, sacked
