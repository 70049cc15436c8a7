"""asyncio helpers for the connection handoff.

* :class:`AsyncHandoff` — receive connections in the new generation (an
  ``adopt(sock, state)`` callback on the loop) and give idle ones while
  draining (:meth:`AsyncHandoff.give`).
* :func:`read_or_detach` — the read loop of a stream protocol (HTTP/1.1
  keep-alive, a line protocol, WebSocket frames): returns the next message,
  or, once ``stop`` is set and the connection is idle, the connection itself
  taken out of asyncio, ready to give.

"Idle" means: nothing buffered in user space and nothing left to write.
Once stopping, reading is paused after each message, so the bytes of the
next one stay in the kernel, and travel with the socket to the new process.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import select
import socket
import threading
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

from nodrop.connhandoff.client import (
    DEFAULT_ROOM,
    Adopted,
    Giver,
    GiveResult,
    Receiver,
    broker_path,
)
from nodrop.errors import ProtocolError

T = TypeVar("T")

DEFAULT_MESSAGE_TIMEOUT = 30.0
"""Once the first byte of a message is here, the rest must follow within this."""
STOP_TIMEOUT = 5.0

Adopt = Callable[[socket.socket, bytes], object]


@dataclass
class Detached:
    """An idle connection taken out of its asyncio transport; you own ``sock``."""

    sock: socket.socket


def buffered(reader: asyncio.StreamReader) -> int:
    """Bytes read from the socket but not consumed yet (asyncio keeps them private)."""
    return len(reader._buffer)  # type: ignore[attr-defined]  # noqa: SLF001 - no public API


def detach(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> socket.socket | None:
    """Take the socket out of its transport if the connection is idle.

    Idle: nothing buffered in ``reader``, nothing waiting to be written.
    The transport is then closed without touching the connection (asyncio
    closes its fd, never shuts the socket down); the returned socket is a
    duplicate fd, close-on-exec, in non-blocking mode.

    Returns:
        The socket, or None if the connection is not idle or already closing.
    """
    transport = _transport(writer)
    if transport.is_closing() or buffered(reader) or transport.get_write_buffer_size():
        return None
    raw = transport.get_extra_info("socket")
    if raw is None:
        return None
    transport.pause_reading()
    sock = socket.socket(fileno=os.dup(raw.fileno()))  # os.dup: non-inheritable
    sock.setblocking(False)
    transport.abort()
    return sock


def _transport(writer: asyncio.StreamWriter) -> asyncio.Transport:
    transport = writer.transport
    assert isinstance(transport, asyncio.Transport)  # a socket's: reads and writes
    return transport


async def _flush(writer: asyncio.StreamWriter) -> None:
    if writer.transport.get_write_buffer_size():
        writer.transport.set_write_buffer_limits(high=0)
        await writer.drain()


DEFAULT_LINGER = 5.0
"""Draining without a broker: how long an idle connection waits for its next
request (answered with ``Connection: close``) before it is closed."""


def _readable(transport: asyncio.Transport) -> bool:
    """Bytes (or EOF) waiting in the kernel that asyncio has not read yet."""
    sock = transport.get_extra_info("socket")
    if sock is None:
        return False
    poller = select.poll()
    poller.register(sock.fileno(), select.POLLIN)
    return bool(poller.poll(0))


async def read_or_detach(
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
    read: Callable[[], Awaitable[T]],
    *,
    stop: asyncio.Event,
    detachable: bool = True,
    idle_timeout: float | None = None,
    message_timeout: float = DEFAULT_MESSAGE_TIMEOUT,
    linger: float = DEFAULT_LINGER,
) -> T | Detached | None:
    """The next message, or the idle connection once ``stop`` is set.

    ``read`` is only started once a byte of the message is here, and is
    never cancelled: it need not be cancellation-safe.

    Args:
        read: reads one whole message from ``reader``.
        stop: set when draining.
        detachable: False when nobody can take the connection (no broker).
        idle_timeout: give up on a connection idle this long.
        message_timeout: bound on ``read`` once its first byte is here.
        linger: draining and not detachable: how long to wait for the next
            message before closing.

    Returns:
        The message; :class:`Detached` when stopping and idle (and
        ``detachable``); None to close: idle past ``idle_timeout``, or
        draining, not detachable and no message within ``linger``.

    A connection is never closed while bytes of a next message are waiting,
    in asyncio's buffer or in the kernel's: closing a socket with unread data
    resets it, and the client's request would be lost. Draining without a
    broker therefore waits for the next message (the caller answers it with
    ``Connection: close``) rather than racing the client with a close.

    Raises:
        whatever ``read`` raises (EOF, protocol errors), TimeoutError.
    """
    transport = _transport(writer)
    for _ in range(3):  # a flush may let bytes in; then they are ours to answer
        if detachable and stop.is_set() and not buffered(reader):
            await _flush(writer)
            if buffered(reader) or _readable(transport):
                continue
            sock = detach(reader, writer)
            return Detached(sock) if sock is not None else None
        break
    if not buffered(reader) and not reader.at_eof():  # (at_eof: EOF seen and nothing buffered)
        lingering = stop.is_set()  # draining and not detachable
        if not transport.is_reading():
            transport.resume_reading()
        # Wait for data without consuming it (no public API does): a detach may follow.
        waiter = asyncio.ensure_future(reader._wait_for_data("read_or_detach"))  # type: ignore[attr-defined]  # noqa: SLF001
        waits: set[asyncio.Future[Any]] = {waiter}
        if not lingering:
            waits.add(asyncio.ensure_future(stop.wait()))
        try:
            # Let the waiter task register itself with the reader first: bytes
            # fed before that would wake nobody (and _wait_for_data does not
            # look at the buffer), leaving a request unanswered until timeout.
            await asyncio.sleep(0)
            if not buffered(reader):
                await asyncio.wait(
                    waits,
                    timeout=linger if lingering else idle_timeout,
                    return_when=asyncio.FIRST_COMPLETED,
                )
        finally:
            for fut in waits:
                fut.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await waiter
        if not buffered(reader) and not reader.at_eof():
            if stop.is_set() and not lingering:  # the drain began while we waited
                return await read_or_detach(
                    reader,
                    writer,
                    read,
                    stop=stop,
                    detachable=detachable,
                    message_timeout=message_timeout,
                    linger=linger,
                )
            if not _readable(transport):
                return None  # idle timeout, or lingered long enough: close
    if not transport.is_reading():
        transport.resume_reading()
    result = await asyncio.wait_for(read(), message_timeout)
    if stop.is_set() and detachable:
        transport.pause_reading()  # the next message waits in the kernel
    return result


class AsyncHandoff:
    """A worker's connection handoff, for asyncio servers.

    Args:
        path: the broker's socket (``$NODROP_HANDOFF``).
    """

    def __init__(self, path: str) -> None:
        self.path = path
        self.generation: int | None = None
        self._receiver: Receiver | None = None
        self._thread: threading.Thread | None = None
        self._giver: Giver | None = None
        self._give_lock = asyncio.Lock()

    @classmethod
    def from_environ(cls) -> AsyncHandoff | None:
        """The handoff of a worker started by ``nodrop run``, or None elsewhere."""
        path = broker_path()
        return cls(path) if path else None

    async def start_receiving(
        self, adopt: Adopt, *, room: Callable[[], int] | int = DEFAULT_ROOM
    ) -> None:
        """Register with the broker; ``adopt(sock, state)`` is then called on
        this loop for each connection the old generation gives us. Call it
        before saying READY=1, so no connection finds us unregistered.

        Raises:
            ProtocolError, OSError: the broker refused or is unreachable.
        """
        loop = asyncio.get_running_loop()
        first = room() if callable(room) else room
        self._receiver = await asyncio.to_thread(Receiver.register, self.path, room=first)
        self.generation = self._receiver.generation
        self._thread = threading.Thread(
            target=self._receive_loop,
            args=(loop, self._receiver, adopt, room),
            name="nodrop-handoff-receiver",
            daemon=True,
        )
        self._thread.start()

    @staticmethod
    def _receive_loop(
        loop: asyncio.AbstractEventLoop,
        receiver: Receiver,
        adopt: Adopt,
        room: Callable[[], int] | int,
    ) -> None:
        for _ in range(1 << 30):  # until unregistered or the broker goes away
            try:
                batch = receiver.receive(room)
            except ProtocolError:
                continue  # a malformed batch: the broker keeps those connections
            if batch is None:
                return
            for item in batch:
                item.sock.setblocking(False)
            try:
                loop.call_soon_threadsafe(_deliver, loop, adopt, batch)
            except RuntimeError:  # the loop is closed: we are exiting
                for item in batch:
                    item.sock.close()
                return

    async def stop_receiving(self, timeout: float = STOP_TIMEOUT) -> None:
        """Unregister; returns once the batch in flight (if any) was adopted."""
        receiver, thread = self._receiver, self._thread
        if receiver is None or thread is None:
            return
        receiver.unregister()
        await asyncio.to_thread(thread.join, timeout)
        receiver.close()
        self._receiver = self._thread = None

    async def give(
        self, conns: Sequence[socket.socket], states: Sequence[bytes] = ()
    ) -> GiveResult:
        """Give idle connections to the new generation (see :meth:`Giver.give`).

        Never raises for an unreachable broker: every connection is then
        returned to you.
        """
        if not conns:
            return GiveResult()
        async with self._give_lock:
            if self._giver is None:
                try:
                    self._giver = await asyncio.to_thread(Giver.connect, self.path)
                except (OSError, ProtocolError):
                    return GiveResult(returned=tuple(range(len(conns))))
            return await asyncio.to_thread(self._giver.give, conns, states)

    def close(self) -> None:
        if self._receiver is not None:
            self._receiver.close()
            if self._thread is not None:
                self._thread.join(STOP_TIMEOUT)
            self._receiver = self._thread = None
        if self._giver is not None:
            self._giver.close()
            self._giver = None


def _deliver(loop: asyncio.AbstractEventLoop, adopt: Adopt, batch: list[Adopted]) -> None:
    for item in batch:
        try:
            adopt(item.sock, item.state)
        except Exception as exc:
            item.sock.close()
            loop.call_exception_handler(
                {"message": "adopting a handed-over connection failed", "exception": exc}
            )
