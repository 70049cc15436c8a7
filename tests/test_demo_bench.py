"""`nodrop demo` and `nodrop bench`, run as a user runs them."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from conftest import Procs
from nodrop.testing.waiting import wait_for
from supervisor_harness import Supervised, start


def nodrop(
    *args: str, cwd: Path | None = None, timeout: float = 120
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "nodrop", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=cwd,
        env=dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path)),
    )


def test_demo_reloads_under_load_and_drops_nothing(tmp_path: Path) -> None:
    report = tmp_path / "demo.html"
    done = nodrop("demo", "--duration", "4", "--reloads", "3", "--report", str(report), "--json")
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    result = json.loads(done.stdout)  # --json: one JSON document and nothing else
    assert result["failed"] == 0
    assert result["outcomes"]["ok"] > 500
    assert len(result["reloads"]) == 3
    assert all(r["ok"] for r in result["reloads"])
    assert all(r["old_exited"] is not None for r in result["reloads"])
    assert 'id="timeline"' in report.read_text()
    assert "no request failed across 3 reloads" in done.stderr


@pytest.fixture
def demo_app(procs: Procs, tmp_path: Path) -> Iterator[Supervised]:
    sup = start(
        procs,
        tmp_path,
        "--listen",
        "tcp://127.0.0.1:0",
        "--workers",
        "2",
        "--ready-grace",
        "0.05",
        command=[sys.executable, "-m", "nodrop.demo.app"],
    )
    yield sup
    sup.stop()
    sup.notify.close()


def test_bench_through_the_control_socket(demo_app: Supervised, tmp_path: Path) -> None:
    report = tmp_path / "r.html"
    done = nodrop(
        "bench",
        "--control",
        demo_app.control,
        "--duration",
        "3",
        "--reloads",
        "2",
        "--concurrency",
        "8",
        "--processes",
        "1",
        "--report",
        str(report),
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "failed per 10^6" in done.stdout
    assert "reload " in done.stdout
    assert report.exists()


def test_bench_with_a_reload_command_and_keepalive(demo_app: Supervised) -> None:
    done = nodrop(
        "bench",
        "--target",
        f"127.0.0.1:{demo_app.port()}",
        "--reload-cmd",
        f"kill -HUP {demo_app.proc.pid}",
        "--settle",
        "0.5",
        "--duration",
        "3",
        "--reloads",
        "2",
        "--mode",
        "keepalive",
        "--concurrency",
        "8",
        "--processes",
        "1",
        "--json",
    )
    result: dict[str, Any] = json.loads(done.stdout)
    assert result["outcomes"]["ok"] > 100
    assert len(result["reloads"]) == 2
    # `kill -HUP` returns before the reload it asks for is done.
    wait_for(
        lambda: demo_app.status()["active_generation"] == 3,
        what="the second SIGHUP's reload to finish",
    )


@pytest.mark.parametrize(
    ("args", "error"),
    [
        (["--target", "nowhere"], "expected HOST:PORT"),
        (
            ["--target", "127.0.0.1:1", "--reloads", "3"],
            "--reloads needs --control or --reload-cmd",
        ),
        ([], "give --target"),
    ],
)
def test_bench_bad_arguments(args: list[str], error: str) -> None:
    done = nodrop("bench", *args)
    assert done.returncode == 2
    assert error in done.stderr
