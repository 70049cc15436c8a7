"""Who may say READY=1 for a worker (issue 13, item F).

A same-uid process that joined a still-starting worker's process group
(setpgid, allowed to anyone in the session) could send READY=1 for it: the
generation went active while it slept and the old one was drained. Now only
the worker's own pid and its descendants count, and garbage on the notify
socket is logged at a bounded rate.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import pytest

from conftest import CHILDREN, Procs, wait_for
from nodrop.supervisor.lineage import ancestry, parse_ppid
from nodrop.systemd.receiver import NotifyReceiver
from supervisor_harness import Supervised, http_get

PY = [sys.executable, "-S"]
SERVER = str(CHILDREN / "server.py")
# Generation 1 serves; every later one starts, serves, and never says READY=1.
BY_GENERATION = (
    f'if [ "$NODROP_GENERATION" = 1 ]; then exec {sys.executable} -S {SERVER}; '
    f"else exec {sys.executable} -S {SERVER} --never-ready; fi"
)
# The worker is a small parent; the server, its child, says READY=1 (as
# gunicorn's workers do for their arbiter). The parent passes SIGTERM on.
CHILD_SAYS_READY = f"""
import os, signal, subprocess, sys
os.set_inheritable(3, True)
child = subprocess.Popen(
    [sys.executable, "-S", "-c",
     "import os, sys; os.environ['LISTEN_PID'] = str(os.getpid()); "
     "os.execv(sys.executable, [sys.executable, '-S', sys.argv[1]])", {str(SERVER)!r}],
    pass_fds=(3,),
)
signal.signal(signal.SIGTERM, lambda *_: child.terminate())
sys.exit(child.wait())
"""

IMPOSTOR = """
import os, socket, sys
worker = int(sys.argv[1])
os.setpgid(0, worker)  # join the starting worker's process group
environ = open(f"/proc/{worker}/environ", "rb").read().split(b"\\0")
path = [e for e in environ if e.startswith(b"NOTIFY_SOCKET=")][0].split(b"=", 1)[1]
s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
s.sendto(b"READY=1", path.decode())
print(os.getpgid(0), flush=True)
"""


def start_in_our_session(procs: Procs, tmp_path: Path, *args: str) -> Supervised:
    """`nodrop run` in the test's own session (its own process group), so that a
    process the test starts may join a worker's group, as a local attacker can."""
    control = str(tmp_path / "control.sock")
    notify = NotifyReceiver(str(tmp_path / "service-notify.sock"))
    log_path = tmp_path / "supervisor.log"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path), NOTIFY_SOCKET=notify.path)
    with open(log_path, "wb") as log:
        proc = procs.popen(
            [sys.executable, "-m", "nodrop", "run", "--control", control, *args],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=False,
            process_group=0,
        )
    sup = Supervised(proc, control, notify, log_path)
    try:
        sup.wait_for_field("READY")
    except BaseException:
        notify.close()
        raise
    return sup


def starting_worker(sup: Supervised, generation: int) -> int | None:
    for gen in sup.status()["generations"]:
        if gen["generation"] == generation and gen["workers"]:
            return int(gen["workers"][0]["pid"])
    return None


def test_joining_a_workers_process_group_does_not_make_it_ready(
    procs: Procs, tmp_path: Path
) -> None:
    sup = start_in_our_session(
        procs,
        tmp_path,
        "--listen",
        "tcp://127.0.0.1:0",
        "--ready-timeout",
        "8",
        "--",
        "/bin/sh",
        "-c",
        BY_GENERATION,
    )
    try:
        port = sup.port()
        outcome: dict[str, Any] = {}
        reloading = threading.Thread(target=lambda: outcome.update(sup.reload()))
        reloading.start()
        worker = wait_for(lambda: starting_worker(sup, 2), timeout=20, what="generation 2's worker")
        impostor = procs.python(
            IMPOSTOR, str(worker), stdout=subprocess.PIPE, start_new_session=False
        )
        out, _ = impostor.communicate(timeout=20)
        assert impostor.returncode == 0
        assert int(out) == worker  # it did join the group
        reloading.join(timeout=60)
        assert outcome["ok"] is False, outcome  # rolled back at the ready timeout
        assert "not ready" in outcome["message"] or "ready" in outcome["message"], outcome
        assert sup.status()["active_generation"] == 1
        assert http_get(port).startswith("gen=1")
        assert f"ignored a notify message from pid {impostor.pid}" in sup.log()
    finally:
        sup.stop()
        sup.notify.close()


def test_a_workers_child_may_say_ready(procs: Procs, tmp_path: Path) -> None:
    """What the rule allows: the worker's descendants (gunicorn's workers are
    its arbiter's children)."""
    sup = start_in_our_session(
        procs,
        tmp_path,
        "--listen",
        "tcp://127.0.0.1:0",
        "--drain-timeout",
        "5",
        "--",
        sys.executable,
        "-S",
        "-c",
        CHILD_SAYS_READY,
    )
    try:
        assert sup.reload()["ok"] is True
        port = sup.port()
        # The old parent has exited; its server child may take a moment more.
        wait_for(lambda: http_get(port).startswith("gen=2"), timeout=20, what="generation 2")
    finally:
        sup.stop()
        sup.notify.close()


def test_garbage_datagrams_are_logged_at_a_bounded_rate(procs: Procs, tmp_path: Path) -> None:
    sup = start_in_our_session(procs, tmp_path, "--listen", "tcp://127.0.0.1:0", "--", *PY, SERVER)
    try:
        worker = starting_worker(sup, 1)
        assert worker is not None
        environ = Path(f"/proc/{worker}/environ").read_bytes().split(b"\0")
        [entry] = [e for e in environ if e.startswith(b"NOTIFY_SOCKET=")]
        path = entry.split(b"=", 1)[1].decode()
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as garbage:
            for _ in range(500):
                garbage.sendto(b"\xff\xfe not a notify message", path)
        wait_for(
            lambda: "more ignored notify messages" in sup.log(),
            timeout=30,
            what="the summary line",
        )
        lines = [line for line in sup.log().splitlines() if "notify message" in line]
        assert 2 <= len(lines) <= 3, lines
        assert sup.status()["active_generation"] == 1
    finally:
        sup.stop()
        sup.notify.close()


@pytest.mark.parametrize(
    ("stat", "ppid"),
    [
        ("123 (python3) S 45 123 123 0 -1", 45),
        ("123 (a) b) (c) R 7 1 1", 7),  # a command name with ") " in it
        ("123 (x) Z", None),
        ("", None),
        ("garbage", None),
    ],
)
def test_parse_ppid(stat: str, ppid: int | None) -> None:
    assert parse_ppid(stat) == ppid


def test_ancestry_stops_at_init_at_a_loop_and_at_depth() -> None:
    parents = {10: 9, 9: 1}
    assert list(ancestry(10, parents.get)) == [10, 9]
    loop = {5: 6, 6: 5}
    assert list(ancestry(5, loop.get)) == [5, 6]
    deep = {n: n + 1 for n in range(2, 1000)}
    assert len(list(ancestry(2, deep.get))) == 32
    assert list(ancestry(os.getpid(), lambda pid: None)) == [os.getpid()]
