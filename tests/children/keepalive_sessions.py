"""A long-lived-session server for the connection handoff tests.

Two listeners from ``nodrop run`` (``LISTEN_FDNAMES``): ``line`` (a raw TCP
line protocol) and ``ws`` (WebSocket echo). Each connection has a session:
an id given on its first message and a counter of messages. On drain, idle
sessions are handed to the new generation with their state (JSON blob); the
new generation carries on counting. Every reply names the generation.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import signal
import socket

import nodrop
from nodrop.connhandoff import AsyncHandoff, Detached, read_or_detach
from nodrop.connhandoff.websocket import (
    OP_CLOSE,
    OP_PING,
    OP_PONG,
    OP_TEXT,
    encode_frame,
    handshake_key,
    handshake_response,
    read_frame,
)

GEN = os.environ.get("NODROP_GENERATION", "?")
ids = itertools.count(1)


class Server:
    def __init__(self) -> None:
        self.stop = asyncio.Event()
        self.tasks: set[asyncio.Task[None]] = set()
        self.to_give: list[tuple[socket.socket, bytes]] = []
        self.handoff = AsyncHandoff.from_environ()

    def spawn(self, sock: socket.socket, state: dict[str, object]) -> None:
        sock.setblocking(False)
        task = asyncio.get_running_loop().create_task(self.session(sock, state))
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    def adopt(self, sock: socket.socket, blob: bytes) -> None:
        self.spawn(sock, json.loads(blob))

    async def session(self, sock: socket.socket, state: dict[str, object]) -> None:
        reader, writer = await asyncio.open_connection(sock=sock)
        try:
            if state["proto"] == "ws" and not state.get("open"):
                head = await reader.readuntil(b"\r\n\r\n")
                writer.write(handshake_response(handshake_key(head)))
                state["open"] = True
            read = reader.readline if state["proto"] == "line" else lambda: read_frame(reader)
            while True:
                message = await read_or_detach(
                    reader, writer, read, stop=self.stop, detachable=self.handoff is not None
                )
                if isinstance(message, Detached):
                    self.to_give.append((message.sock, json.dumps(state).encode()))
                    return
                if message is None:
                    return
                if state["proto"] == "line":
                    assert isinstance(message, bytes)
                    if not message:
                        return
                    text = message.decode().strip()
                else:
                    assert isinstance(message, tuple)
                    _fin, op, payload = message
                    if op == OP_CLOSE:
                        writer.write(encode_frame(OP_CLOSE, payload[:2]))
                        return
                    if op == OP_PING:
                        writer.write(encode_frame(OP_PONG, payload))
                        continue
                    text = payload.decode()
                if "session" not in state:
                    state["session"] = f"{text}-{os.getpid()}-{next(ids)}"
                state["count"] = int(str(state.get("count", 0))) + 1
                reply = f"{text} session={state['session']} count={state['count']} gen={GEN}"
                if state["proto"] == "line":
                    writer.write(reply.encode() + b"\n")
                else:
                    writer.write(encode_frame(OP_TEXT, reply.encode()))
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError, nodrop.ProtocolError):
            return
        finally:
            writer.close()

    def accept(self, listener: socket.socket, proto: str) -> None:
        if self.stop.is_set():
            return
        for _ in range(64):
            try:
                conn, _ = listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            self.spawn(conn, {"proto": proto})

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGTERM, self.stop.set)
        if self.handoff is not None:
            await self.handoff.start_receiving(self.adopt)
        listeners = nodrop.listen_fds()
        for item in listeners:
            item.socket.setblocking(False)
            loop.add_reader(item.socket.fileno(), self.accept, item.socket, item.name)
        nodrop.ready()
        await self.stop.wait()
        for item in listeners:
            loop.remove_reader(item.socket.fileno())
        if self.handoff is not None:
            await self.handoff.stop_receiving()
        deadline = loop.time() + 10
        while (self.tasks or self.to_give) and loop.time() < deadline:
            if self.to_give:
                batch, self.to_give = self.to_give, []
                assert self.handoff is not None
                result = await self.handoff.give([s for s, _ in batch], [b for _, b in batch])
                for index in result.returned:
                    batch[index][0].close()
                continue
            await asyncio.wait(set(self.tasks), timeout=0.5)
        if self.handoff is not None:
            self.handoff.close()


if __name__ == "__main__":
    asyncio.run(Server().run())
