"""The machine's TCP connections, from the kernel's ``sock_diag`` netlink
interface (``NETLINK_SOCK_DIAG``, what ``ss`` uses).

``/proc/net/tcp`` would do, but it lists every socket, ``TIME_WAIT`` ones
included: tens of thousands of lines on a busy host, a tenth of a second to
read. The dump asked for here names the states it wants, so the kernel skips
the rest. Only the parsing is pure (and tested table-driven); one function
talks to the kernel.
"""

from __future__ import annotations

import contextlib
import ipaddress
import socket
import struct
from collections.abc import Iterable
from dataclasses import dataclass

NETLINK_SOCK_DIAG = 4
SOCK_DIAG_BY_FAMILY = 20
NLM_F_REQUEST = 0x1
NLM_F_DUMP = 0x300
NLMSG_ERROR = 2
NLMSG_DONE = 3

# TCP states (include/net/tcp_states.h): a connection a server holds.
TCP_ESTABLISHED = 1
TCP_SYN_RECV = 3
TCP_FIN_WAIT1 = 4
TCP_FIN_WAIT2 = 5
TCP_CLOSE_WAIT = 8
TCP_LAST_ACK = 9
TCP_CLOSING = 11
CONNECTED_STATES = (
    TCP_ESTABLISHED,
    TCP_SYN_RECV,
    TCP_FIN_WAIT1,
    TCP_FIN_WAIT2,
    TCP_CLOSE_WAIT,
    TCP_LAST_ACK,
    TCP_CLOSING,
)

_NLMSGHDR = struct.Struct("=IHHII")
_NLATTR = struct.Struct("=HH")
_BC_OP = struct.Struct("=BBH")  # inet_diag_bc_op: code, yes, no
INET_DIAG_REQ_BYTECODE = 1
INET_DIAG_BC_JMP = 1
INET_DIAG_BC_S_EQ = 11
_REQUEST = struct.Struct("=BBBBI48s")  # inet_diag_req_v2
_MSG_HEAD = struct.Struct("=BBBB")  # inet_diag_msg: family, state, timer, retrans
_SOCKID = struct.Struct(">HH16s16s")  # sport, dport (network order), src, dst
_MSG_TAIL = struct.Struct("=IIIII")  # expires, rqueue, wqueue, uid, inode


@dataclass(frozen=True)
class Connection:
    inode: int
    local_ip: str
    local_port: int
    state: int


def port_filter(ports: Iterable[int]) -> bytes:
    """inet_diag bytecode that keeps the sockets whose local port is one of
    ``ports`` (pure).

    Per port: ``S_EQ port`` (8 bytes; not equal: on to the next port) and a
    ``JMP`` to the very end, which accepts; after the last port a ``JMP``
    4 bytes past the end, which rejects. Every op is on the chain of "yes"
    offsets, as the kernel's audit of the bytecode requires.
    """
    wanted = sorted(set(ports))
    total = 12 * len(wanted) + 4
    code = bytearray()
    for i, port in enumerate(wanted):
        code += _BC_OP.pack(INET_DIAG_BC_S_EQ, 8, 12) + _BC_OP.pack(0, 0, port)
        code += _BC_OP.pack(INET_DIAG_BC_JMP, 4, total - (12 * i + 8))
    code += _BC_OP.pack(INET_DIAG_BC_JMP, 4, 8)
    return bytes(code)


def dump_request(
    family: int,
    states: tuple[int, ...] = CONNECTED_STATES,
    seq: int = 1,
    ports: Iterable[int] | None = None,
) -> bytes:
    """A SOCK_DIAG_BY_FAMILY dump request for TCP sockets in ``states``
    (``ports``: only those with one of these local ports, filtered by the
    kernel) (pure)."""
    mask = 0
    for state in states:
        mask |= 1 << state
    body = _REQUEST.pack(family, socket.IPPROTO_TCP, 0, 0, mask, b"\0" * 48)
    if ports is not None:
        code = port_filter(ports)
        body += _NLATTR.pack(_NLATTR.size + len(code), INET_DIAG_REQ_BYTECODE) + code
    header = _NLMSGHDR.pack(
        _NLMSGHDR.size + len(body), SOCK_DIAG_BY_FAMILY, NLM_F_REQUEST | NLM_F_DUMP, seq, 0
    )
    return header + body


def is_error(data: bytes) -> bool:
    """Whether a reply starts with a netlink error other than "no error" (pure)."""
    if len(data) < _NLMSGHDR.size + 4:
        return False
    _length, kind, _flags, _seq, _pid = _NLMSGHDR.unpack_from(data, 0)
    (code,) = struct.unpack_from("=i", data, _NLMSGHDR.size)
    return bool(kind == NLMSG_ERROR and code != 0)


def parse_messages(data: bytes) -> tuple[list[Connection], bool]:
    """The connections in one ``recv`` of a dump, and whether it was the
    last part (NLMSG_DONE or an error) (pure)."""
    out: list[Connection] = []
    offset = 0
    while offset + _NLMSGHDR.size <= len(data):
        length, kind, _flags, _seq, _pid = _NLMSGHDR.unpack_from(data, offset)
        if length < _NLMSGHDR.size:
            return out, True
        if kind in (NLMSG_DONE, NLMSG_ERROR):
            return out, True
        body = offset + _NLMSGHDR.size
        if kind == SOCK_DIAG_BY_FAMILY and body + 72 <= len(data):
            family, state, _timer, _retrans = _MSG_HEAD.unpack_from(data, body)
            sport, _dport, src, _dst = _SOCKID.unpack_from(data, body + 4)
            *_rest, inode = _MSG_TAIL.unpack_from(data, body + 52)
            if family == socket.AF_INET:
                ip = str(ipaddress.IPv4Address(src[:4]))
            else:
                addr = ipaddress.IPv6Address(src)
                ip = str(addr.ipv4_mapped or addr)
            out.append(Connection(inode, ip, sport, state))
        offset += (length + 3) & ~3
    return out, False


def connections(ports: Iterable[int] | None = None) -> dict[int, Connection]:
    """Every TCP connection of this network namespace, by socket inode
    (empty if the kernel has no sock_diag for TCP).

    Args:
        ports: only connections with one of these local ports. The kernel
            filters, so the cost follows the service's connections, not the
            host's (tens of thousands on a busy host: 100 ms to parse).
            A kernel that refuses the filter gets the whole dump.
    """
    out: dict[int, Connection] = {}
    wanted = None if ports is None else set(ports)
    with (
        contextlib.suppress(OSError),
        socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_SOCK_DIAG) as sock,
    ):
        sock.settimeout(2.0)
        for seq, family in enumerate((socket.AF_INET, socket.AF_INET6), start=1):
            sock.send(dump_request(family, seq=seq, ports=wanted))
            data = sock.recv(65536)
            if wanted is not None and is_error(data):
                sock.send(dump_request(family, seq=seq + 10))  # no filter, then
                data = sock.recv(65536)
            found, done = parse_messages(data)
            out.update((c.inode, c) for c in found)
            while not done:
                found, done = parse_messages(sock.recv(65536))
                out.update((c.inode, c) for c in found)
    if wanted is not None:
        out = {inode: c for inode, c in out.items() if c.local_port in wanted}
    return out
