"""What ``nodrop.adapters.uvicorn_internals`` relies on, checked against the
installed uvicorn: an upgrade that changes it fails here, loudly.

Also the uvicorn behaviours the module exists for, measured on uvicorn's own
server, and nodrop's drain on the same scenario, for both of uvicorn's
HTTP/1.1 protocols on both event loops.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Callable, Coroutine
from typing import Any, cast

import pytest

uvicorn = pytest.importorskip("uvicorn")

from nodrop.adapters.uvicorn_internals import (  # noqa: E402
    TESTED_VERSIONS,
    DrainingMixin,
    NodropServer,
    check_internals,
)
from nodrop.connhandoff import AsyncHandoff  # noqa: E402
from nodrop.connhandoff.client import GiveResult  # noqa: E402

# uvloop's once-a-process pipe is open before the fd-leak check looks.
pytestmark = pytest.mark.usefixtures("uvloop_warmed_up")


def test_the_installed_uvicorn_is_the_one_the_module_was_written_for() -> None:
    problems = check_internals()
    assert problems == [], (
        f"nodrop.adapters.uvicorn_internals relies on uvicorn {TESTED_VERSIONS}: "
        f"{problems}. Re-read uvicorn's server.py and protocols/http/*_impl.py, adapt "
        "the module, re-run tests/test_adapter_uvicorn*.py, tests/test_adapter_handoff.py -k "
        "uvicorn and the uvicorn cells of tests/test_stacks.py, then update TESTED_VERSIONS."
    )


def test_the_installed_uvicorn_workers_have_what_the_gunicorn_runner_uses() -> None:
    pytest.importorskip("gunicorn")
    from nodrop.adapters import gunicorn_uvicorn_internals

    problems = gunicorn_uvicorn_internals.check_internals()
    assert problems == [], (
        f"nodrop.adapters.gunicorn_uvicorn_internals relies on these: {problems}. Re-read "
        "uvicorn_worker's and uvicorn.workers' UvicornWorker, adapt the module, re-run the "
        "gunicorn cells of tests/test_stacks.py and tests/test_adapter_handoff.py."
    )


class _BareWorker:  # what an upgrade that renamed the hook would look like
    CONFIG_KWARGS: dict[str, Any] = {}


def test_the_gunicorn_runner_check_fails_loudly_without_the_hook(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    pytest.importorskip("gunicorn")
    import types

    from nodrop.adapters import gunicorn_uvicorn_internals

    fake = types.ModuleType("fake_uvicorn_worker")
    fake.UvicornWorker = _BareWorker  # type: ignore[attr-defined]
    monkeypatch.setitem(__import__("sys").modules, "fake_uvicorn_worker", fake)
    monkeypatch.setattr(
        gunicorn_uvicorn_internals, "WORKER_CLASSES", ("fake_uvicorn_worker.UvicornWorker",)
    )
    assert gunicorn_uvicorn_internals.check_internals() == [
        "fake_uvicorn_worker.UvicornWorker has no _install_sigquit_handler()"
    ]


async def app(scope: Any, receive: Any, send: Any) -> None:
    if scope["type"] != "http":
        return
    body = scope["path"].encode()
    await send(
        {
            "type": "http.response.start",
            "status": 200,
            "headers": [(b"content-length", b"%d" % len(body))],
        }
    )
    if scope["path"] == "/stream":  # the response has started: its body takes 0.3 s
        await asyncio.sleep(0.3)
    await send({"type": "http.response.body", "body": body})


GET = b"GET %s HTTP/1.1\r\nHost: x\r\n\r\n"


async def read_response(reader: asyncio.StreamReader) -> tuple[bytes, bytes]:
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    length = int(head.lower().split(b"content-length:")[1].split(b"\r\n")[0])
    return head, await asyncio.wait_for(reader.readexactly(length), 5)


def config(http: str, loop: str) -> Any:
    return uvicorn.Config(app, http=http, loop=loop, lifespan="off", log_level="warning")


Scenario = Callable[[Any], Coroutine[Any, Any, Any]]


def run_on(loop: str, scenario: Scenario, server: Any) -> Any:
    if loop == "uvloop":
        uvloop = pytest.importorskip("uvloop")
        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
            return runner.run(scenario(server))
    return asyncio.run(scenario(server))


async def idle_and_busy(server: Any) -> tuple[bytes, bytes, bytes, bytes]:
    """One idle keep-alive connection and one whose response has started (its
    body still to come) when the server is told to stop. Returns the
    in-flight response's head, then for each connection what a next request
    got (b"" if the connection was closed)."""
    sock = socket.create_server(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    serving = asyncio.ensure_future(server.serve(sockets=[sock]))
    # The socket listens already: the first request waits in its queue until
    # the server has started.
    idle_reader, idle_writer = await asyncio.open_connection("127.0.0.1", port)
    idle_writer.write(GET % b"/fast")
    await read_response(idle_reader)
    busy_reader, busy_writer = await asyncio.open_connection("127.0.0.1", port)
    busy_writer.write(GET % b"/stream")
    await asyncio.sleep(0.1)  # /stream is in flight
    server.should_exit = True
    head, _ = await read_response(busy_reader)
    await asyncio.sleep(0.3)  # past uvicorn's own 0.1 s wait in shutdown()
    answers = []
    for reader, writer in ((busy_reader, busy_writer), (idle_reader, idle_writer)):
        try:
            writer.write(GET % b"/next")
            next_head, _ = await read_response(reader)
        except (ConnectionError, asyncio.IncompleteReadError):
            next_head = b""
        answers.append(next_head)
    server.should_exit = True
    for writer in (idle_writer, busy_writer):
        writer.close()
    await asyncio.wait_for(serving, 15)
    sock.close()
    return head, answers[0], answers[1], b""


@pytest.mark.parametrize(("http", "loop"), [("h11", "asyncio"), ("httptools", "uvloop")])
def test_plain_uvicorn_shutdown_fails_kept_alive_clients(http: str, loop: str) -> None:
    """Why the module exists: uvicorn's own shutdown closes an idle
    keep-alive connection, and ends one after its in-flight response."""
    server = uvicorn.Server(config(http, loop))
    head, after_busy, after_idle, _ = run_on(loop, idle_and_busy, server)
    assert after_busy == b"", "uvicorn kept the in-flight response's connection open"
    assert after_idle == b"", "uvicorn kept the idle keep-alive connection open"
    if http == "h11":
        assert b"connection: close" not in head.lower()


@pytest.mark.parametrize(
    ("http", "loop"),
    [("h11", "asyncio"), ("h11", "uvloop"), ("httptools", "asyncio"), ("httptools", "uvloop")],
)
def test_nodrop_drain_answers_the_next_request_on_every_kept_alive_connection(
    http: str, loop: str
) -> None:
    """Draining, a connection idle at the time, or whose response had started,
    is not closed: it answers its next request, with ``Connection: close``."""
    server = NodropServer(config(http, loop))
    head, after_busy, after_idle, _ = run_on(loop, idle_and_busy, server)
    assert head.startswith(b"HTTP/1.1 200")
    for after in (after_busy, after_idle):
        assert after.startswith(b"HTTP/1.1 200"), after
        assert b"connection: close" in after.lower()


async def started(server: Any) -> socket.socket:
    sock = socket.create_server(("127.0.0.1", 0))
    server.config.load()
    server.lifespan = server.config.lifespan_class(server.config)
    await server.startup(sockets=[sock])
    return sock


@pytest.mark.parametrize(
    ("http", "loop", "half"),
    [("h11", "asyncio", b"GET /sec"), ("h11", "uvloop", b"GET /sec"), ("httptools", "uvloop", b"")],
)
def test_a_detached_connection_moves_with_what_was_read_of_its_next_request(
    http: str, loop: str, half: bytes
) -> None:
    """An idle connection (h11: with half a request read) is taken out of one
    server and adopted by another: the client sees one connection, one answer
    per request. (httptools keeps half a request out of reach: none is sent.)"""

    async def scenario(_: Any) -> tuple[bytes, bytes, bytes, int]:
        old, new = NodropServer(config(http, loop)), NodropServer(config(http, loop))
        old_sock, new_sock = await started(old), await started(new)
        reader, writer = await asyncio.open_connection("127.0.0.1", old_sock.getsockname()[1])
        writer.write(GET % b"/first")
        _, first = await read_response(reader)
        if half:
            writer.write(half)  # h11 reads it and waits for the rest
            await writer.drain()
        (conn,) = old.server_state.connections
        assert isinstance(conn, DrainingMixin)
        assert new.acceptor is not None
        for _ in range(500):
            if conn.idle_prefix() == half:
                break
            await asyncio.sleep(0.01)
        prefix = conn.idle_prefix()
        assert prefix is not None
        new.adopt(conn.detach(), prefix)  # what the broker does, in one process
        await new.acceptor.settle()
        (adopted,) = new.server_state.connections
        assert isinstance(adopted, DrainingMixin)
        if not half:  # kept alive before: its keep-alive timeout runs here too
            assert adopted.timeout_keep_alive_task is not None
        writer.write(b"GET /second HTTP/1.1\r\nHost: x\r\n\r\n"[len(half) :])
        _, second = await read_response(reader)
        served_by_new = len(new.server_state.connections)
        writer.close()
        for server in (old, new):
            server.force_exit = True
            await server.shutdown()
        old_sock.close()
        new_sock.close()
        return first, prefix, second, served_by_new

    first, prefix, second, served_by_new = run_on(loop, scenario, None)
    assert (first, prefix, second, served_by_new) == (b"/first", half, b"/second", 1)


class SlowBroker:
    """Stands in for the broker in one process (the give side of
    ``AsyncHandoff``): each give waits until ``release`` is set, then places
    the connections in ``new`` as the broker would."""

    def __init__(self, new: Any) -> None:
        self.new = new
        self.giving = asyncio.Event()
        self.release = asyncio.Event()
        self.given = 0

    async def start_receiving(self, adopt: Any, **_: Any) -> None:
        """The old server receives nothing here."""

    async def stop_receiving(self) -> None:
        """Nothing to stop."""

    def close(self) -> None:
        """Nothing to close."""

    async def give(self, conns: Any, states: Any = ()) -> GiveResult:
        self.giving.set()
        await self.release.wait()
        for sock, state in zip(conns, states or [b""] * len(conns), strict=True):
            self.new.adopt(sock, state)
        self.given += len(conns)
        return GiveResult(placed=len(conns))


@pytest.mark.parametrize(("http", "loop"), [("h11", "asyncio"), ("httptools", "uvloop")])
def test_a_connection_that_turns_idle_while_a_batch_is_given_is_given_too(
    http: str, loop: str
) -> None:
    """Issue 12's rare failed request under load: a response that ended while
    the broker was placing a batch took its connection out of uvicorn, but
    the drain, seeing no connection left, ended with that one never given:
    it closed with the old process. Here the last connection turns idle
    while the first batch is held: both must reach the new server."""

    async def scenario(_: Any) -> tuple[list[bytes], int, int]:
        hold = asyncio.Event()

        async def holding(scope: Any, receive: Any, send: Any) -> None:
            if scope["type"] != "http":
                return
            body = scope["path"].encode()
            headers = [(b"content-length", b"%d" % len(body))]
            await send({"type": "http.response.start", "status": 200, "headers": headers})
            if scope["path"] == "/hold":
                await hold.wait()
            await send({"type": "http.response.body", "body": body})

        def cfg() -> Any:
            return uvicorn.Config(
                holding, http=http, loop=loop, lifespan="off", log_level="warning"
            )

        new = NodropServer(cfg())
        broker = SlowBroker(new)
        old = NodropServer(cfg(), handoff=cast(AsyncHandoff, broker))
        old_sock, new_sock = await started(old), await started(new)
        port = old_sock.getsockname()[1]
        idle_reader, idle_writer = await asyncio.open_connection("127.0.0.1", port)
        idle_writer.write(GET % b"/fast")
        await read_response(idle_reader)
        busy_reader, busy_writer = await asyncio.open_connection("127.0.0.1", port)
        busy_writer.write(GET % b"/hold")
        await asyncio.wait_for(busy_reader.readuntil(b"\r\n\r\n"), 5)  # its response started
        draining = asyncio.ensure_future(old.shutdown())
        await asyncio.wait_for(broker.giving.wait(), 5)  # the idle one is on its way
        hold.set()  # meanwhile the busy one's response ends: it turns idle
        await asyncio.wait_for(busy_reader.readexactly(len(b"/hold")), 5)
        broker.release.set()
        await asyncio.wait_for(draining, 15)
        answers = []
        for reader, writer in ((idle_reader, idle_writer), (busy_reader, busy_writer)):
            writer.write(GET % b"/next")
            try:
                _, body = await read_response(reader)
            except (TimeoutError, ConnectionError, asyncio.IncompleteReadError) as exc:
                body = repr(exc).encode()
            answers.append(body)
            writer.close()
        new.force_exit = True
        await new.shutdown()
        old_sock.close()
        new_sock.close()
        return answers, broker.given, old.handed_over

    answers, given, handed_over = run_on(loop, scenario, None)
    assert (answers, given, handed_over) == ([b"/next", b"/next"], 2, 2)
