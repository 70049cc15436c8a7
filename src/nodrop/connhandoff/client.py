"""A worker's side of the connection handoff, blocking (threaded servers).

* :class:`Receiver` — register with the broker and receive connections the
  old generation gives (call :meth:`Receiver.receive` in a thread).
* :class:`Giver` — give idle connections to the new generation while
  draining; you get back the ones nobody could take.

The broker is at ``$NODROP_HANDOFF`` (set by ``nodrop run``). Both classes
are plain blocking code with a timeout on every wait; the asyncio helpers in
:mod:`nodrop.connhandoff.aio` run them in threads.
"""

from __future__ import annotations

import contextlib
import os
import socket
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from nodrop.connhandoff.wire import (
    CONN_NAME,
    ENV,
    MAX_BATCH,
    MAX_ROOM,
    Verdict,
    decode_states,
    encode_states,
    plan_batches,
    register_header,
)
from nodrop.errors import ProtocolError, TruncatedError
from nodrop.fdwire import DEFAULT_TIMEOUT, Channel, connect, parse_fds_chunk
from nodrop.listeners.identity import SocketIdentity, identify

DEFAULT_ROOM = 10_000
"""Connections a receiver accepts unless told otherwise."""


def broker_path(environ: dict[str, str] | None = None) -> str | None:
    """The broker's socket from ``$NODROP_HANDOFF``, or None when not supervised."""
    value = (os.environ if environ is None else environ).get(ENV, "")
    return value or None


@dataclass
class Adopted:
    """A connection received from the old generation, and its application state."""

    sock: socket.socket
    state: bytes


@dataclass(frozen=True)
class GiveResult:
    """What became of connections given with :meth:`Giver.give`.

    Attributes:
        placed: adopted by the new generation (our copies are closed).
        closed: closed gracefully by the broker (the receiver failed after
            they were sent; our copies are closed).
        unknown: the broker did not answer in time: our copies were closed
            *without* a shutdown, so wherever the connections went they live.
        returned: indices of the connections nobody took: still ours, never
            read by anyone else; close them between requests (or serve them).
    """

    placed: int = 0
    closed: int = 0
    unknown: int = 0
    returned: tuple[int, ...] = ()


class _Conn:
    """A connection as the handoff protocol's ``Passable``."""

    __slots__ = ("identity", "name", "sock")

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.name = CONN_NAME
        self.identity: SocketIdentity = identify(sock)

    def fileno(self) -> int:
        return self.sock.fileno()


class Receiver:
    """This worker's registration with the broker: connections arrive here.

    Use :meth:`register`; then call :meth:`receive` in a loop (one thread)
    until it returns None.
    """

    def __init__(self, channel: Channel, generation: int) -> None:
        self.channel = channel
        self.generation = generation

    @classmethod
    def register(
        cls, path: str | None = None, *, room: int = DEFAULT_ROOM, timeout: float = DEFAULT_TIMEOUT
    ) -> Receiver:
        """Connect to the broker and register for up to ``room`` connections.

        Raises:
            ProtocolError: the broker refused (not a worker of it, ...).
            OSError: the broker is not reachable.
        """
        path = path or broker_path()
        if path is None:
            raise ProtocolError(f"no connection broker: ${ENV} is not set")
        channel = connect(path, timeout=timeout)
        try:
            reply = channel.request(register_header(min(max(room, 0), MAX_ROOM)))
            generation = reply.get("generation")
        except BaseException:
            channel.close()
            raise
        channel.sock.settimeout(None)  # waits for the old generation: unbounded by design
        return cls(channel, generation if isinstance(generation, int) else 0)

    def receive(self, room: Callable[[], int] | int = DEFAULT_ROOM) -> list[Adopted] | None:
        """Wait for the next batch and acknowledge it.

        Args:
            room: how many more connections we accept after this batch (sent
                with the acknowledgement; the broker never sends more).

        Returns:
            The adopted connections (blocking sockets, close-on-exec), or
            None once the broker has confirmed :meth:`unregister` or went away.

        Raises:
            ProtocolError: a malformed batch, or one the kernel truncated
                because we are at RLIMIT_NOFILE (``TruncatedError``): its fds
                are closed, the broker is told why and gives the connections
                to another worker or back to the giver.
        """
        try:
            header, fds = self.channel.recv(max_fds=MAX_BATCH)
        except TruncatedError as exc:
            # At our fd limit the kernel dropped the batch's fds (MSG_CTRUNC):
            # refuse it, so the broker gives it to another worker or back.
            self.channel.reply_error(f"{exc}")
            raise
        except ProtocolError as exc:
            if "peer closed" in str(exc):
                return None
            raise
        except OSError:
            return None
        if header["op"] in ("unregistered", "error"):
            for fd in fds:
                os.close(fd)
            return None
        try:
            total, _entries, meta = parse_fds_chunk(header, len(fds), 0, MAX_BATCH)
            if total != len(fds):
                raise ProtocolError("a batch must come in one message")
            states = decode_states(meta or {}, len(fds))
        except ProtocolError as exc:
            for fd in fds:
                os.close(fd)
            self.channel.reply_error(str(exc))
            raise
        adopted = []
        for fd, state in zip(fds, states, strict=True):
            sock = socket.socket(fileno=fd)
            sock.settimeout(None)
            adopted.append(Adopted(sock, state))
        left = room() if callable(room) else room
        # If the broker is gone it counts these as lost; they are ours now anyway.
        with contextlib.suppress(OSError):
            self.channel.reply_ok(count=len(adopted), room=min(max(left, 0), MAX_ROOM))
        return adopted

    def unregister(self) -> None:
        """Ask for no more connections; :meth:`receive` returns None once the
        broker has finished any batch already on its way (safe from any thread)."""
        with contextlib.suppress(OSError):
            self.channel.send({"op": "unregister"})

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.channel.sock.shutdown(socket.SHUT_RDWR)
        self.channel.close()


class Giver:
    """A draining worker's channel to the broker (blocking)."""

    def __init__(self, channel: Channel) -> None:
        self.channel = channel

    @classmethod
    def connect(cls, path: str | None = None, *, timeout: float = DEFAULT_TIMEOUT) -> Giver:
        path = path or broker_path()
        if path is None:
            raise ProtocolError(f"no connection broker: ${ENV} is not set")
        return cls(connect(path, timeout=timeout))

    def give(self, conns: Sequence[socket.socket], states: Sequence[bytes] = ()) -> GiveResult:
        """Give idle connections to the new generation.

        Only give a connection with nothing buffered in user space: whatever
        you have read from it is not in the socket any more.

        Args:
            conns: connected stream sockets; do not read from them meanwhile.
            states: one opaque state per connection (at most MAX_STATE bytes),
                or empty for none.

        Returns:
            The verdict; every connection not in ``returned`` is closed here.
        """
        if states and len(states) != len(conns):
            raise ValueError("one state per connection, or none")
        all_states = list(states) or [b""] * len(conns)
        placed = closed = unknown = 0
        returned: list[int] = []
        batches = plan_batches([len(s) for s in all_states])
        for number, (start, end) in enumerate(batches):
            try:
                items = [_Conn(sock) for sock in conns[start:end]]
                header = self.channel.give(items, encode_states(all_states[start:end]))
                verdict = Verdict.from_header(header, end - start)
            except (ProtocolError, OSError) as exc:
                if isinstance(exc, TimeoutError) or "peer refused" not in str(exc):
                    # Unknown fate: the broker may have placed them. Close our
                    # copies without a shutdown, so placed ones live on.
                    unknown += end - start
                    for sock in conns[start:end]:
                        sock.close()
                else:
                    returned.extend(range(start, end))
                for later_start, later_end in batches[number + 1 :]:
                    returned.extend(range(later_start, later_end))
                break
            placed += verdict.placed
            closed += verdict.closed
            back = {start + i for i in verdict.returned}
            returned.extend(sorted(back))
            for index in range(start, end):
                if index not in back:
                    conns[index].close()
        return GiveResult(placed, closed, unknown, tuple(returned))

    def close(self) -> None:
        self.channel.close()
