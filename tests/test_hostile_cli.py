"""Bad input on the command line: one line that says what is wrong, the
subcommand's name in front, and a distinct exit status for each kind of
failure (issue 13, items G, H, I and L)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from conftest import Procs, wait_for

SRC = str(Path(__file__).resolve().parent.parent / "src")


def nodrop(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "nodrop", *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env=dict(os.environ if env is None else env, PYTHONPATH=SRC),
    )


def one_line_error(result: subprocess.CompletedProcess[str], prefix: str) -> str:
    """The error, checked to be exactly one line starting with ``prefix``."""
    assert result.returncode == 2, (result.returncode, result.stdout, result.stderr)
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith(prefix), result.stderr
    return lines[0]


def test_errors_name_the_subcommand_not_the_argv() -> None:
    """I: `nodrop run -- true` without a listener said `nodrop ['--', 'true']: ...`."""
    result = nodrop("run", "--", "true")
    line = one_line_error(result, "nodrop run: ")
    assert "nothing to listen on" in line
    assert "['--'" not in line


FLOAT_OPTIONS = [
    ("run", "--ready-timeout"),
    ("run", "--ready-grace"),
    ("run", "--drain-timeout"),
    ("reload", "--timeout"),
    ("stop", "--timeout"),
    ("reexec", "--timeout"),
    ("hold", "--ttl"),
    ("hold", "--ttl-max"),
    ("exec", "--timeout"),
    ("bench", "--duration"),
    ("bench", "--every"),
    ("bench", "--timeout"),
    ("bench", "--settle"),
    ("demo", "--duration"),
]


@pytest.mark.parametrize("value", ["nan", "inf", "-inf", "NaN", "-1", "1e999"])
@pytest.mark.parametrize(("command", "option"), FLOAT_OPTIONS)
def test_every_seconds_option_refuses_nan_inf_and_negatives(
    command: str, option: str, value: str
) -> None:
    """G: `--ready-timeout nan|inf` disabled rollback; `--drain-timeout nan`
    SIGKILLed the old generation at once. Now refused before anything starts."""
    result = nodrop(command, f"{option}={value}", "--", "true")
    line = one_line_error(result, f"nodrop {command}: argument {option}")
    assert any(why in line for why in ("finite", "negative", "more than 0")), line


@pytest.mark.parametrize(
    ("option", "value"),
    [
        ("--ready-timeout", "0"),
        ("--drain-timeout", "0"),
        ("--ready", "delay:nan"),
        ("--ready", "delay:inf"),
    ],
)
def test_zero_and_nan_delays_are_refused(option: str, value: str) -> None:
    result = nodrop("run", "--listen", "tcp://127.0.0.1:0", f"{option}={value}", "--", "true")
    one_line_error(result, "nodrop run: ")


@pytest.mark.parametrize(
    "line", ["ready_timeout = nan", "drain_timeout = inf", "ready_grace = -nan"]
)
def test_config_file_refuses_nan_and_inf(tmp_path: Path, line: str) -> None:
    """TOML spells nan and inf too; the config file is checked the same way."""
    config = tmp_path / "nodrop.toml"
    config.write_text(f'command = ["true"]\nlisten = ["tcp://127.0.0.1:0"]\n{line}\n')
    result = nodrop("run", "--config", str(config))
    assert "finite" in one_line_error(result, "nodrop run: ")


def test_grace_zero_is_still_allowed() -> None:
    """0 is a meaningful grace (no wait), so it must stay accepted: refused
    only for other reasons (here: nothing to listen on)."""
    result = nodrop("run", "--ready-grace", "0", "--", "true")
    assert "nothing to listen on" in one_line_error(result, "nodrop run: ")


def test_relative_unix_listener_is_absolute_and_removed_at_exit(
    procs: Procs, tmp_path: Path
) -> None:
    """J: `unix:relative.sock` was bound in the cwd and left behind at exit."""
    work = tmp_path / "work"
    work.mkdir()
    control = str(tmp_path / "c.sock")
    proc = procs.popen(
        [
            sys.executable,
            "-m",
            "nodrop",
            "run",
            "--control",
            control,
            "--listen",
            "unix:rel.sock",
            "--listen",
            f"unix:{tmp_path}/replaced.sock",
            "--ready",
            "delay:0.1",
            "--",
            "sleep",
            "60",
        ],
        cwd=work,
        env=dict(os.environ, PYTHONPATH=SRC),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    status = wait_for(lambda: _status(control), timeout=30, what="the supervisor serving")
    identities = [item["identity"] for item in status["listeners"]]
    assert f"unix/stream {work}/rel.sock (listening)" in identities, identities
    assert (work / "rel.sock").is_socket()
    # Someone else's socket now sits at the second path: it must survive our exit.
    (tmp_path / "replaced.sock").unlink()
    with socket.socket(socket.AF_UNIX) as theirs:
        theirs.bind(str(tmp_path / "replaced.sock"))
        assert nodrop("stop", "--control", control).returncode == 0
        assert proc.wait(timeout=30) == 0
    assert not (work / "rel.sock").exists()
    assert (tmp_path / "replaced.sock").is_socket()


def _status(control: str) -> dict[str, Any] | None:
    from nodrop.errors import ControlError
    from nodrop.supervisor.control import request

    try:
        answer = request(control, "status", timeout=5)
    except ControlError:
        return None
    return answer if answer.get("active_generation") else None
