"""The demo HTTP app that ``nodrop demo`` runs under ``nodrop run``.

A small asyncio HTTP/1.1 server that behaves the way a server should under a
supervisor:

* takes its listening sockets from ``LISTEN_FDS`` (:func:`nodrop.listen_fds`)
  and says ``READY=1`` once it accepts (:func:`nodrop.ready`);
* on SIGTERM it *drains*: stops accepting, answers the requests it has, tells
  keep-alive clients ``Connection: close`` on their next response, closes
  idle connections only between requests, and exits.

It avoids an asyncio pitfall of Python 3.11: ``asyncio.Server.close()`` resets
connections that the kernel accepted but whose transport was not set up yet,
and cancelling a pending ``loop.sock_accept`` can lose one too (its reader
callback may already be queued; it then calls accept(2) and sets the result
of a cancelled future, dropping the socket). Here a reader callback accepts,
and checks the drain flag *before* each accept(2): every accepted socket
reaches a handler, and whatever is still queued in the kernel stays there for
the next generation.

Run it alone (``python -m nodrop.demo.app --port 8000``) or under nodrop.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import signal
import socket

import nodrop

IDLE_TIMEOUT = 15.0
MAX_HEAD = 16 * 1024


class App:
    def __init__(self, listeners: list[socket.socket]) -> None:
        self.listeners = listeners
        self.generation = os.environ.get("NODROP_GENERATION", "?")
        self.draining = asyncio.Event()
        self.connections: set[asyncio.Task[None]] = set()
        self.requests = 0

    def body(self) -> bytes:
        return f"hello from generation {self.generation}, pid {os.getpid()}\n".encode()

    def start_accepting(self, sock: socket.socket) -> None:
        sock.setblocking(False)
        asyncio.get_running_loop().add_reader(sock.fileno(), self._accept, sock)

    def stop_accepting(self) -> None:
        loop = asyncio.get_running_loop()
        for sock in self.listeners:
            loop.remove_reader(sock.fileno())

    def _accept(self, sock: socket.socket) -> None:
        # Checked before accept(2), in the same callback: once draining, no
        # connection is taken from the kernel's queue, so none can be dropped.
        if self.draining.is_set():
            return
        loop = asyncio.get_running_loop()
        for _ in range(64):  # bounded per wake-up, fair to other listeners
            try:
                conn, _ = sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                return  # ECONNABORTED and friends: the client gave up
            conn.setblocking(False)
            task = loop.create_task(self.serve(conn))
            self.connections.add(task)
            task.add_done_callback(self.connections.discard)

    async def serve(self, conn: socket.socket) -> None:
        reader, writer = await asyncio.open_connection(sock=conn, limit=MAX_HEAD)
        try:
            # A new connection always has a request on its way, even if its
            # bytes are not here yet: never close it unanswered.
            head: bytes | None = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), IDLE_TIMEOUT)
            while head is not None:
                await self.respond(reader, writer, head)
                if not self.keep_alive(head):
                    return
                head = await self.next_request(reader)
        except (
            asyncio.IncompleteReadError,
            asyncio.LimitOverrunError,
            ConnectionError,
            TimeoutError,
        ):
            return
        finally:
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()

    async def next_request(self, reader: asyncio.StreamReader) -> bytes | None:
        """The next request head on a kept-alive connection, or None to close.

        Closes only between requests: when draining (or idle too long) and no
        byte of a next request has arrived.
        """
        buffered = reader._buffer  # type: ignore[attr-defined]
        if self.draining.is_set() and not buffered:
            return None
        read_head = asyncio.ensure_future(reader.readuntil(b"\r\n\r\n"))
        drain = asyncio.ensure_future(self.draining.wait())
        done, _ = await asyncio.wait(
            {read_head, drain}, timeout=IDLE_TIMEOUT, return_when=asyncio.FIRST_COMPLETED
        )
        drain.cancel()
        if read_head in done:
            return read_head.result()
        # Idle, and draining or timed out. A request may be arriving at this
        # very moment: take it if its first bytes are here.
        read_head.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await read_head
        if not reader._buffer:  # type: ignore[attr-defined]
            return None
        return await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)

    def keep_alive(self, head: bytes) -> bool:
        request_line = head.split(b"\r\n", 1)[0]
        return (
            b"connection: close" not in head.lower()
            and request_line.endswith(b"1.1")
            and not self.draining.is_set()
        )

    async def respond(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, head: bytes
    ) -> None:
        length = _content_length(head)
        if length:
            await reader.readexactly(length)
        keep_alive = self.keep_alive(head)
        body = self.body()
        writer.write(
            b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: %d\r\n"
            b"Connection: %s\r\n\r\n%s"
            % (len(body), b"keep-alive" if keep_alive else b"close", body)
        )
        await writer.drain()
        self.requests += 1

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGTERM, self.draining.set)
        loop.add_signal_handler(signal.SIGINT, self.draining.set)
        for sock in self.listeners:
            self.start_accepting(sock)
        nodrop.ready(f"generation {self.generation} serving")
        await self.draining.wait()
        self.stop_accepting()
        nodrop.stopping(f"generation {self.generation} draining")
        if self.connections:
            await asyncio.wait(set(self.connections), timeout=IDLE_TIMEOUT + 5)


def _content_length(head: bytes) -> int:
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            try:
                return max(0, int(value.strip()))
            except ValueError:
                return 0
    return 0


def main() -> None:
    parser = argparse.ArgumentParser(description="nodrop's demo HTTP app")
    parser.add_argument("--port", type=int, help="bind 127.0.0.1:PORT when not given sockets")
    args = parser.parse_args()
    listeners = [item.socket for item in nodrop.listen_fds()]
    if not listeners:
        if args.port is None:
            parser.error("no LISTEN_FDS: run it under `nodrop run`, or give --port")
        listeners = [socket.create_server(("127.0.0.1", args.port), reuse_port=True)]
    asyncio.run(App(listeners).run())


if __name__ == "__main__":
    main()
