"""What a socket *is*, as the kernel reports it.

A listener is matched by what the kernel says about its fd (family, type,
protocol, bound address, listening or not, SO_REUSEPORT), never by the text a
user typed: ``tcp://localhost:8000`` and ``tcp://127.0.0.1:8000`` are the same
listener once bound, and a socket inherited from systemd or received over
SCM_RIGHTS carries no text at all.
"""

from __future__ import annotations

import ipaddress
import socket
from typing import Any, NamedTuple

# An address in canonical form:
#   ("inet", "127.0.0.1", 8000)          AF_INET
#   ("inet6", "::1", 8000, scope_id)     AF_INET6 (host compressed, scope 0 if none)
#   ("unix", "/run/app.sock")            AF_UNIX filesystem path
#   ("abstract", "name")                 AF_UNIX abstract namespace (no leading NUL)
#   ("unnamed",)                         AF_UNIX, not bound
Address = tuple[Any, ...]

_FAMILY_NAMES: dict[int, str] = {
    socket.AF_INET: "inet",
    socket.AF_INET6: "inet6",
    socket.AF_UNIX: "unix",
}
_TYPE_NAMES: dict[int, str] = {
    socket.SOCK_STREAM: "stream",
    socket.SOCK_DGRAM: "dgram",
    socket.SOCK_SEQPACKET: "seqpacket",
}


def canonical_address(family: int, raw: object) -> Address:
    """Canonical form of a sockaddr as returned by ``getsockname``.

    Pure: the same address written two ways (``::0001`` and ``::1``) gives the
    same tuple.
    """
    if family == socket.AF_INET:
        assert isinstance(raw, tuple)
        return ("inet", str(ipaddress.IPv4Address(raw[0])), int(raw[1]))
    if family == socket.AF_INET6:
        assert isinstance(raw, tuple)
        host = str(raw[0])
        scope = int(raw[3]) if len(raw) > 3 else 0
        host = host.split("%", 1)[0]
        return ("inet6", str(ipaddress.IPv6Address(host)), int(raw[1]), scope)
    if family == socket.AF_UNIX:
        if isinstance(raw, bytes):
            if raw.startswith(b"\0"):
                return ("abstract", raw[1:].decode("utf-8", "surrogateescape"))
            raw = raw.decode("utf-8", "surrogateescape")
        assert isinstance(raw, str)
        if not raw:
            return ("unnamed",)
        if raw.startswith("\0"):
            return ("abstract", raw[1:])
        return ("unix", raw)
    raise ValueError(f"unsupported address family {family}")


def format_address(address: Address) -> str:
    """Human form: ``127.0.0.1:8000``, ``[::1]:8000``, ``/run/x.sock``, ``@name``."""
    kind = address[0]
    if kind == "inet":
        return f"{address[1]}:{address[2]}"
    if kind == "inet6":
        scope = f"%{address[3]}" if address[3] else ""
        return f"[{address[1]}{scope}]:{address[2]}"
    if kind == "unix":
        return str(address[1])
    if kind == "abstract":
        return f"@{address[1]}"
    return "(unnamed)"


class SocketIdentity(NamedTuple):
    """A socket as the kernel describes it (immutable).

    ``key`` is what makes two fds "the same listener" for reconciliation:
    family, type, protocol and bound address. ``listening`` and ``reuseport``
    are state and options, reported but not part of the key.

    A NamedTuple rather than a frozen dataclass: a handoff of 10,000 sockets
    builds 10,000 of these, and tuple construction is several times cheaper.
    """

    family: int
    type: int
    protocol: int
    address: Address
    listening: bool
    reuseport: bool

    @property
    def key(self) -> tuple[int, int, int, Address]:
        return (self.family, self.type, self.protocol, self.address)

    def __str__(self) -> str:
        kinds: dict[tuple[int, int], str] = {
            (socket.AF_INET, socket.SOCK_STREAM): "tcp",
            (socket.AF_INET6, socket.SOCK_STREAM): "tcp",
            (socket.AF_INET, socket.SOCK_DGRAM): "udp",
            (socket.AF_INET6, socket.SOCK_DGRAM): "udp",
        }
        kind = kinds.get((self.family, self.type))
        if kind is None:
            kind = f"{_FAMILY_NAMES.get(self.family, self.family)}/" + str(
                _TYPE_NAMES.get(self.type, self.type)
            )
        flags = [
            f for f, on in (("listening", self.listening), ("reuseport", self.reuseport)) if on
        ]
        suffix = f" ({', '.join(flags)})" if flags else ""
        return f"{kind} {format_address(self.address)}{suffix}"

    def to_wire(self) -> list[Any]:
        """Compact, flat JSON-able form for the handoff manifest:
        ``[family, type, protocol, flags, kind, *address]`` where flags is
        1 (listening) | 2 (reuseport)."""
        return [
            self.family,
            self.type,
            self.protocol,
            int(self.listening) | (int(self.reuseport) << 1),
            *self.address,
        ]

    @classmethod
    def from_wire(cls, value: object) -> SocketIdentity:
        """Inverse of :meth:`to_wire`; raises ValueError on anything malformed.

        Straight-line checks with exact types: this runs once per received fd
        and must stay cheap (see benchmarks/fdpass.py).
        """
        if type(value) is not list or len(value) < 5:
            raise ValueError("identity must be a list [family, type, protocol, flags, kind, ...]")
        family, type_, proto, flags, kind = value[:5]
        if not (
            type(family) is int
            and type(type_) is int
            and type(proto) is int
            and type(flags) is int
            and 0 <= family < 65536
            and 0 <= type_ < 65536
            and 0 <= proto < 65536
            and 0 <= flags < 4
        ):
            raise ValueError("identity numbers malformed or out of range")
        address = value[4:]
        n = len(address)
        if kind == "inet":
            ok = n == 3 and type(address[1]) is str and type(address[2]) is int
        elif kind == "inet6":
            ok = (
                n == 4
                and type(address[1]) is str
                and type(address[2]) is int
                and type(address[3]) is int
            )
        elif kind in ("unix", "abstract"):
            ok = n == 2 and type(address[1]) is str
        else:
            ok = kind == "unnamed" and n == 1
        if not ok:
            raise ValueError(f"identity address {address!r} malformed")
        return cls(family, type_, proto, tuple(address), bool(flags & 1), bool(flags & 2))


def identify(sock: socket.socket | int) -> SocketIdentity:
    """Ask the kernel what ``sock`` is.

    Args:
        sock: a socket object or a raw fd (the fd is neither closed nor adopted).

    Raises:
        OSError: ``sock`` is not a socket (ENOTSOCK) or is closed (EBADF).
    """
    if isinstance(sock, int):
        # socket(fileno=) itself asks the kernel for family, type and protocol.
        tmp = socket.socket(fileno=sock)
        try:
            return identify(tmp)
        finally:
            tmp.detach()
    family = sock.getsockopt(socket.SOL_SOCKET, socket.SO_DOMAIN)
    type_ = sock.getsockopt(socket.SOL_SOCKET, socket.SO_TYPE)
    proto = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PROTOCOL)
    listening = bool(sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN))
    reuseport = bool(sock.getsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT))
    address = canonical_address(family, sock.getsockname())
    return SocketIdentity(family, type_, proto, address, listening, reuseport)
