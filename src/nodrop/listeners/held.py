"""A socket a process holds: the kernel's word for what it is, and its name."""

from __future__ import annotations

import contextlib
import os
import socket
import stat
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

    bound_path: tuple[str, int, int] | None = None
    """A Unix socket file we created: (path, st_dev, st_ino), removed at :meth:`close`."""

    @classmethod
    def bound(cls, sock: socket.socket, name: str, spec: ListenerSpec) -> HeldSocket:
        """A socket we just bound from ``spec``: a Unix path it created is ours to remove."""
        held = cls.adopt(sock, name, spec)
        if spec.path is not None:
            path = os.path.abspath(spec.path)
            with contextlib.suppress(OSError):
                st = os.lstat(path)
                if stat.S_ISSOCK(st.st_mode):
                    held.bound_path = (path, st.st_dev, st.st_ino)
        return held

    def fileno(self) -> int:
        return self.sock.fileno()

    def close(self) -> None:
        """Close the socket and remove the Unix socket file we created, if the
        path is still that file (a successor may have bound a new one there)."""
        self.sock.close()
        if self.bound_path is None:
            return
        path, dev, ino = self.bound_path
        self.bound_path = None
        with contextlib.suppress(OSError):
            st = os.lstat(path)
            if (st.st_dev, st.st_ino) == (dev, ino):
                os.unlink(path)
