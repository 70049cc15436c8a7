"""What the holder keeps: parked sockets by id, each with its expiry and
who deposited it. Pure bookkeeping: the only syscalls are ``fstat`` (to know
the same kernel socket deposited twice) and closing what leaves."""

from __future__ import annotations

import os
import socket
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from nodrop.errors import ProtocolError
from nodrop.fdwire import encode
from nodrop.holder import ops
from nodrop.kernel.fdpass import Credentials
from nodrop.listeners.identity import SocketIdentity, identify


@dataclass(eq=False)
class Parked:
    """One socket the holder keeps."""

    id: int
    name: str
    sock: socket.socket
    identity: SocketIdentity
    inode: tuple[int, int]
    expires_at: float
    depositor: Credentials
    via: str

    def fileno(self) -> int:
        return self.sock.fileno()

    def describe(self, now: float) -> dict[str, Any]:
        return {
            "id": self.id,
            "name": self.name,
            "identity": str(self.identity),
            "wire": self.identity.to_wire(),
            "inode": self.inode[1],
            "expires_in": round(max(0.0, self.expires_at - now), 3),
            "depositor": {"pid": self.depositor.pid, "uid": self.depositor.uid},
            "via": self.via,
        }


class ParkedStore:
    """The parked sockets, by id (ids are never reused)."""

    def __init__(self) -> None:
        self.items: dict[int, Parked] = {}
        self.ever_held = False
        self._next_id = 1

    def __len__(self) -> int:
        return len(self.items)

    def add(
        self, sock: socket.socket, name: str, expires: float, creds: Credentials, via: str
    ) -> int:
        """Park ``sock``; the same kernel socket deposited again refreshes the
        parked one (its name and expiry) instead of being parked twice.

        Raises:
            ProtocolError: the kernel cannot say what ``sock`` is (it is closed).
        """
        st = os.fstat(sock.fileno())
        inode = (st.st_dev, st.st_ino)
        for item in self.items.values():
            if item.inode == inode:
                sock.close()
                item.name, item.expires_at, item.depositor = name, expires, creds
                return item.id
        try:
            identity = identify(sock)
        except OSError as exc:
            sock.close()
            raise ProtocolError(f"cannot identify a deposited socket: {exc.strerror}") from exc
        item = Parked(self._next_id, name, sock, identity, inode, expires, creds, via)
        self._next_id += 1
        self.items[item.id] = item
        self.ever_held = True
        return item.id

    def select(self, selector: ops.Selector) -> list[Parked]:
        return [h for h in self.items.values() if selector.selects(h.id, h.name, h.identity)]

    def take(self, chosen: Iterable[Parked]) -> list[Parked]:
        """Remove ``chosen`` (still open: the caller owns them now)."""
        taken = list(chosen)
        for item in taken:
            del self.items[item.id]
        return taken

    def put_back(self, items: Iterable[Parked]) -> None:
        for item in items:
            self.items[item.id] = item

    def discard(self, chosen: Iterable[Parked]) -> list[Parked]:
        """Remove and close ``chosen``."""
        gone = self.take(chosen)
        for item in gone:
            item.sock.close()
        return gone

    def named(self, name: str) -> list[Parked]:
        return [h for h in self.items.values() if h.name == name]

    def expired(self, now: float) -> list[Parked]:
        return [h for h in self.items.values() if h.expires_at <= now]

    def expiries(self) -> list[float]:
        return [h.expires_at for h in self.items.values()]

    def list_reply(self, now: float) -> dict[str, Any]:
        """The answer to ``list``: as many entries as fit in one message."""
        entries = [h.describe(now) for h in sorted(self.items.values(), key=lambda h: h.id)]
        shown = len(entries)
        while True:
            header = {"op": "ok", "sockets": entries[:shown], "more": len(entries) - shown}
            try:
                encode(header)
                return header
            except ProtocolError:
                shown //= 2

    def close(self) -> int:
        """Close every parked socket; returns how many there were."""
        count = len(self.items)
        for item in self.items.values():
            item.sock.close()
        self.items.clear()
        return count


def summary(items: Iterable[Parked]) -> str:
    parts = [f"{h.name}={h.identity}" for h in items]
    more = f" (+{len(parts) - 8} more)" if len(parts) > 8 else ""
    return ", ".join(parts[:8]) + more
