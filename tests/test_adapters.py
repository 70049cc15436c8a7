"""nodrop.adapters: the drain helper, and the uvicorn/gunicorn/hypercorn adapters.

The drain helper is tested at the exact moment it exists for: a stop
request landing after the event loop accepted connections and before it
set them up. The server adapters are tested for what they add over the
plain command line, with the real servers under a real supervisor.
"""

from __future__ import annotations

import asyncio
import gc
import importlib.util
import socket
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from conftest import HERE
from nodrop.adapters.drain import drain, stop_accepting
from supervisor_harness import Start, Supervised, http_get

SERVERS = HERE / "children" / "servers"
PY = sys.executable
CLIENTS = 4


def needs(module: str) -> pytest.MarkDecorator:
    return pytest.mark.skipif(
        importlib.util.find_spec(module) is None,
        reason=f"python package {module} is not installed (pip install -e '.[test]')",
    )


# -- drain ------------------------------------------------------------------------


class AcceptHookSocket(socket.socket):
    """A listening socket that schedules a callback right after an accept().

    asyncio accepts in a reader callback and sets each connection up in a
    task one loop iteration later; ``on_accept`` runs between the two, where
    a SIGTERM handler can land in real life.
    """

    on_accept: Callable[[], None] | None = None

    def accept(self) -> tuple[socket.socket, Any]:
        conn, addr = super().accept()
        callback, self.on_accept = self.on_accept, None
        if callback is not None:
            asyncio.get_running_loop().call_soon(callback)
        return conn, addr


async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    await reader.readline()
    writer.write(b"answered\n")
    await writer.drain()
    writer.close()
    await writer.wait_closed()


def read_answer(sock: socket.socket) -> str:
    try:
        data = sock.recv(64)
    except ConnectionResetError:
        return "reset"
    except TimeoutError:
        return "timeout"
    return data.decode().strip() or "eof"


async def stop_right_after_accept(stop: Callable[[asyncio.Server], Any]) -> list[str]:
    """Queue clients, let the loop accept them all, stop at that instant."""
    loop = asyncio.get_running_loop()
    with AcceptHookSocket(socket.AF_INET, socket.SOCK_STREAM) as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(16)
        clients = []
        try:
            for _ in range(CLIENTS):
                client = socket.create_connection(listener.getsockname(), timeout=2)
                client.sendall(b"ping\n")
                clients.append(client)
            stopped = loop.create_future()

            def on_accept() -> None:
                result = stop(server)
                if asyncio.iscoroutine(result):
                    task = loop.create_task(result)
                    task.add_done_callback(lambda _: stopped.set_result(None))
                else:
                    stopped.set_result(None)

            listener.on_accept = on_accept
            server = await asyncio.start_server(handle, sock=listener)
            await asyncio.wait_for(stopped, 5)
            # The scenario, not a wait for an event: let the loop run what it
            # does after a stop (set-up tasks failing on 3.11), then collect a
            # connection it dropped, so that it is closed now, not later.
            await asyncio.sleep(0.05)
            gc.collect()
            return list(await asyncio.gather(*(asyncio.to_thread(read_answer, c) for c in clients)))
        finally:
            for client in clients:
                client.close()


def test_drain_answers_connections_accepted_just_before_the_stop() -> None:
    answers = asyncio.run(stop_right_after_accept(lambda server: drain(server, timeout=5)))
    assert answers == ["answered"] * CLIENTS


@pytest.mark.skipif(sys.version_info >= (3, 12), reason="the reset is Python 3.11's")
@pytest.mark.filterwarnings("ignore::ResourceWarning")
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_plain_close_at_that_instant_resets_them() -> None:
    # Why drain() exists: Server.close() there fails the connections' set-up.
    answers = asyncio.run(stop_right_after_accept(lambda server: server.close()))
    assert "answered" not in answers, answers


def test_stop_accepting_leaves_queued_connections_in_the_kernel_queue() -> None:
    async def scenario() -> tuple[int, str]:
        with socket.socket() as listener:
            listener.bind(("127.0.0.1", 0))
            listener.listen(16)
            given = listener.dup()  # the server's own copy, closed by server.close()
            server = await asyncio.start_server(handle, sock=given)
            await stop_accepting([given])  # by socket, as for aiohttp's SockSite
            with socket.create_connection(listener.getsockname(), timeout=2) as client:
                client.sendall(b"ping\n")
                await asyncio.sleep(0.1)  # the scenario: time the loop would take to accept it
                server.close()
                # Nobody took it: another process sharing the socket would.
                listener.setblocking(False)
                conn, _ = listener.accept()
                with conn:
                    conn.setblocking(True)
                    return server.is_serving(), conn.recv(16).decode()

    serving, request = asyncio.run(scenario())
    assert not serving
    assert request == "ping\n"


@pytest.fixture(scope="module")
def uvloop_warmed_up() -> None:
    """uvloop opens a pipe, once per process, with its first loop: open it
    before the fd-leak check looks."""
    uvloop = pytest.importorskip("uvloop")
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(asyncio.sleep(0))


@pytest.mark.usefixtures("uvloop_warmed_up")
def test_stop_accepting_takes_a_uvloop_server() -> None:
    """uvloop's Server is no asyncio.AbstractServer and is not iterable: it
    was once a TypeError on every drain, which aborted uvicorn's shutdown."""
    uvloop = pytest.importorskip("uvloop")

    async def scenario() -> bool:
        server = await asyncio.get_running_loop().create_server(asyncio.Protocol, "127.0.0.1", 0)
        assert not isinstance(server, asyncio.AbstractServer)
        await stop_accepting(server)
        server.close()
        await server.wait_closed()
        return True

    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        assert runner.run(scenario())


def test_drain_reports_a_connection_that_outlives_the_timeout() -> None:
    async def scenario() -> bool:
        held: list[asyncio.Task[Any]] = []
        connected = asyncio.Event()

        async def hold(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            task = asyncio.current_task()
            assert task is not None
            held.append(task)
            connected.set()
            try:
                await asyncio.sleep(10)  # outlives the drain timeout; cancelled below
            finally:
                writer.close()

        server = await asyncio.start_server(hold, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        _reader, writer = await asyncio.open_connection("127.0.0.1", port)
        await asyncio.wait_for(connected.wait(), 5)  # the server has it
        try:
            return await drain(server, timeout=0.2)
        finally:
            writer.close()
            await writer.wait_closed()
            for task in held:
                task.cancel()
            await asyncio.gather(*held, return_exceptions=True)

    started = time.monotonic()
    assert asyncio.run(scenario()) is False
    assert time.monotonic() - started < 5


# -- server adapters under a real supervisor ------------------------------------------


@pytest.fixture
def supervised(supervise: Start) -> Callable[..., Supervised]:
    """``supervise`` with the test servers' directory on PYTHONPATH."""

    def _start(*args: str, **kwargs: Any) -> Supervised:
        env = {"PYTHONPATH": ":".join([str(SERVERS), *sys.path])}
        env.update(kwargs.pop("env", {}))
        return supervise(*args, env=env, **kwargs)

    return _start


def write_config(path: Path, command: list[str], version: str, **env: str) -> None:
    lines = [
        "command = [" + ", ".join(f'"{c}"' for c in command) + "]",
        'listen = ["tcp://127.0.0.1:0"]',  # the port picked at start is kept on reload
        "ready_timeout = 15",
        "ready_grace = 0.5",
        "[env]",
        f'APP_VERSION = "{version}"',
        *(f'{k} = "{v}"' for k, v in env.items()),
    ]
    path.write_text("\n".join(lines) + "\n")


UVICORN = [PY, "-m", "nodrop.adapters.uvicorn", "asgi_versions:app", "--log-level", "warning"]
HYPERCORN = [PY, "-m", "nodrop.adapters.hypercorn", "asgi_versions:app"]
GUNICORN = [PY, "-m", "gunicorn", "--log-level", "warning", "wsgi_versions:app"]
GUNICORN_ADAPTED = [*GUNICORN[:3], "-c", "python:nodrop.adapters.gunicorn", *GUNICORN[3:]]


@needs("uvicorn")
def test_uvicorn_adapter_rejects_what_nodrop_owns() -> None:
    from nodrop.adapters.uvicorn import config_from_argv

    for option in (["--port", "9000"], ["--fd", "3"], ["--workers", "2"]):
        with pytest.raises(SystemExit, match="nodrop passes the listening sockets"):
            config_from_argv(["app:app", *option])
    config = config_from_argv(["app:app", "--log-level", "warning", "--no-access-log"])
    assert (config.app, config.log_level, config.access_log) == ("app:app", "warning", False)


@needs("hypercorn")
def test_hypercorn_adapter_needs_inherited_sockets(monkeypatch: pytest.MonkeyPatch) -> None:
    from nodrop.adapters.hypercorn import main

    monkeypatch.delenv("LISTEN_PID", raising=False)
    with pytest.raises(SystemExit, match="no LISTEN_FDS"):
        main(["app:app"])


@pytest.mark.parametrize(
    "command",
    [pytest.param(UVICORN, marks=needs("uvicorn"), id="uvicorn"),
     pytest.param(HYPERCORN, marks=needs("hypercorn"), id="hypercorn")],
)  # fmt: skip
def test_asgi_adapter_says_ready_after_startup_and_rolls_back_a_failing_one(
    supervised: Callable[..., Supervised], tmp_path: Path, command: list[str]
) -> None:
    cfg = tmp_path / "nodrop.toml"
    write_config(cfg, command, "good", STARTUP_SECONDS="0.8")
    started = time.monotonic()
    sup = supervised("--config", str(cfg), command=[])
    assert time.monotonic() - started >= 0.8, "READY=1 before the app's start-up completed"
    port = sup.port()
    assert http_get(port) == "version=good"
    write_config(cfg, command, "broken-start")
    answer = sup.reload()
    assert not answer["ok"], answer
    assert "rolled back" in answer["message"]
    assert http_get(port) == "version=good"
    assert sup.stop() == 0


@needs("gunicorn")
@pytest.mark.parametrize(
    ("command", "reload_ok"),
    [(GUNICORN_ADAPTED, False), (GUNICORN, True)],
    ids=["with-adapter-rolls-back", "plain-takes-it-as-ready"],
)
def test_gunicorn_version_that_fails_to_import(
    supervised: Callable[..., Supervised], tmp_path: Path, command: list[str], reload_ok: bool
) -> None:
    cfg = tmp_path / "nodrop.toml"
    write_config(cfg, command, "good")
    sup = supervised("--config", str(cfg), command=[])
    port = sup.port()
    assert http_get(port) == "version=good"
    write_config(cfg, command, "broken-import", IMPORT_SECONDS="1")
    answer = sup.reload()
    # Plain gunicorn says READY=1 before its workers import the app: the
    # broken version is taken as ready and the good one drained -- it then
    # dies a second later. The adapter's READY=1 comes from a worker that
    # imported the app, so the broken version is rolled back.
    assert answer["ok"] is reload_ok, answer
    if not reload_ok:
        assert http_get(port) == "version=good"
    assert sup.stop() == 0
