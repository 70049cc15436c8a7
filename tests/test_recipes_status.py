"""What an operator reads: `nodrop status` wording, help texts, error messages."""

from __future__ import annotations

import subprocess
import sys
from typing import Any

import pytest

from nodrop.commands.status import format_status
from nodrop.errors import SpecError
from nodrop.listeners.spec import parse_spec

TRACEBACK = (
    "generation 3, worker 1 exited with status 1 before it was ready; rolled back, the old "
    "generation keeps serving\n  last lines of its stderr:\n    Traceback (most recent call "
    "last):\n    ImportError: boom"
)


def status(**over: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "name": "myapp",
        "pid": 10,
        "uptime": 5.0,
        "strategy": "inherit",
        "summary": "generation 2 serving with 1 worker(s)",
        "generations": [
            {"generation": 1, "state": "draining", "age": 9.0, "note": "", "cwd": None,
             "workers": [{"index": 1, "pid": 11, "state": "draining", "exit_code": None,
                          "restarts": 0, "status": "uvicorn serving", "said_stopping": True}]},
            {"generation": 2, "state": "active", "age": 1.0, "note": "", "cwd": "/srv/a/releases/2",
             "workers": [{"index": 1, "pid": 12, "state": "ready", "exit_code": None,
                          "restarts": 0, "status": "uvicorn serving", "said_stopping": False}]},
            {"generation": 3, "state": "failed", "age": 0.5, "note": TRACEBACK, "cwd": None,
             "workers": []},
        ],
        "listeners": [
            {"name": "unknown", "identity": "tcp 127.0.0.1:8000 (listening)",
             "accept_queue": 0, "backlog": 4096},
            {"name": "web", "identity": "tcp 127.0.0.1:8001 (listening)",
             "accept_queue": 1, "backlog": 4096},
        ],
        "reloads": [
            {"generation": 3, "ok": False, "duration": 0.5, "message": TRACEBACK, "ledger": []},
            {"generation": 2, "ok": True, "duration": 0.4, "message": "generation 2 ready",
             "ledger": [{"generation": 1, "complete": True, "drain_duration": 1.5,
                         "finished": 4, "handed_over": 0, "closed_by_signal": 0, "lost": 0}]},
        ],
        "handoff": None,
        "warnings": ["first line\nsecond line"],
    }  # fmt: skip
    base.update(over)
    return base


def test_status_wording() -> None:
    text = format_status(status())
    assert text.startswith("myapp: supervisor pid 10")
    assert "listener unknown" not in text
    assert "  listener tcp 127.0.0.1:8000 (listening), accept queue 0/4096" in text
    assert "  listener web: tcp 127.0.0.1:8001 (listening)" in text
    # A STATUS= text is shown only while it describes the worker.
    assert "    worker 1: pid 11 draining (stopped accepting)\n" in text + "\n"
    assert "    worker 1: pid 12 ready: uvicorn serving" in text
    # Tracebacks stay in --json: one line each here.
    assert "Traceback" not in text
    assert "ImportError" not in text
    assert "generation 3: failed, age 0.5s (generation 3, worker 1 exited" in text
    assert "in /srv/a/releases/2" in text
    assert "generation 1 drained in 1.50s: 4 connection(s) finished, 0 handed over" in text
    assert "warning: first line" in text
    assert "second line" not in text


def test_rollback_reason_comes_before_the_captured_stderr() -> None:
    head, *rest = TRACEBACK.splitlines()
    assert head.endswith("rolled back, the old generation keeps serving")
    assert rest[0].strip() == "last lines of its stderr:"


@pytest.mark.parametrize("typo", ["tcp:/127.0.0.1:8000", "tcp:127.0.0.1:8000", "tcp//[::1]:80"])
def test_a_scheme_typo_says_so(typo: str) -> None:
    with pytest.raises(SpecError, match="a scheme is written tcp://HOST:PORT"):
        parse_spec(typo)


def test_triple_slash_says_so() -> None:
    with pytest.raises(SpecError, match="one slash too many"):
        parse_spec("tcp:///127.0.0.1:8000")


def test_help_texts() -> None:
    def help_of(*cmd: str) -> str:
        return subprocess.run(
            [sys.executable, "-m", "nodrop", *cmd, "--help"],
            capture_output=True, text=True, timeout=30, check=True,
        ).stdout  # fmt: skip

    stop = " ".join(help_of("stop").split())
    assert "--timeout S give up waiting" in stop
    reload = " ".join(help_of("reload").split())
    assert "every new connection is served by the new generation" in reload
    assert "STOPPING=1" in reload
    run = " ".join(help_of("run").split())
    for option in ("--chdir DIR", "--name NAME", "--metrics tcp://HOST:PORT", "--log-format"):
        assert option in run
    status_help = " ".join(help_of("status").split())
    assert "--all" in status_help
    assert "prometheus" in status_help
