"""Accept connections so that stopping loses none, on any asyncio event loop.

A server made with ``loop.create_server``/``asyncio.start_server`` can only
stop accepting by closing, and closing races the connections it has just
accepted (Python 3.11 resets them; see :mod:`nodrop.adapters.drain`), while
uvloop's ``Server`` offers no way to stop watching its socket at all. An
:class:`Acceptor` instead watches each listening socket with a reader
callback that checks whether it may accept *before* each ``accept(2)``:
once :meth:`Acceptor.stop` has run, nothing more is taken from the kernel's
queue, so whatever is queued stays there for the new generation, and every
connection already taken is set up and served.

Each accepted socket, and each connection handed over from an old
generation (:meth:`Acceptor.adopt`), goes through the same ``connect``
coroutine -- typically ``loop.connect_accepted_socket`` with the server's
own protocol factory -- so an adopted connection is served exactly like one
this process accepted itself.

Works with the standard event loop and with uvloop (both watch an
arbitrary fd with ``add_reader``).
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import Awaitable, Callable, Sequence

from nodrop.accept_backoff import loop_accepted, loop_pause, out_of_resources, to_stderr

Connect = Callable[[socket.socket, bytes], Awaitable[object]]
"""Set up one accepted connection: ``connect(sock, prefix)``, where ``prefix``
is what an old generation had already read from it (fed to the protocol
before anything from the socket)."""

ACCEPT_BATCH = 64
"""Connections accepted per wake-up of one listening socket (fair to the others)."""


class Acceptor:
    """Accept on ``listeners`` and hand each connection to ``connect``.

    Args:
        listeners: listening stream sockets (kept open; never closed here).
        connect: sets one connection up; if it raises, the socket is closed.
    """

    def __init__(self, listeners: Sequence[socket.socket], connect: Connect) -> None:
        self.listeners = list(listeners)
        self._connect = connect
        self._accepting = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._setting_up: set[asyncio.Task[None]] = set()
        self.accepted = 0
        self.adopted = 0

    @property
    def accepting(self) -> bool:
        return self._accepting

    def start(self) -> None:
        """Watch every listening socket (call on the running loop)."""
        loop = asyncio.get_running_loop()
        self._loop = loop
        self._accepting = True
        for sock in self.listeners:
            sock.setblocking(False)
            loop.add_reader(sock.fileno(), self._readable, sock)

    def stop(self) -> None:
        """Stop accepting; connections still queued stay in the kernel's queue."""
        self._accepting = False
        if self._loop is None:
            return
        for sock in self.listeners:
            with contextlib.suppress(ValueError, OSError):  # closed meanwhile
                self._loop.remove_reader(sock.fileno())

    async def settle(self) -> None:
        """Wait until every connection taken so far has been set up."""
        while self._setting_up:
            await asyncio.gather(*self._setting_up, return_exceptions=True)

    def adopt(self, sock: socket.socket, prefix: bytes = b"") -> None:
        """Serve a connection handed over by another process, as if accepted here."""
        self.adopted += 1
        self._spawn(sock, prefix)

    def _readable(self, listener: socket.socket) -> None:
        for _ in range(ACCEPT_BATCH):
            # Checked before every accept(2): once stopped, no connection
            # leaves the kernel's queue, so none can be dropped in between.
            if not self._accepting:
                return
            try:
                conn, _ = listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                if out_of_resources(exc):
                    # EMFILE: the connection stays queued and the listener
                    # readable; watching it now would spin. Pause, then retry.
                    loop_pause(
                        listener,
                        lambda: self._readable(listener),
                        to_stderr,
                        "nodrop: accept",
                        wanted=lambda: self._accepting,
                    ).failed(exc)
                return  # ECONNABORTED, ...: the queue keeps the rest
            loop_accepted(listener)
            self.accepted += 1
            self._spawn(conn, b"")

    def _spawn(self, sock: socket.socket, prefix: bytes) -> None:
        sock.setblocking(False)
        loop = self._loop or asyncio.get_running_loop()
        task = loop.create_task(self._set_up(sock, prefix))
        self._setting_up.add(task)
        task.add_done_callback(self._setting_up.discard)

    async def _set_up(self, sock: socket.socket, prefix: bytes) -> None:
        try:
            await self._connect(sock, prefix)
        except Exception as exc:
            sock.close()
            asyncio.get_running_loop().call_exception_handler(
                {"message": "setting up an accepted connection failed", "exception": exc}
            )
