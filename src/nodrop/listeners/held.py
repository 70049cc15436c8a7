"""A socket a process holds: the kernel's word for what it is, and its name."""

from __future__ import annotations

import socket
from dataclasses import dataclass

from nodrop.listeners.identity import SocketIdentity, identify
from nodrop.listeners.spec import ListenerSpec


@dataclass(eq=False)
class HeldSocket:
    """A socket we hold, with what the kernel says it is and the name it goes by."""

    sock: socket.socket
    identity: SocketIdentity
    name: str = "unknown"
    spec: ListenerSpec | None = None
    """The spec it was bound from, if we bound it (matches port-0 specs)."""

    @classmethod
    def adopt(
        cls, sock: socket.socket, name: str = "unknown", spec: ListenerSpec | None = None
    ) -> HeldSocket:
        return cls(sock, identify(sock), name, spec)

    def fileno(self) -> int:
        return self.sock.fileno()
