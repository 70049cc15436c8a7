"""examples/systemd: the units verify, and their commands work as systemd runs them.

There is no systemd (as PID 1) here to start the units, so each unit's
ExecStart and ExecReload are read from the file, pointed at this checkout
and port 0 (read back from `nodrop status`, or from the socket the test
binds for the socket unit), and run the way systemd would: with NOTIFY_SOCKET (the
unit is Type=notify: READY=1 must come from the main pid) and, for the
socket-activated variant, with the listening socket at fd 3 and
LISTEN_FDS/LISTEN_FDNAMES/LISTEN_PID set. Stopping is KillMode=process:
SIGTERM to the main process only.
"""

from __future__ import annotations

import importlib.util
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import HERE, Procs, waitpid_status
from nodrop.supervisor.control import request
from nodrop.systemd.receiver import NotifyReceiver
from nodrop.systemd.spawn import spawn
from supervisor_harness import Supervised, http_get

UNITS = HERE.parent / "examples" / "systemd"
APP_DIR = HERE.parent / "examples" / "uvicorn"


def unit_settings(path: Path) -> dict[str, str]:
    """``Key=value`` lines of a unit, continuation lines joined (pure but for the read)."""
    settings: dict[str, str] = {}
    pending = ""
    for raw in path.read_text().splitlines():
        line = pending + raw.strip()
        if line.endswith("\\"):
            pending = line[:-1] + " "
            continue
        pending = ""
        if "=" in line and not line.startswith(("#", ";", "[")):
            key, value = line.split("=", 1)
            settings[key] = value
    return settings


def localize(command: str, tmp_path: Path, port: int) -> list[str]:
    """A unit's command line, pointed at this checkout, tmp_path and ``port``."""
    text = (
        command.replace("/run/myapp", str(tmp_path))
        .replace("0.0.0.0:8000", f"127.0.0.1:{port}")
        .replace("--workers 4", "--workers 2")
        .replace(" venv/bin/python ", f" {sys.executable} ")
        .replace("/srv/myapp/current", str(APP_DIR))
    )
    argv = shlex.split(text)
    assert argv[0] == "/opt/nodrop/bin/nodrop", argv
    return [sys.executable, "-m", "nodrop", *argv[1:]]


@pytest.mark.skipif(
    shutil.which("systemd-analyze") is None, reason="systemd-analyze is not installed"
)
def test_units_verify(tmp_path: Path) -> None:
    # verify needs the executables to exist: stand-ins for nodrop and the venv.
    paths = []
    for unit in sorted(UNITS.glob("*.s*")):
        text = unit.read_text().replace(
            "/opt/nodrop/bin/nodrop", shutil.which("true") or "/bin/true"
        )
        (tmp_path / unit.name).write_text(text)
        paths.append(str(tmp_path / unit.name))
    assert len(paths) == 3
    out = subprocess.run(
        ["systemd-analyze", "verify", "--man=no", *paths],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    # verify exits 0 even for unknown keys: any message is a finding.
    assert out.returncode == 0, out
    assert not out.stderr.strip(), out
    assert not out.stdout.strip(), out


def test_units_are_type_notify_with_nodrop_reload() -> None:
    for name in ("myapp.service", "myapp-activated.service"):
        unit = unit_settings(UNITS / name)
        assert unit["Type"] == "notify"
        assert unit["NotifyAccess"] == "main"
        # The supervisor alone gets the stop signal; a killed supervisor's
        # workers are taken over by the restarted one (docs/recovery.md).
        assert unit["KillMode"] == "process"
        assert unit["Restart"] == "always"
        assert unit["RuntimeDirectoryPreserve"] == "restart"
        assert shlex.split(unit["ExecReload"])[1] == "reload"
    socket_unit = unit_settings(UNITS / "myapp.socket")
    assert socket_unit["Service"] == "myapp-activated.service"
    assert "--listen" not in unit_settings(UNITS / "myapp-activated.service")["ExecStart"]


@pytest.mark.skipif(importlib.util.find_spec("uvicorn") is None, reason="uvicorn is not installed")
@pytest.mark.parametrize("name", ["myapp.service", "myapp-activated.service"])
def test_unit_commands_run_as_systemd_runs_them(procs: Procs, tmp_path: Path, name: str) -> None:
    unit = unit_settings(UNITS / name)
    notify = NotifyReceiver(str(tmp_path / "systemd-notify.sock"))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path), NOTIFY_SOCKET=notify.path)
    log_path = tmp_path / "journal.log"
    held: socket.socket | None = None
    try:
        if name == "myapp-activated.service":
            # What myapp.socket does: systemd binds (port 0 here), the service inherits.
            held = socket.create_server(("127.0.0.1", 0), backlog=4096)
        port = 0 if held is None else held.getsockname()[1]
        start = localize(unit["ExecStart"], tmp_path, port)
        reload = localize(unit["ExecReload"], tmp_path, port)
        with open(log_path, "wb") as log:
            if held is not None:
                pid = procs.adopt(
                    spawn(
                        start,
                        env=env,
                        fds=[held.fileno()],
                        names=["web"],
                        stdout=log.fileno(),
                        stderr=log.fileno(),
                    )
                )
            else:
                pid = procs.popen(start, env=env, stdout=log, stderr=subprocess.STDOUT).pid
        sup = Supervised(None, str(tmp_path / "nodrop.sock"), notify, log_path)  # type: ignore[arg-type]
        ready = sup.wait_for_field("READY", timeout=30)
        assert ready.pid == pid  # NotifyAccess=main
        port = port or sup.port()
        assert "gen=1" in http_get(port)
        listeners = request(sup.control, "status", timeout=10)["listeners"]
        if held is not None:
            assert [item["name"] for item in listeners] == ["web"]
            assert listeners[0]["inode"] == os.fstat(held.fileno()).st_ino
        done = subprocess.run(
            reload, env=env, capture_output=True, text=True, timeout=60, check=False
        )
        assert done.returncode == 0, done.stdout + done.stderr + sup.log()
        assert request(sup.control, "status", timeout=10)["active_generation"] == 2
        os.kill(pid, signal.SIGTERM)  # KillMode=process: the main process only
        assert waitpid_status(pid, timeout=45) == 0
        sup.wait_for_field("STOPPING")
        if held is not None:
            # The socket outlives the service, as systemd's would: still listening.
            assert held.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN) == 1
    finally:
        notify.close()
        if held is not None:
            held.close()
