"""What ``nodrop.adapters.hypercorn_internals`` relies on, checked against the
installed hypercorn: an upgrade that changes it fails here, loudly.

Also the two hypercorn behaviours the adapter exists for, measured on
hypercorn's own worker, and the handoff's detach/adopt round trip on real
sockets (without a broker).
"""

from __future__ import annotations

import asyncio
import socket
from typing import Any

import pytest

hypercorn = pytest.importorskip("hypercorn")

from hypercorn.asyncio.run import worker_serve  # noqa: E402
from hypercorn.asyncio.worker_context import WorkerContext  # noqa: E402
from hypercorn.config import Config, Sockets  # noqa: E402
from hypercorn.utils import wrap_app  # noqa: E402

from nodrop.adapters.hypercorn_internals import (  # noqa: E402
    TESTED_VERSIONS,
    Worker,
    check_internals,
)

# uvloop's once-a-process pipe is open before the fd-leak check looks.
pytestmark = pytest.mark.usefixtures("uvloop_warmed_up")


def test_the_installed_hypercorn_is_the_one_the_module_was_written_for() -> None:
    problems = check_internals()
    assert problems == [], (
        f"nodrop.adapters.hypercorn_internals relies on hypercorn {TESTED_VERSIONS}: "
        f"{problems}. Re-read hypercorn's asyncio worker (run.py, tcp_server.py, "
        "protocol/h11.py), adapt the module, re-run tests/test_adapter_hypercorn*.py and "
        "tests/test_adapter_handoff.py -k hypercorn, then update TESTED_VERSIONS."
    )


async def app(scope: Any, receive: Any, send: Any) -> None:
    if scope["type"] != "http":
        return
    if scope["path"] == "/slow":
        await asyncio.sleep(0.3)
    body = scope["path"].encode()
    await send(
        {
            "type": "http.response.start",
            "status": 200,
            "headers": [(b"content-length", b"%d" % len(body))],
        }
    )
    await send({"type": "http.response.body", "body": body})


GET = b"GET %s HTTP/1.1\r\nHost: x\r\n\r\n"


async def read_response(reader: asyncio.StreamReader) -> tuple[bytes, bytes]:
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    length = int(head.lower().split(b"content-length:")[1].split(b"\r\n")[0])
    return head, await asyncio.wait_for(reader.readexactly(length), 5)


def listener() -> socket.socket:
    sock = socket.create_server(("127.0.0.1", 0))
    sock.setblocking(False)
    return sock


def test_plain_hypercorn_shutdown_fails_kept_alive_clients() -> None:
    """Why the adapter exists: at shutdown hypercorn's own worker closes an
    idle keep-alive connection (a client's next request would meet the
    close), and ends a connection after its in-flight response without
    ``Connection: close``."""

    async def scenario() -> tuple[bytes, bytes, bytes]:
        sock = listener()
        port = sock.getsockname()[1]
        stop = asyncio.Event()
        server = asyncio.ensure_future(
            worker_serve(
                wrap_app(app, 1 << 20, "asgi"),
                Config(),
                sockets=Sockets([], [sock], []),
                shutdown_trigger=stop.wait,
            )
        )
        idle_reader, idle_writer = await asyncio.open_connection("127.0.0.1", port)
        idle_writer.write(GET % b"/fast")
        await read_response(idle_reader)
        busy_reader, busy_writer = await asyncio.open_connection("127.0.0.1", port)
        busy_writer.write(GET % b"/slow")
        await asyncio.sleep(0.1)  # /slow is in flight
        stop.set()
        head, _ = await read_response(busy_reader)
        after_busy = await asyncio.wait_for(busy_reader.read(), 5)
        after_idle = await asyncio.wait_for(idle_reader.read(), 5)
        await asyncio.wait_for(server, 10)
        for writer in (idle_writer, busy_writer):
            writer.close()
        sock.close()
        return head, after_busy, after_idle

    head, after_busy, after_idle = asyncio.run(scenario())
    assert b"connection: close" not in head.lower()
    assert after_busy == b"", "the in-flight response's connection was closed"
    assert after_idle == b"", "the idle keep-alive connection was closed"


@pytest.mark.parametrize("loop_name", ["asyncio", "uvloop"])
def test_a_detached_connection_moves_with_what_was_read_of_its_next_request(
    loop_name: str,
) -> None:
    """An idle connection with half a request read is taken out of one worker
    and adopted by another: the client sees one connection, one answer."""
    if loop_name == "uvloop":
        uvloop = pytest.importorskip("uvloop")

    async def scenario() -> tuple[bytes, bytes, bytes]:
        old_sock, new_sock = listener(), listener()
        loop = asyncio.get_running_loop()
        old = Worker(wrap_app(app, 1 << 20, "asgi"), Config(), [old_sock])
        new = Worker(wrap_app(app, 1 << 20, "asgi"), Config(), [new_sock])
        for worker in (old, new):
            worker._loop = loop
            worker._context = WorkerContext(None)
            worker.acceptor.start()
        reader, writer = await asyncio.open_connection("127.0.0.1", old_sock.getsockname()[1])
        writer.write(GET % b"/first")
        _, first = await read_response(reader)
        writer.write(b"GET /sec")  # half a request: hypercorn reads it, h11 waits
        await writer.drain()
        for _ in range(500):
            (conn,) = old.connections.live
            if conn.idle_prefix():
                break
            await asyncio.sleep(0.01)
        assert old.connections.try_detach(conn)
        ((sock, prefix),) = old.connections.to_give
        new.acceptor.adopt(sock, prefix)  # what the broker does, in one process
        writer.write(b"ond HTTP/1.1\r\nHost: x\r\n\r\n")
        _, second = await read_response(reader)
        for worker in (old, new):
            worker.acceptor.stop()
            await worker._context.terminated.set()  # type: ignore[union-attr]
        writer.close()
        await asyncio.wait(old.connections.tasks | new.connections.tasks, timeout=5)
        old_sock.close()
        new_sock.close()
        return first, prefix, second

    if loop_name == "uvloop":
        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
            first, prefix, second = runner.run(scenario())
    else:
        first, prefix, second = asyncio.run(scenario())
    assert (first, prefix, second) == (b"/first", b"GET /sec", b"/second")
