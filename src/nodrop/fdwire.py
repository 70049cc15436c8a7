"""The fd handoff protocol: moving sockets between unrelated processes.

Transport: an ``AF_UNIX`` ``SOCK_SEQPACKET`` connection (message boundaries
kept, peer known by ``SO_PEERCRED``). Every message is one JSON object, UTF-8,
at most :data:`MAX_MESSAGE` bytes, with ``"v": 1`` and an ``"op"``; fds ride
along as ``SCM_RIGHTS``, at most 253 per message. The full description is
``docs/protocol.md``; in short, a transfer of N sockets is::

    sender -> {"v":1,"op":"fds","total":N,"offset":0,"fds":[[name, identity], ...],
               "meta":{...}}                       + fds[0:k]
    sender -> {"v":1,"op":"fds","total":N,"offset":k,"fds":[...]}  + fds[k:...]
    ...
    receiver -> {"v":1,"op":"ok","count":N}   or   {"v":1,"op":"error","message":"..."}

The sender keeps its own copies until the ``ok``: SCM_RIGHTS duplicates, so
a failure anywhere loses nothing. A receiver rejects a manifest whose entry
count differs from the fds that arrived, and treats kernel truncation
(``MSG_CTRUNC``) as an error, never as fewer sockets.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
from collections.abc import Collection, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from nodrop.errors import ProtocolError
from nodrop.kernel.fdpass import (
    MAX_FDS_PER_MESSAGE,
    Credentials,
    check_peer,
    ensure_fd_room,
    recv_with_fds,
    send_with_fds,
)
from nodrop.listeners.identity import SocketIdentity

PROTOCOL_VERSION = 1
MAX_MESSAGE = 64 * 1024
"""Largest message either side sends or accepts."""
MAX_TRANSFER = 65536
"""Most sockets accepted in one transfer unless the receiver says otherwise."""
MAX_NAME = 255
DEFAULT_TIMEOUT = 10.0


class Passable(Protocol):
    """Anything that can be handed over: a socket with its name and identity."""

    @property
    def name(self) -> str: ...

    @property
    def identity(self) -> SocketIdentity: ...

    def fileno(self) -> int: ...


class ReceivedSocket:
    """A socket that arrived over the handoff protocol. We own ``fd``.

    A plain class with ``__slots__``: one is made per received fd.
    """

    __slots__ = ("fd", "identity", "name")

    def __init__(self, fd: int, name: str, identity: SocketIdentity) -> None:
        self.fd = fd
        self.name = name
        self.identity = identity

    def __repr__(self) -> str:
        return f"ReceivedSocket(fd={self.fd}, name={self.name!r}, identity={self.identity})"

    def fileno(self) -> int:
        return self.fd

    def socket(self) -> socket.socket:
        """Adopt the fd as a socket object (which then owns it)."""
        if self.fd < 0:
            raise ValueError("socket already adopted or closed")
        sock = socket.socket(fileno=self.fd)  # ENOTSOCK: the fd stays ours to close
        self.fd = -1
        return sock

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


@dataclass
class Transfer:
    """The sockets of one transfer, in order, and the sender's metadata."""

    sockets: list[ReceivedSocket] = field(default_factory=list)
    meta: dict[str, Any] = field(default_factory=dict)

    def close(self) -> None:
        for item in self.sockets:
            item.close()


def encode(header: dict[str, Any]) -> bytes:
    """Encode a message (pure). Raises ProtocolError if it is too large."""
    data = json.dumps({"v": PROTOCOL_VERSION, **header}, separators=(",", ":")).encode()
    if len(data) > MAX_MESSAGE:
        raise ProtocolError(f"message of {len(data)} bytes exceeds {MAX_MESSAGE}")
    return data


def decode(data: bytes) -> dict[str, Any]:
    """Decode and check the envelope of a message (pure).

    Raises:
        ProtocolError: not JSON, not an object, wrong version, no op.
    """
    if len(data) > MAX_MESSAGE:
        raise ProtocolError(f"message of {len(data)} bytes exceeds {MAX_MESSAGE}")
    try:
        header = json.loads(data)
    except (ValueError, RecursionError) as exc:
        raise ProtocolError(f"message is not valid JSON: {str(exc)[:80]}") from exc
    if not isinstance(header, dict):
        raise ProtocolError("message is not a JSON object")
    if header.get("v") != PROTOCOL_VERSION:
        raise ProtocolError(f"unsupported protocol version {header.get('v')!r}")
    if not isinstance(header.get("op"), str):
        raise ProtocolError("message has no op")
    return header


def parse_fds_chunk(
    header: dict[str, Any], nfds: int, received: int, max_total: int
) -> tuple[int, list[tuple[str, SocketIdentity]], dict[str, Any] | None]:
    """Check one ``fds`` message against the fds that came with it (pure).

    Args:
        header: decoded message.
        nfds: how many fds arrived with it.
        received: how many sockets of this transfer arrived before it.
        max_total: the most sockets the receiver accepts.

    Returns:
        (total, entries, meta) — meta only on the first chunk.

    Raises:
        ProtocolError: any inconsistency.
    """
    if header.get("op") != "fds":
        raise ProtocolError(f"expected an fds message, got {header.get('op')!r}")
    total, offset, entries = header.get("total"), header.get("offset"), header.get("fds")
    if not isinstance(total, int) or isinstance(total, bool) or not 0 <= total <= max_total:
        raise ProtocolError(f"transfer total {total!r} is not between 0 and {max_total}")
    if offset != received:
        raise ProtocolError(f"chunk offset {offset!r}, expected {received}")
    if not isinstance(entries, list):
        raise ProtocolError("fds manifest is not a list")
    if len(entries) != nfds:
        raise ProtocolError(f"manifest lists {len(entries)} sockets but {nfds} fds arrived")
    if nfds > MAX_FDS_PER_MESSAGE or received + nfds > total:
        raise ProtocolError("more fds than the transfer announced")
    if nfds == 0 and received < total:
        raise ProtocolError("empty chunk in the middle of a transfer")
    parsed: list[tuple[str, SocketIdentity]] = []
    from_wire = SocketIdentity.from_wire
    for entry in entries:
        if type(entry) is not list or not entry or type(entry[0]) is not str:
            raise ProtocolError("manifest entry is not [name, *identity]")
        name = entry[0]
        if not 0 < len(name) <= MAX_NAME:
            raise ProtocolError("socket name empty or too long")
        try:
            parsed.append((name, from_wire(entry[1:])))
        except ValueError as exc:
            raise ProtocolError(f"bad identity for {name!r}: {exc}") from exc
    meta = header.get("meta")
    if received == 0:
        if meta is None:
            meta = {}
        if not isinstance(meta, dict):
            raise ProtocolError("meta is not an object")
    elif meta is not None:
        raise ProtocolError("meta only comes with the first chunk")
    return total, parsed, meta


def fds_messages(
    items: Sequence[Passable], meta: dict[str, Any] | None = None
) -> Iterator[tuple[bytes, list[int]]]:
    """The messages of one transfer, as (encoded header, fds) pairs, without
    sending them (pure but for ``fileno()``): for blocking senders
    (:meth:`Channel.send_sockets`) and non-blocking ones (the holder)."""
    total = len(items)
    offset = 0
    while True:
        chunk = items[offset : offset + MAX_FDS_PER_MESSAGE]
        header: dict[str, Any] = {
            "op": "fds",
            "total": total,
            "offset": offset,
            "fds": [[item.name, *item.identity.to_wire()] for item in chunk],
        }
        if offset == 0 and meta:
            header["meta"] = meta
        yield encode(header), [item.fileno() for item in chunk]
        offset += len(chunk)
        if offset >= total:
            return


class Assembly:
    """A transfer being received, chunk by chunk (for blocking and
    non-blocking receivers alike). On error the caller closes
    :attr:`transfer`; the fds of a rejected chunk are closed here."""

    def __init__(self, max_total: int = MAX_TRANSFER) -> None:
        self.transfer = Transfer()
        self.total: int | None = None
        self.max_total = max_total

    @property
    def done(self) -> bool:
        return self.total is not None and len(self.transfer.sockets) >= self.total

    def add(self, header: dict[str, Any], fds: list[int]) -> None:
        """Take one ``fds`` message; raises ProtocolError (its fds closed)."""
        sockets = self.transfer.sockets
        try:
            total, entries, meta = parse_fds_chunk(header, len(fds), len(sockets), self.max_total)
        except ProtocolError:
            for fd in fds:
                os.close(fd)
            raise
        for fd, (name, identity) in zip(fds, entries, strict=True):
            sockets.append(ReceivedSocket(fd, name, identity))
        if self.total is None:
            self.total = total
            self.transfer.meta = meta or {}
            ensure_fd_room(total - len(sockets))


class Channel:
    """One end of a handoff connection.

    Blocking, with a timeout on every operation (``DEFAULT_TIMEOUT``).
    """

    def __init__(self, sock: socket.socket, *, timeout: float | None = DEFAULT_TIMEOUT) -> None:
        self.sock = sock
        self.sock.settimeout(timeout)

    def fileno(self) -> int:
        return self.sock.fileno()

    # -- messages ---------------------------------------------------------
    def send(self, header: dict[str, Any], fds: Sequence[int] = ()) -> None:
        send_with_fds(self.sock, encode(header), fds)

    def recv(self, *, max_fds: int = 0) -> tuple[dict[str, Any], list[int]]:
        """Receive one message and its fds (you own them).

        Raises:
            ProtocolError: peer closed, malformed message (its fds closed).
            TruncatedError: message or fds truncated by the kernel.
            TimeoutError: nothing within the timeout.
        """
        try:
            msg = recv_with_fds(self.sock, MAX_MESSAGE + 1, max(max_fds, 1))
        except ConnectionResetError as exc:
            raise ProtocolError("peer reset the connection") from exc
        if not msg.data and not msg.fds:
            raise ProtocolError("peer closed the connection")
        if len(msg.fds) > max_fds:
            msg.close_fds()
            raise ProtocolError("unexpected fds with this message")
        try:
            return decode(msg.data), msg.fds
        except ProtocolError:
            msg.close_fds()
            raise

    def request(self, header: dict[str, Any]) -> dict[str, Any]:
        """Send a request and return the reply; an ``error`` reply raises."""
        self.send(header)
        return self.expect_ok()

    def reply_ok(self, **extra: Any) -> None:
        self.send({"op": "ok", **extra})

    def reply_error(self, message: str) -> None:
        with contextlib.suppress(OSError):
            self.send({"op": "error", "message": message[:4000]})

    def expect_ok(self) -> dict[str, Any]:
        header, _ = self.recv()
        if header["op"] == "error":
            raise ProtocolError(f"peer refused: {header.get('message', '(no message)')}")
        if header["op"] != "ok":
            raise ProtocolError(f"expected ok, got {header['op']!r}")
        return header

    # -- socket transfers -------------------------------------------------
    def send_sockets(self, items: Sequence[Passable], meta: dict[str, Any] | None = None) -> None:
        """Send sockets in chunks of at most 253 (no reply awaited: see
        :meth:`give`)."""
        for data, fds in fds_messages(items, meta):
            send_with_fds(self.sock, data, fds)

    def recv_sockets(self, *, max_total: int = MAX_TRANSFER) -> Transfer:
        """Receive one transfer; you own the sockets.

        On any error every fd of the transfer received so far is closed, an
        ``error`` reply is sent when possible, and the error is raised.
        """
        assembly = Assembly(max_total)
        transfer = assembly.transfer
        try:
            while not assembly.done:
                header, fds = self.recv(max_fds=MAX_FDS_PER_MESSAGE)
                assembly.add(header, fds)
        except Exception as exc:
            transfer.close()
            self.reply_error(str(exc))
            self.discard_input()
            raise
        return transfer

    def discard_input(self) -> None:
        """Drop what the peer sent and we will not read (closing its fds), so
        that closing does not reset the connection before the peer has read
        our last message. Bounded and non-blocking."""
        timeout = self.sock.gettimeout()
        # Non-blocking for real: with a timeout set, Python polls for
        # readability before recvmsg, whatever MSG_DONTWAIT says.
        self.sock.settimeout(0)
        try:
            with contextlib.suppress(OSError, ProtocolError):
                for _ in range(2 * MAX_FDS_PER_MESSAGE):
                    msg = recv_with_fds(self.sock, MAX_MESSAGE + 1, MAX_FDS_PER_MESSAGE)
                    msg.close_fds()
                    if not msg.data:
                        break
        finally:
            with contextlib.suppress(OSError):
                self.sock.settimeout(timeout)

    def give(self, items: Sequence[Passable], meta: dict[str, Any] | None = None) -> dict[str, Any]:
        """Send sockets and wait for the receiver's ``ok``.

        Raises:
            ProtocolError: the receiver refused (its reason in the message),
                also when it gave up mid-transfer and closed the connection.
        """
        try:
            self.send_sockets(items, meta)
        except (BrokenPipeError, ConnectionResetError) as exc:
            # The receiver stopped reading; it usually said why before closing.
            try:
                header, _ = self.recv()
            except (OSError, ProtocolError):
                raise ProtocolError(f"receiver closed the connection: {exc}") from exc
            raise ProtocolError(f"peer refused: {header.get('message', header.get('op'))}") from exc
        return self.expect_ok()

    def take(self, *, max_total: int = MAX_TRANSFER) -> Transfer:
        """Receive sockets and acknowledge them."""
        transfer = self.recv_sockets(max_total=max_total)
        try:
            self.reply_ok(count=len(transfer.sockets))
        except OSError:
            transfer.close()
            raise
        return transfer

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> Channel:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def channel_pair() -> tuple[Channel, Channel]:
    """Two connected channels (for a parent and the child it spawns)."""
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    return Channel(a), Channel(b)


def connect(path: str, *, timeout: float | None = DEFAULT_TIMEOUT) -> Channel:
    """Connect to a handoff socket at a path or ``@abstract`` name."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    try:
        sock.settimeout(timeout)
        sock.connect("\0" + path[1:] if path.startswith("@") else path)
    except BaseException:
        sock.close()
        raise
    return Channel(sock, timeout=timeout)


def listen(path: str, *, mode: int = 0o600, backlog: int = 64) -> socket.socket:
    """A listening handoff socket; a filesystem one gets ``mode`` (default 0600)."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    try:
        if path.startswith("@"):
            sock.bind("\0" + path[1:])
        else:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
            old = os.umask(0o177)
            try:
                sock.bind(path)
            finally:
                os.umask(old)
            os.chmod(path, mode)
        sock.listen(backlog)
    except BaseException:
        sock.close()
        raise
    return sock


def accept(
    listener: socket.socket,
    *,
    allowed_uids: Collection[int] | None = None,
    timeout: float | None = DEFAULT_TIMEOUT,
) -> tuple[Channel, Credentials]:
    """Accept one peer and check its uid; a denied peer is told why and closed.

    Raises:
        PeerDeniedError: the peer's uid is not allowed.
    """
    conn, _ = listener.accept()
    channel = Channel(conn, timeout=timeout)
    try:
        creds = check_peer(conn, allowed_uids)
    except Exception as exc:
        refuse(conn, str(exc))
        raise
    return channel, creds


def refuse(sock: socket.socket, message: str) -> None:
    """Tell the peer why, then close.

    What it sent that we did not read is discarded first (its fds closed):
    closing a Unix socket with unread data makes the peer's next read fail
    with ECONNRESET, and it would never see the reason.
    """
    channel = Channel(sock, timeout=0)  # never block on a peer that does not read
    channel.reply_error(message)
    channel.discard_input()
    channel.close()
