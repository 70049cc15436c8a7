"""gunicorn 27 under nodrop: each generation's arbiter gets its own control
socket (gunicornc), instead of two generations sharing $XDG_RUNTIME_DIR/
gunicorn.ctl -- where the new arbiter unlinks the old one's and the old one's
exit then unlinks the new one's."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import HERE, wait_for
from supervisor_harness import Start, http_get

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(importlib.util.find_spec("gunicorn") is None, reason="no gunicorn"),
]


def test_each_generation_has_its_own_gunicorn_control_socket(
    supervise: Start, tmp_path: Path
) -> None:
    runtime = tmp_path / "xdg"
    runtime.mkdir(mode=0o700)
    gunicorn = str(Path(sys.executable).parent / "gunicorn")
    sup = supervise(
        "--listen", "tcp://127.0.0.1:0", "--ready-grace", "0",
        command=[gunicorn, "-c", "python:nodrop.adapters.gunicorn", "--chdir",
                 str(HERE.parent / "examples" / "gunicorn"), "app:app"],
        env={"XDG_RUNTIME_DIR": str(runtime)},
    )  # fmt: skip
    pid = sup.proc.pid
    first = runtime / f"gunicorn-nodrop-{pid}-g1.ctl"
    wait_for(first.exists, timeout=30, what="generation 1's control socket")
    assert not (runtime / "gunicorn.ctl").exists()
    assert sup.reload(wait="drained")["ok"]
    second = runtime / f"gunicorn-nodrop-{pid}-g2.ctl"
    wait_for(second.exists, timeout=30, what="generation 2's control socket")
    # The old arbiter removed its own socket on exit, and only its own.
    wait_for(lambda: not first.exists(), timeout=30, what="generation 1's socket to go")
    assert second.exists()
    assert http_get(sup.port())
    gunicornc = Path(sys.executable).parent / "gunicornc"
    if gunicornc.exists():
        done = subprocess.run(
            [str(gunicornc), "-s", str(second), "-c", "show workers"],
            capture_output=True, text=True, timeout=30, check=False,
            env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"},
        )  # fmt: skip
        assert done.returncode == 0, done.stdout + done.stderr
    assert sup.stop() == 0
