"""sd_notify, the receiving side: what a supervisor listens on.

A ``SOCK_DGRAM`` Unix socket with ``SO_PASSCRED``, so the kernel stamps every
datagram with the sender's pid (that is how a supervisor knows *which* worker
said ``READY=1``). Messages are bounded (4096 bytes, 253 fds); garbage is
rejected with :class:`~nodrop.errors.ProtocolError` and any fds it carried are
closed. The receiver itself never stops on bad input.
"""

from __future__ import annotations

import contextlib
import os
import socket
import tempfile
from dataclasses import dataclass, field

from nodrop.errors import ProtocolError, TruncatedError
from nodrop.kernel.fdpass import Credentials, Message, recv_with_fds
from nodrop.systemd.message import MAX_MESSAGE, parse_message


@dataclass
class Notification:
    """One parsed notification."""

    pid: int
    uid: int
    gid: int
    fields: dict[str, str]
    fds: list[int] = field(default_factory=list)

    def close_fds(self) -> None:
        for fd in self.fds:
            os.close(fd)
        self.fds = []


class NotifyReceiver:
    """A notify socket in a private directory (or at ``path``).

    Attributes:
        path: the socket's path, the value for ``NOTIFY_SOCKET``.
    """

    def __init__(self, path: str | None = None, *, max_fds: int = 253) -> None:
        self._tmpdir: str | None = None
        if path is None:
            self._tmpdir = tempfile.mkdtemp(prefix="nodrop-notify-")  # mode 0700
            path = os.path.join(self._tmpdir, "notify")
        self.path = path
        self.max_fds = max_fds
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        try:
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
            # Room for bursts: every worker of a generation reports at once.
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
            if not path.startswith("@"):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(path)
            self.sock.bind("\0" + path[1:] if path.startswith("@") else path)
            self.sock.setblocking(False)
        except BaseException:
            self.close()
            raise

    @classmethod
    def adopt(cls, sock: socket.socket, path: str, tmpdir: str | None) -> NotifyReceiver:
        """Take over a receiver's socket (a re-executed supervisor keeps its
        notify socket, so workers' NOTIFY_SOCKET stays valid)."""
        self = cls.__new__(cls)
        self._tmpdir = tmpdir
        self.path = path
        self.max_fds = 253
        self.sock = sock
        self.sock.setblocking(False)
        return self

    @property
    def private_dir(self) -> str | None:
        return self._tmpdir

    def fileno(self) -> int:
        return self.sock.fileno()

    def receive(self) -> Notification | None:
        """Read one datagram without blocking.

        Returns:
            The notification, or None when nothing is waiting.

        Raises:
            ProtocolError: the datagram was malformed (it is consumed and its
                fds closed; call again for the next one).
        """
        try:
            msg: Message = recv_with_fds(self.sock, MAX_MESSAGE + 1, self.max_fds)
        except BlockingIOError:
            return None
        except TruncatedError as exc:
            raise ProtocolError(f"notify datagram dropped: {exc}") from exc
        creds: Credentials | None = msg.credentials
        try:
            if creds is None:
                raise ProtocolError("notify datagram without sender credentials")
            fields = parse_message(msg.data)
        except ProtocolError:
            msg.close_fds()
            raise
        return Notification(creds.pid, creds.uid, creds.gid, fields, msg.fds)

    def close(self) -> None:
        self.sock.close()
        if self._tmpdir is not None:
            with contextlib.suppress(OSError):
                os.unlink(self.path)
            with contextlib.suppress(OSError):
                os.rmdir(self._tmpdir)
            self._tmpdir = None

    def __enter__(self) -> NotifyReceiver:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
