"""The demo HTTP app that ``nodrop demo`` runs under ``nodrop run``.

A small asyncio HTTP/1.1 server that behaves the way a server should under a
supervisor:

* takes its listening sockets from ``LISTEN_FDS`` (:func:`nodrop.listen_fds`)
  and says ``READY=1`` once it accepts (:func:`nodrop.ready`);
* on SIGTERM it *drains*: stops accepting and answers the requests it has;
  under ``nodrop run`` (``$NODROP_HANDOFF``) it hands every idle keep-alive
  connection to the new generation instead of closing it
  (:mod:`nodrop.connhandoff`), and the new generation adopts them between two
  requests. Without a broker, or for connections the new generation cannot
  take, it tells keep-alive clients ``Connection: close`` on their next
  response and closes idle connections only between requests.

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
import sys

import nodrop
from nodrop.accept_backoff import loop_accepted, loop_pause, out_of_resources, to_stderr
from nodrop.connhandoff import AsyncHandoff, Detached, read_or_detach

IDLE_TIMEOUT = 15.0
MAX_HEAD = 16 * 1024
MAX_CONNECTIONS = 20_000


class App:
    def __init__(self, listeners: list[socket.socket]) -> None:
        self.listeners = listeners
        self.generation = os.environ.get("NODROP_GENERATION", "?")
        self.draining = asyncio.Event()
        self.connections: set[asyncio.Task[None]] = set()
        self.requests = 0
        self.handoff = AsyncHandoff.from_environ()
        self.to_give: list[socket.socket] = []
        self.give_wakeup = asyncio.Event()
        self.handed_over = 0

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
        for _ in range(64):  # bounded per wake-up, fair to other listeners
            try:
                conn, _ = sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                if out_of_resources(exc):  # EMFILE: pause, or the loop would spin
                    loop_pause(
                        sock,
                        lambda: self._accept(sock),
                        to_stderr,
                        "demo: accept",
                        wanted=lambda: not self.draining.is_set(),
                    ).failed(exc)
                return  # ECONNABORTED and friends: the client gave up
            loop_accepted(sock)
            self.start(conn, fresh=True)

    def adopt(self, conn: socket.socket, state: bytes) -> None:
        """A kept-alive connection the old generation handed over: between
        two requests, exactly as if it had been ours all along."""
        self.start(conn, fresh=False)

    def start(self, conn: socket.socket, *, fresh: bool, detachable: bool = True) -> None:
        conn.setblocking(False)
        task = asyncio.get_running_loop().create_task(self.serve(conn, fresh, detachable))
        self.connections.add(task)
        task.add_done_callback(self.connections.discard)

    async def serve(self, conn: socket.socket, fresh: bool, detachable: bool) -> None:
        reader, writer = await asyncio.open_connection(sock=conn, limit=MAX_HEAD)
        detachable = detachable and self.handoff is not None
        # A new connection always has a request on its way, even if its bytes
        # are not here yet: never close it unanswered (hand it over at most).
        idle_timeout = IDLE_TIMEOUT
        try:
            while True:
                message = await read_or_detach(
                    reader,
                    writer,
                    lambda: self.read_request(reader),
                    stop=self.draining,
                    detachable=detachable,
                    idle_timeout=idle_timeout,
                )
                if isinstance(message, Detached):
                    self.to_give.append(message.sock)
                    self.give_wakeup.set()
                    return
                if message is None:
                    if fresh and not detachable:
                        # Draining without a broker: wait for the first request.
                        message = await asyncio.wait_for(self.read_request(reader), idle_timeout)
                    else:
                        return
                fresh = False
                keep_alive = await self.respond(writer, message, detachable)
                if not keep_alive:
                    return
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

    async def read_request(self, reader: asyncio.StreamReader) -> bytes:
        """One request: its head (the body, if any, is read and dropped)."""
        head = await reader.readuntil(b"\r\n\r\n")
        length = _content_length(head)
        if length:
            await reader.readexactly(length)
        return head

    def keep_alive(self, head: bytes, detachable: bool) -> bool:
        request_line = head.split(b"\r\n", 1)[0]
        return (
            b"connection: close" not in head.lower()
            and request_line.endswith(b"1.1")
            # Draining: keep the connection only if the new generation can take it.
            and (detachable or not self.draining.is_set())
        )

    async def respond(self, writer: asyncio.StreamWriter, head: bytes, detachable: bool) -> bool:
        keep_alive = self.keep_alive(head, detachable)
        body = self.body()
        writer.write(
            b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: %d\r\n"
            b"Connection: %s\r\n\r\n%s"
            % (len(body), b"keep-alive" if keep_alive else b"close", body)
        )
        await writer.drain()
        self.requests += 1
        return keep_alive

    async def give_pending(self) -> None:
        """Hand the detached idle connections to the new generation; those it
        cannot take come back and are closed between requests, as before."""
        batch, self.to_give = self.to_give, []
        assert self.handoff is not None
        result = await self.handoff.give(batch)
        self.handed_over += result.placed
        for index in result.returned:
            self.start(batch[index], fresh=False, detachable=False)

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGTERM, self.draining.set)
        loop.add_signal_handler(signal.SIGINT, self.draining.set)
        if self.handoff is not None:
            try:
                await self.handoff.start_receiving(
                    self.adopt, room=lambda: max(0, MAX_CONNECTIONS - len(self.connections))
                )
            except (OSError, nodrop.NodropError) as exc:
                print(f"connection handoff unavailable: {exc}", file=sys.stderr)
                self.handoff = None
        for sock in self.listeners:
            self.start_accepting(sock)
        nodrop.ready(f"generation {self.generation} serving")
        try:
            await self.draining.wait()
            self.stop_accepting()
            nodrop.stopping(f"generation {self.generation} draining")
            if self.handoff is not None:
                # Connections still on their way to us are adopted (and handed on).
                await self.handoff.stop_receiving()
            await self.drain()
        finally:
            if self.handoff is not None:
                self.handoff.close()

    async def drain(self) -> None:
        deadline = loop_time() + IDLE_TIMEOUT + 5
        while (self.connections or self.to_give) and loop_time() < deadline:
            if self.to_give:
                await self.give_pending()
                continue
            self.give_wakeup.clear()
            waker = asyncio.ensure_future(self.give_wakeup.wait())
            await asyncio.wait(
                {*self.connections, waker},
                timeout=deadline - loop_time(),
                return_when=asyncio.FIRST_COMPLETED,
            )
            waker.cancel()


def loop_time() -> float:
    return asyncio.get_running_loop().time()


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
