"""`nodrop run` as PID 1 of a container: a new PID namespace, for real.

``unshare --pid --fork --mount-proc`` makes the supervisor PID 1 of a fresh
PID namespace, as in a container without an init. PID 1 must reap orphans
(a worker that double-forks must leave no zombie), handle SIGTERM (the
kernel gives PID 1 no default action: without a handler, `docker stop`
waits out its timeout and kills), and exit with a status that says what
happened: 0 after a graceful stop, 1 when the first generation could not
start.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import CHILDREN, Procs
from nodrop.systemd.receiver import NotifyReceiver
from nodrop.testing.waiting import wait_for
from supervisor_harness import Supervised, http_get

WORKER = [
    sys.executable,
    "-S",
    str(CHILDREN / "servers" / "pid1_worker.py"),
]  # stdlib only: no site


def pid_namespaces_unavailable() -> str | None:
    if shutil.which("unshare") is None:
        return "unshare (util-linux) is not installed"
    if os.geteuid() != 0:
        return "a new PID namespace needs root"
    probe = subprocess.run(
        ["unshare", "--pid", "--fork", "--mount-proc", "true"],
        capture_output=True,
        text=True,
        timeout=10,
        check=False,
    )
    if probe.returncode != 0:
        return f"unshare --pid failed: {probe.stderr.strip()}"
    return None


pytestmark = [
    pytest.mark.skipif(
        bool(reason := pid_namespaces_unavailable()), reason=reason or "PID namespaces work"
    ),
]


def children_of(pid: int) -> list[int]:
    out: list[int] = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        text = (task / "children").read_text()
        out += [int(p) for p in text.split()]
    return out


def descendants(pid: int) -> list[int]:
    found: list[int] = []
    todo = [pid]
    while todo:
        current = todo.pop()
        try:
            kids = children_of(current)
        except FileNotFoundError:
            continue
        found += kids
        todo += kids
    return found


def state_of(pid: int) -> str:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return "gone"
    return stat.rsplit(")", 1)[1].split()[0]


def as_pid1(
    procs: Procs, tmp_path: Path, *run_args: str, command: list[str], wait_ready: bool = True
) -> tuple[Supervised, int]:
    """`nodrop run` as PID 1 of a new PID namespace; returns it and its host pid."""
    control = str(tmp_path / "control.sock")
    notify = NotifyReceiver(str(tmp_path / "service-notify.sock"))
    log_path = tmp_path / "supervisor.log"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path), NOTIFY_SOCKET=notify.path)
    argv = ["unshare", "--pid", "--fork", "--mount-proc", sys.executable, "-m", "nodrop"]
    argv += ["run", "--control", control, *run_args, "--", *command]
    with open(log_path, "wb") as log:
        proc = procs.popen(argv, env=env, stdout=log, stderr=subprocess.STDOUT)
    sup = Supervised(proc, control, notify, log_path)
    try:
        pid1 = wait_for(lambda: children_of(proc.pid), what="PID 1 of the namespace")[0]
        if wait_ready:
            sup.wait_for_field("READY")
    except BaseException:
        notify.close()
        raise
    return sup, pid1


@pytest.fixture
def pid1_dir(tmp_path: Path) -> Path:
    out = tmp_path / "out"
    out.mkdir()
    return out


def test_pid1_reaps_orphans_and_stops_gracefully_on_sigterm(
    procs: Procs, tmp_path: Path, pid1_dir: Path
) -> None:
    sup, pid1 = as_pid1(
        procs,
        tmp_path,
        "--listen",
        "tcp://127.0.0.1:0",
        "--ready-grace",
        "0",
        command=[*WORKER, "--dir", str(pid1_dir)],
    )
    try:
        assert sup.status()["pid"] == 1  # PID 1 of its namespace
        port = sup.port()
        assert "gen=1" in http_get(port)
        # The orphan was re-parented to PID 1 (it saw getppid() == 1) and exited.
        wait_for(lambda: (pid1_dir / "orphan-1").exists(), what="the orphan to exit")
        assert (pid1_dir / "orphan-1").read_text() == "1"
        # ...and PID 1 reaped it: no zombie anywhere in the namespace.
        wait_for(
            lambda: all(state_of(p) != "Z" for p in descendants(pid1)),
            what="no zombies under PID 1",
        )
        assert sup.reload()["ok"]
        wait_for(lambda: (pid1_dir / "orphan-2").exists(), what="generation 2's orphan")
        assert (pid1_dir / "drained-1").read_text() == "SIGTERM"  # drained on reload
        wait_for(
            lambda: all(state_of(p) != "Z" for p in descendants(pid1)),
            what="no zombies under PID 1",
        )
        # `docker stop`: SIGTERM to PID 1. The worker gets its drain signal
        # and PID 1 exits 0, which unshare (the container runtime) passes on.
        os.kill(pid1, signal.SIGTERM)
        assert sup.proc.wait(timeout=30) == 0
        assert (pid1_dir / "drained-2").read_text() == "SIGTERM"
        assert "SIGTERM: stopping gracefully" in sup.log()
    finally:
        sup.notify.close()


def test_pid1_exits_1_when_the_first_generation_fails(procs: Procs, tmp_path: Path) -> None:
    sup, _ = as_pid1(
        procs,
        tmp_path,
        "--listen",
        "tcp://127.0.0.1:0",
        command=[sys.executable, "-c", "import sys; sys.exit(3)"],
        wait_ready=False,
    )
    try:
        assert sup.proc.wait(timeout=30) == 1
        assert "could not start" in sup.log()
    finally:
        sup.notify.close()


def test_pid1_sigint_twice_kills_a_stuck_drain(
    procs: Procs, tmp_path: Path, pid1_dir: Path
) -> None:
    # A worker that ignores its drain signal: the second signal kills it, and
    # PID 1 still exits 0 (it was asked to stop) with nothing left behind.
    code = (
        "import os, signal, socket, time\n"
        "signal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
        "s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)\n"
        "s.connect(os.environ['NOTIFY_SOCKET']); s.send(b'READY=1')\n"
        "time.sleep(60)\n"
    )
    sup, pid1 = as_pid1(
        procs,
        tmp_path,
        "--listen",
        "tcp://127.0.0.1:0",
        "--ready-grace",
        "0",
        command=[sys.executable, "-c", code],
    )
    try:
        os.kill(pid1, signal.SIGINT)
        wait_for(lambda: "stopping gracefully" in sup.log(), what="the graceful stop")
        os.kill(pid1, signal.SIGINT)
        assert sup.proc.wait(timeout=30) == 0
    finally:
        sup.notify.close()
