"""What ``nodrop.adapters.aiohttp_internals`` relies on, checked against the
installed aiohttp: an upgrade that changes it fails here, loudly.

Also aiohttp's own shutdown behaviour the adapter exists for, the byte
accounting that decides whether a connection may move, and the
detach/adopt round trip on real sockets (without a broker).
"""

from __future__ import annotations

import asyncio
import socket

import pytest

aiohttp = pytest.importorskip("aiohttp")

from aiohttp import web  # noqa: E402

from nodrop.adapters.aiohttp import Worker  # noqa: E402
from nodrop.adapters.aiohttp_internals import (  # noqa: E402
    TESTED_VERSIONS,
    _body_length,
    check_internals,
)

# uvloop's once-a-process pipe is open before the fd-leak check looks.
pytestmark = pytest.mark.usefixtures("uvloop_warmed_up")


def test_the_installed_aiohttp_is_the_one_the_module_was_written_for() -> None:
    problems = check_internals()
    assert problems == [], (
        f"nodrop.adapters.aiohttp_internals relies on aiohttp {TESTED_VERSIONS}: "
        f"{problems}. Re-read aiohttp's web_protocol.RequestHandler, adapt the module, "
        "re-run tests/test_adapter_aiohttp*.py and tests/test_adapter_handoff.py -k aiohttp, "
        "then update TESTED_VERSIONS."
    )


@pytest.mark.parametrize(
    ("head", "length"),
    [
        (b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", 0),
        (b"POST / HTTP/1.1\r\nContent-Length: 12\r\n\r\n", 12),
        (b"POST / HTTP/1.1\r\ncontent-length:  7 \r\n\r\n", 7),
        (b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n", None),
        (b"POST / HTTP/1.1\r\nContent-Length: x\r\n\r\n", None),
        (b"POST / HTTP/1.1\r\nContent-Length: -1\r\n\r\n", None),
    ],
)
def test_body_length_from_a_request_head(head: bytes, length: int | None) -> None:
    assert _body_length(head) == length


async def hello(request: web.Request) -> web.Response:
    return web.Response(text=request.path)


def make_app() -> web.Application:
    app = web.Application()
    app.router.add_get("/{name}", hello)
    return app


GET = b"GET %s HTTP/1.1\r\nHost: x\r\n\r\n"


async def read_response(reader: asyncio.StreamReader) -> tuple[bytes, bytes]:
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    length = int(head.lower().split(b"content-length:")[1].split(b"\r\n")[0])
    return head, await asyncio.wait_for(reader.readexactly(length), 5)


def listener() -> socket.socket:
    sock = socket.create_server(("127.0.0.1", 0))
    sock.setblocking(False)
    return sock


def test_plain_aiohttp_cleanup_closes_idle_keepalive_connections() -> None:
    """Why the adapter exists: ``runner.cleanup()`` closes an idle kept-alive
    connection at once; a client's next request would meet the close."""

    async def scenario() -> bytes:
        runner = web.AppRunner(make_app(), access_log=None)
        await runner.setup()
        sock = listener()
        await web.SockSite(runner, sock).start()
        reader, writer = await asyncio.open_connection("127.0.0.1", sock.getsockname()[1])
        writer.write(GET % b"/a")
        head, _ = await read_response(reader)
        assert b"close" not in head.lower()
        await runner.cleanup()
        after = await asyncio.wait_for(reader.read(), 5)
        writer.close()
        sock.close()
        return after

    assert asyncio.run(scenario()) == b""


@pytest.mark.parametrize("loop_name", ["asyncio", "uvloop"])
def test_a_detached_connection_moves_with_what_was_read_of_its_next_request(
    loop_name: str,
) -> None:
    if loop_name == "uvloop":
        uvloop = pytest.importorskip("uvloop")

    async def scenario() -> tuple[bytes, bytes, bytes, bool]:
        old_sock, new_sock = listener(), listener()
        old = Worker(make_app(), [old_sock], access_log=None)
        new = Worker(make_app(), [new_sock], access_log=None)
        for worker in (old, new):
            await worker.runner.setup()
            worker.acceptor.start()
        reader, writer = await asyncio.open_connection("127.0.0.1", old_sock.getsockname()[1])
        writer.write(GET % b"/first")
        _, first = await read_response(reader)
        writer.write(b"GET /sec")  # half a request: aiohttp's parser holds it
        await writer.drain()
        for _ in range(500):
            (conn,) = old.tracked
            if conn.unparsed:
                break
            await asyncio.sleep(0.01)
        prefix = conn.handoff_prefix()
        assert prefix is not None
        new.acceptor.adopt(conn.detach(), prefix)  # what the broker does, in one process
        writer.write(b"ond HTTP/1.1\r\nHost: x\r\n\r\n")
        _, second = await read_response(reader)
        writer.write(b"GET /third HTTP/1.1\r\nHost: x\r\n\r\nGET /fourth")  # pipelined
        _, third = await read_response(reader)
        await asyncio.sleep(0.05)
        (adopted,) = new.tracked
        pipelined_can_move = adopted.handoff_prefix() is not None
        writer.close()
        for worker in (old, new):
            worker.acceptor.stop()
            await worker.runner.cleanup()
        old_sock.close()
        new_sock.close()
        return first + second, prefix, third, pipelined_can_move

    if loop_name == "uvloop":
        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
            answers, prefix, third, pipelined_can_move = runner.run(scenario())
    else:
        answers, prefix, third, pipelined_can_move = asyncio.run(scenario())
    assert (answers, prefix, third) == (b"/first/second", b"GET /sec", b"/third")
    # Behind a pipelined request the parser's state is unknown: it stays.
    assert not pipelined_can_move
