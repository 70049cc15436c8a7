"""Passing file descriptors over Unix sockets (SCM_RIGHTS), and peer checks.

One of the few modules that touch the kernel. Every receive:

* asks for ``MSG_CMSG_CLOEXEC``, so a received fd never leaks into a child;
* detects ``MSG_TRUNC`` / ``MSG_CTRUNC`` and raises instead of losing data or
  fds silently (the kernel truncates SCM_RIGHTS when the receiver is near
  RLIMIT_NOFILE or its buffer is too small); whatever fds did arrive with a
  truncated message are closed.
"""

from __future__ import annotations

import array
import os
import resource
import socket
import struct
from collections.abc import Collection, Sequence
from dataclasses import dataclass, field

from nodrop.errors import PeerDeniedError, TruncatedError

MAX_FDS_PER_MESSAGE = 253
"""SCM_MAX_FD: the kernel refuses more fds in one message (EINVAL)."""

_UCRED = struct.Struct("3i")


@dataclass(frozen=True)
class Credentials:
    pid: int
    uid: int
    gid: int


@dataclass
class Message:
    """A received message: its bytes, the fds that came with it, the sender."""

    data: bytes
    fds: list[int] = field(default_factory=list)
    credentials: Credentials | None = None

    def close_fds(self) -> None:
        for fd in self.fds:
            os.close(fd)
        self.fds = []


def send_with_fds(sock: socket.socket, data: bytes, fds: Sequence[int] = ()) -> None:
    """Send one message with up to 253 fds (``MSG_NOSIGNAL``: EPIPE, never SIGPIPE)."""
    if len(fds) > MAX_FDS_PER_MESSAGE:
        raise ValueError(f"{len(fds)} fds in one message; the kernel allows {MAX_FDS_PER_MESSAGE}")
    ancillary = []
    if fds:
        ancillary.append((socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds).tobytes()))
    sent = sock.sendmsg([data], ancillary, socket.MSG_NOSIGNAL)
    if sent != len(data):  # SOCK_SEQPACKET/DGRAM are all or nothing; be sure
        raise TruncatedError(f"sent {sent} of {len(data)} bytes")


def recv_with_fds(
    sock: socket.socket, bufsize: int, max_fds: int = MAX_FDS_PER_MESSAGE, *, flags: int = 0
) -> Message:
    """Receive one message with its fds and, if ``SO_PASSCRED`` is on, its sender.

    Returns:
        The message; ``data`` is empty at end of stream.

    Raises:
        TruncatedError: the message or its fds did not fit (fds that arrived
            are closed: nothing half-received is left open).
        BlockingIOError: non-blocking socket, nothing to read.
    """
    ancbuf = socket.CMSG_SPACE(max_fds * 4) + socket.CMSG_SPACE(_UCRED.size)
    data, ancdata, msg_flags, _addr = sock.recvmsg(bufsize, ancbuf, flags | socket.MSG_CMSG_CLOEXEC)
    msg = Message(data)
    for level, kind, payload in ancdata:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            fds = array.array("i")
            fds.frombytes(payload[: len(payload) - len(payload) % fds.itemsize])
            msg.fds.extend(fds)
        elif (
            level == socket.SOL_SOCKET
            and kind == socket.SCM_CREDENTIALS
            and len(payload) >= _UCRED.size
        ):
            msg.credentials = Credentials(*_UCRED.unpack_from(payload))
    if msg_flags & (socket.MSG_TRUNC | socket.MSG_CTRUNC):
        got = len(msg.fds)
        msg.close_fds()
        if msg_flags & socket.MSG_CTRUNC:
            raise TruncatedError(
                f"file descriptors were truncated by the kernel ({got} arrived): "
                f"{fd_headroom_hint()}"
            )
        raise TruncatedError(f"message longer than {bufsize} bytes was truncated")
    return msg


def fd_headroom_hint() -> str:
    """Why fds may be dropped: open fds against RLIMIT_NOFILE."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    try:
        used = len(os.listdir("/proc/self/fd"))
    except OSError:
        used = -1
    return f"this process has {used} fds open, RLIMIT_NOFILE is {soft} (hard {hard})"


def ensure_fd_room(needed: int) -> None:
    """Make room for ``needed`` more fds, raising the soft limit up to the hard one.

    Raises:
        TruncatedError: even the hard limit leaves no room; receiving would
            lose fds.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    try:
        used = len(os.listdir("/proc/self/fd"))
    except OSError as exc:  # EMFILE: not even one fd left to count them with
        raise TruncatedError(
            f"cannot receive {needed} fds: {exc.strerror}; RLIMIT_NOFILE is {soft} (hard {hard})"
        ) from exc
    want = used + needed + 16
    if want <= soft:
        return
    if hard != resource.RLIM_INFINITY and want > hard:
        raise TruncatedError(
            f"cannot receive {needed} fds: {fd_headroom_hint()}; raise the hard limit"
        )
    resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))


def peer_credentials(sock: socket.socket) -> Credentials:
    """The pid, uid and gid of the process at the other end (``SO_PEERCRED``)."""
    raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size)
    return Credentials(*_UCRED.unpack(raw))


def check_peer(sock: socket.socket, allowed_uids: Collection[int] | None = None) -> Credentials:
    """Allow the peer only if its uid is ours or in ``allowed_uids``.

    Raises:
        PeerDeniedError: naming the peer's pid and uid.
    """
    creds = peer_credentials(sock)
    allowed = {os.geteuid()} if allowed_uids is None else set(allowed_uids) | {os.geteuid()}
    if creds.uid not in allowed:
        raise PeerDeniedError(
            f"peer pid {creds.pid} runs as uid {creds.uid}; only uids "
            f"{sorted(allowed)} may use this socket"
        )
    return creds
