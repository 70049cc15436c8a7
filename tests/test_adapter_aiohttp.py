"""aiohttp under ``nodrop run``: reloads under strict clients fail nothing.

The aiohttp version of the realistic app (``children/servers/
stack_aiohttp.py``: ``on_startup`` takes 1 s) runs under ``python -m
nodrop.adapters.aiohttp stack_aiohttp:create_app`` on the asyncio and the
uvloop event loops, under the clients of ``children/servers/
stack_clients.py`` (see ``test_adapter_hypercorn.py``).

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
    any(importlib.util.find_spec(m) is None for m in ("aiohttp", "websockets")),
    reason="aiohttp and websockets are test dependencies (pip install -e '.[test]')",
)

LOOPS = [
    pytest.param("asyncio", id="asyncio"),
    pytest.param(
        "uvloop",
        id="uvloop",
        marks=pytest.mark.skipif(
            importlib.util.find_spec("uvloop") is None, reason="uvloop is not installed"
        ),
    ),
]


def aiohttp_command(loop: str, *extra: str) -> list[str]:
    return [
        PY, "-m", "nodrop.adapters.aiohttp", "stack_aiohttp:create_app",
        "--loop", loop, "--keepalive-timeout", "5", *extra,
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


@pytest.mark.slow
@pytest.mark.parametrize("loop", LOOPS)
def test_reloads_under_every_client_fail_nothing(
    supervised: Callable[..., Supervised], tmp_path: Path, loop: str
) -> None:
    if shutil.which("wrk") is None:
        pytest.skip("wrk is not installed (apt-get install wrk)")
    cfg = tmp_path / "nodrop.toml"
    write_config(cfg, aiohttp_command(loop), "good", workers=2)
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
@pytest.mark.parametrize("loop", LOOPS)
def test_a_broken_version_is_rolled_back_with_its_reason(
    supervised: Callable[..., Supervised], tmp_path: Path, loop: str, version: str
) -> None:
    cfg = tmp_path / "nodrop.toml"
    command = aiohttp_command(loop)
    write_config(cfg, command, "good")
    started = time.monotonic()
    sup = supervised("--config", str(cfg), command=[])
    assert time.monotonic() - started >= 1.0, "READY=1 before on_startup completed"
    port = sup.port()
    write_config(cfg, command, version)
    with HttpClients(port, 4, max_gap=0.2) as load:
        time.sleep(0.5)
        result = sup.cli("reload")
        time.sleep(0.5)
    assert result.returncode == 1, (result.stdout, result.stderr)
    assert "reload failed" in result.stdout, result.stdout
    reason = "the database is unreachable" if version == "broken-start" else "cannot be imported"
    assert reason in result.stdout, result.stdout
    assert load.tally.failures == [], load.tally.summary()
    assert load.tally.ok > 5
    assert sup.stop() == 0
