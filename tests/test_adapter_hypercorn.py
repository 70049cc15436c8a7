"""hypercorn under ``nodrop run``: reloads under strict clients fail nothing.

A Starlette app with a 1 s lifespan start-up (``children/servers/
stack_starlette.py``) runs under ``python -m nodrop.adapters.hypercorn``
with hypercorn's asyncio and uvloop workers. While reloads go through,
every client of ``children/servers/stack_clients.py`` runs at once:
``http.client`` keep-alive connections with idle gaps (no retries), ``wrk``
keep-alive and ``Connection: close`` over /fast, /slow, /stream and a 1 MB
POST /echo, and WebSocket echo sessions, which may only be cut with 1012.

CI runs 5 reloads per cell; ``NODROP_STACK_RELOADS=10`` runs the full form.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from conftest import HERE
from supervisor_harness import Start, Supervised

SERVERS = HERE / "children" / "servers"
sys.path.insert(0, str(SERVERS))

from stack_clients import HttpClients, reload_under_load  # noqa: E402

RELOADS = int(os.environ.get("NODROP_STACK_RELOADS", "5"))
PY = sys.executable

pytestmark = pytest.mark.skipif(
    any(importlib.util.find_spec(m) is None for m in ("hypercorn", "starlette", "websockets")),
    reason="hypercorn, starlette and websockets are test dependencies (pip install -e '.[test]')",
)


def hypercorn_command(worker_class: str) -> list[str]:
    return [
        PY, "-m", "nodrop.adapters.hypercorn", "stack_starlette:app",
        "--worker-class", worker_class,
    ]  # fmt: skip


def write_config(path: Path, command: list[str], version: str, workers: int = 1) -> None:
    quoted = ", ".join(f'"{part}"' for part in command)
    path.write_text(
        f"command = [{quoted}]\n"
        'listen = ["tcp://127.0.0.1:0"]\n'
        f"workers = {workers}\n"
        "ready_timeout = 20\nready_grace = 0.2\ndrain_timeout = 30\n"
        f'[env]\nAPP_VERSION = "{version}"\n'
    )


@pytest.fixture
def supervised(supervise: Start) -> Callable[..., Supervised]:
    def _start(*args: str, **kwargs: Any) -> Supervised:
        env = {"PYTHONPATH": ":".join([str(SERVERS), *sys.path])}
        env.update(kwargs.pop("env", {}))
        return supervise(*args, env=env, **kwargs)

    return _start


WORKERS = [
    pytest.param("asyncio", id="asyncio"),
    pytest.param(
        "uvloop",
        id="uvloop",
        marks=pytest.mark.skipif(
            importlib.util.find_spec("uvloop") is None, reason="uvloop is not installed"
        ),
    ),
]


@pytest.mark.slow
@pytest.mark.parametrize("worker_class", WORKERS)
def test_reloads_under_every_client_fail_nothing(
    supervised: Callable[..., Supervised], tmp_path: Path, worker_class: str
) -> None:
    if shutil.which("wrk") is None:
        pytest.skip("wrk is not installed (apt-get install wrk)")
    cfg = tmp_path / "nodrop.toml"
    write_config(cfg, hypercorn_command(worker_class), "good", workers=2)
    sup = supervised("--config", str(cfg), command=[])
    port = sup.port()
    report = reload_under_load(lambda: sup.reload(), port, RELOADS, tmp_path)
    print(report.describe())
    assert all(r.get("ok") for r in report.reloads), (report.reloads, sup.log()[-3000:])
    assert report.failed == 0, report.describe() + "\n" + sup.log()[-3000:]
    assert report.http.ok > 50
    assert report.ws is not None
    assert report.ws.ok > 20
    assert report.wrk_keepalive is not None
    assert report.wrk_keepalive.requests > 50
    assert report.wrk_close is not None
    assert report.wrk_close.requests > 50
    assert report.ws.closed_1012 > 0, "no WebSocket session was cut by a reload"
    assert sup.stop() == 0


@pytest.mark.slow
@pytest.mark.parametrize("version", ["broken-start", "broken-import"])
@pytest.mark.parametrize("worker_class", WORKERS)
def test_a_broken_version_is_rolled_back_with_its_reason(
    supervised: Callable[..., Supervised], tmp_path: Path, worker_class: str, version: str
) -> None:
    cfg = tmp_path / "nodrop.toml"
    command = hypercorn_command(worker_class)
    write_config(cfg, command, "good")
    started = time.monotonic()
    sup = supervised("--config", str(cfg), command=[])
    assert time.monotonic() - started >= 1.0, "READY=1 before the lifespan start-up completed"
    port = sup.port()
    write_config(cfg, command, version)
    with HttpClients(port, 4, max_gap=0.2) as load:
        time.sleep(0.5)
        result = sup.cli("reload")
        time.sleep(0.5)
    assert result.returncode == 1, (result.stdout, result.stderr)
    assert "rolled back" in result.stdout or "reload failed" in result.stdout, result.stdout
    reason = "the database is unreachable" if version == "broken-start" else "cannot be imported"
    assert reason in result.stdout, result.stdout
    assert load.tally.failures == [], load.tally.summary()
    assert load.tally.ok > 5
    assert sup.stop() == 0


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("httpx") is None, reason="httpx is not installed")
def test_http2_connections_are_sent_a_goaway(
    supervised: Callable[..., Supervised], tmp_path: Path
) -> None:
    """HTTP/2 (prior knowledge): the request in flight at the reload completes
    on the old generation; the client's next request goes to the new one,
    without an error (GOAWAY, not a closed connection)."""
    import concurrent.futures

    import httpx

    cfg = tmp_path / "nodrop.toml"
    write_config(cfg, hypercorn_command("asyncio"), "good")
    sup = supervised("--config", str(cfg), command=[], env={"STARTUP_SECONDS": "0.3"})
    url = f"http://127.0.0.1:{sup.port()}"
    with (
        httpx.Client(http1=False, http2=True, timeout=10) as client,
        concurrent.futures.ThreadPoolExecutor(1) as pool,
    ):
        before = client.get(f"{url}/fast")
        assert before.http_version == "HTTP/2"
        assert "gen=1 " in before.text
        in_flight = pool.submit(client.get, f"{url}/slow")
        time.sleep(0.1)
        assert sup.reload()["ok"]
        assert "gen=1 " in in_flight.result().text
        # Requests sent before the GOAWAY arrives are still the old one's.
        deadline = time.monotonic() + 10
        while "gen=2 " not in (after := client.get(f"{url}/fast")).text:
            assert "gen=1 " in after.text, after.text
            assert time.monotonic() < deadline, after.text
            time.sleep(0.05)
        assert after.http_version == "HTTP/2"
    assert sup.stop() == 0


def test_a_connection_the_client_reset_does_not_hold_up_the_drain(
    supervised: Callable[..., Supervised], tmp_path: Path
) -> None:
    """A kept-alive connection the client resets (wrk stopped with responses
    unread does this) leaves hypercorn's connection task waiting for its
    keep-alive timer, here 120 s: the reader holds the reset, never an EOF.
    The drain must see that the peer is gone and let the worker exit."""
    import socket
    import struct

    config = tmp_path / "hypercorn.toml"
    config.write_text("keep_alive_timeout = 120\n")
    sup = supervised(
        "--listen", "tcp://127.0.0.1:0", "--workers", "1", "--drain-timeout", "30",
        command=[*hypercorn_command("asyncio"), "--config", str(config)],
        env={"STARTUP_SECONDS": "0"},
    )  # fmt: skip
    conn = socket.create_connection(("127.0.0.1", sup.port()), timeout=10)
    conn.sendall(b"GET /fast HTTP/1.1\r\nHost: x\r\n\r\n")
    assert conn.recv(4096).startswith(b"HTTP/1.1 200")
    conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    conn.close()  # a reset, not a FIN
    started = time.monotonic()
    assert sup.reload(wait="drained")["ok"]
    took = time.monotonic() - started
    assert "drain timeout" not in sup.log(), sup.log()[-2000:]
    assert took < 15, f"the old generation took {took:.1f}s to exit (drain timeout 30 s)"
    assert sup.stop() == 0
