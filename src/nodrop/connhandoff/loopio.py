"""Non-blocking fd-wire I/O on the event loop, and closing a connection
without a reset (the broker's two pieces of plumbing)."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import time
from collections.abc import Sequence
from typing import Any

from nodrop.fdwire import Channel


class LoopIO:
    """Send and receive fd-wire messages on non-blocking channels, waiting
    on the running loop, each wait bounded by an optional deadline."""

    def __init__(self) -> None:
        self._watched: set[tuple[int, bool]] = set()

    async def wait(self, sock: socket.socket, write: bool, deadline: float | None) -> None:
        """Until ``sock`` is readable (or writable); TimeoutError past ``deadline``."""
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[None] = loop.create_future()
        fd = sock.fileno()

        def ready() -> None:
            if not fut.done():
                fut.set_result(None)

        (loop.add_writer if write else loop.add_reader)(fd, ready)
        self._watched.add((fd, write))
        try:
            if deadline is None:
                await fut
            else:
                await asyncio.wait_for(fut, max(0.0, deadline - time.monotonic()))
        finally:
            if (fd, write) in self._watched:
                self._watched.discard((fd, write))
                (loop.remove_writer if write else loop.remove_reader)(fd)

    async def recv(
        self, channel: Channel, max_fds: int, deadline: float | None
    ) -> tuple[dict[str, Any], list[int]]:
        while True:
            try:
                return channel.recv(max_fds=max_fds)
            except (BlockingIOError, InterruptedError):
                await self.wait(channel.sock, False, deadline)

    async def send(
        self,
        channel: Channel,
        header: dict[str, Any],
        fds: Sequence[int] = (),
        deadline: float | None = None,
    ) -> None:
        while True:
            try:
                channel.send(header, fds)
                return
            except (BlockingIOError, InterruptedError):
                await self.wait(channel.sock, True, deadline)

    def close(self) -> None:
        """Stop every wait (on the running loop, if any)."""
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            loop = None
        if loop is not None:
            for fd, write in list(self._watched):
                (loop.remove_writer if write else loop.remove_reader)(fd)
        self._watched.clear()


class Lingering:
    """Connections being closed gracefully: ``shutdown(SHUT_WR)`` -- a FIN the
    client sees as an ordinary keep-alive close -- then read and discard until
    the client's FIN or ``linger`` seconds, so unread bytes do not turn the
    close into a reset."""

    def __init__(self, linger: float) -> None:
        self.linger = linger
        self._closing: dict[socket.socket, asyncio.TimerHandle] = {}

    def __len__(self) -> int:
        return len(self._closing)

    def close_gracefully(self, sock: socket.socket) -> None:
        try:
            sock.shutdown(socket.SHUT_WR)
            sock.setblocking(False)
        except OSError:
            sock.close()
            return
        loop = asyncio.get_running_loop()
        self._closing[sock] = loop.call_later(self.linger, self._finish, sock)
        loop.add_reader(sock.fileno(), self._discard, sock)

    def _discard(self, sock: socket.socket) -> None:
        for _ in range(16):
            try:
                data = sock.recv(65536)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                data = b""
            if not data:
                self._finish(sock)
                return

    def _finish(self, sock: socket.socket) -> None:
        timer = self._closing.pop(sock, None)
        if timer is None:
            return
        timer.cancel()
        with contextlib.suppress(RuntimeError):  # no loop any more: nothing watches it
            asyncio.get_running_loop().remove_reader(sock.fileno())
        sock.close()

    def close(self) -> None:
        for sock in list(self._closing):
            self._finish(sock)
