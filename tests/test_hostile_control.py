"""The control socket against hostile local peers and bad paths (issue 13,
items B, H and L). Real processes under other uids (setpriv, as root) drive
only the CLI and the sockets."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import socket
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from conftest import CHILDREN, Procs, wait_for
from nodrop.supervisor.control import MAX_READING, READ_TIMEOUT
from supervisor_harness import Supervised, http_get, start

SRC = str(Path(__file__).resolve().parent.parent / "src")
PYTHON = "/usr/bin/python3"  # a python every uid can run (the venv's may sit under /root)
EXIT_REFUSED = 4

needs_other_uids = pytest.mark.skipif(
    os.geteuid() != 0 or shutil.which("setpriv") is None or not os.access(PYTHON, os.X_OK),
    reason="needs root, setpriv and /usr/bin/python3 to run peers as other uids",
)

# Another local user's server: it answers every request with a forged success.
FORGER = """
import json, os, socket, sys
path = sys.argv[1]
server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
server.bind(path)
os.chmod(path, 0o777)
server.listen(16)
print("listening", flush=True)
forged = {"ok": True, "generation": 99, "message": "generation 99 ready", "duration": 0.1,
          "pid": 1, "summary": "generation 99 serving", "active_generation": 99}
while True:
    conn, _ = server.accept()
    try:
        conn.recv(65536)
        conn.sendall(json.dumps(forged).encode() + b"\\n")
    except OSError:
        pass  # a client that hung up on us
    conn.close()
"""


# A client that does not check who answers: what the supervisor tells it (at
# once, before any request).
RAW_RELOAD = """
import socket, sys
conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
conn.connect(sys.argv[1])
print(conn.makefile().readline(), end="")
"""


def as_uid(uid: int, *argv: str) -> list[str]:
    return ["setpriv", f"--reuid={uid}", f"--regid={uid}", "--clear-groups", *argv]


def user_env() -> dict[str, str]:
    """A non-root user's environment with no $XDG_RUNTIME_DIR (a cron job, su, ssh
    without a session): the control directory falls back to /tmp/nodrop-UID."""
    drop = ("XDG_RUNTIME_DIR", "NODROP_CONTROL", "PYTHONPATH", "COVERAGE_PROCESS_START")
    env = {k: v for k, v in os.environ.items() if k not in drop}
    env["PYTHONPATH"] = SRC
    return env


def nodrop_as(uid: int, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        as_uid(uid, PYTHON, "-m", "nodrop", *args),
        env=user_env(),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


@pytest.fixture
def uids() -> Iterator[tuple[int, int]]:
    """A victim and an attacker uid, unlikely to collide with a parallel run;
    the victim's fallback control directory is removed afterwards."""
    victim = 41000 + os.getpid() % 9000
    attacker = victim + 10000
    fallback = f"/tmp/nodrop-{victim}"
    shutil.rmtree(fallback, ignore_errors=True)
    if os.path.islink(fallback):
        os.unlink(fallback)
    yield victim, attacker
    if os.path.islink(fallback):
        os.unlink(fallback)
    shutil.rmtree(fallback, ignore_errors=True)


def start_forger(procs: Procs, uid: int, path: str) -> subprocess.Popen[bytes]:
    proc = procs.popen(as_uid(uid, PYTHON, "-c", FORGER, path), stdout=subprocess.PIPE)
    assert proc.stdout is not None
    assert proc.stdout.readline() == b"listening\n"
    return proc


def refused_line(result: subprocess.CompletedProcess[str], prefix: str) -> str:
    assert result.returncode == EXIT_REFUSED, (result.returncode, result.stdout, result.stderr)
    assert "generation 99" not in result.stdout
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith(prefix), result.stderr
    return lines[0]


# -- B: the /tmp/nodrop-UID fallback ---------------------------------------------------


def precreate_as_attacker(attacker: int, directory: str, how: str) -> None:
    """The attack: another user makes the victim's control directory first."""
    if how == "attacker-owned":
        subprocess.run(
            as_uid(
                attacker, "/bin/sh", "-c", f"mkdir -m 0777 {directory} && chmod 0777 {directory}"
            ),
            check=True,
        )
    elif how == "symlink":
        target = f"{directory}-target"
        subprocess.run(
            as_uid(
                attacker,
                "/bin/sh",
                "-c",
                f"mkdir -p -m 0777 {target} && ln -s {target} {directory}",
            ),
            check=True,
        )


@needs_other_uids
@pytest.mark.parametrize("how", ["attacker-owned", "symlink"])
def test_reload_refuses_a_control_directory_another_user_made(
    procs: Procs, uids: tuple[int, int], how: str
) -> None:
    """B: another user pre-created /tmp/nodrop-UID 0777 with a socket of its own;
    the victim's `nodrop reload` printed the forged "generation 99 ready" and exited 0."""
    victim, attacker = uids
    directory = f"/tmp/nodrop-{victim}"
    precreate_as_attacker(attacker, directory, how)
    try:
        start_forger(procs, attacker, os.path.join(directory, "app.sock"))
        for command in (["reload"], ["status"], ["status", "--all"], ["reload", "--name", "app"]):
            line = refused_line(nodrop_as(victim, *command), f"nodrop {command[0]}: refused: ")
            assert f"control directory {directory} " in line
            assert ("symlink" if how == "symlink" else f"owned by uid {attacker}") in line
        started = nodrop_as(victim, "run", "--listen", "tcp://127.0.0.1:0", "--", "true")
        assert f"control directory {directory}" in refused_line(started, "nodrop run: refused: ")
    finally:
        shutil.rmtree(f"{directory}-target", ignore_errors=True)


@needs_other_uids
def test_run_refuses_its_own_directory_when_others_can_write_it(uids: tuple[int, int]) -> None:
    victim, _ = uids
    directory = f"/tmp/nodrop-{victim}"
    os.mkdir(directory)
    os.chown(directory, victim, victim)
    os.chmod(directory, 0o777)
    started = nodrop_as(victim, "run", "--listen", "tcp://127.0.0.1:0", "--", "true")
    assert "writable by group or others (mode 0777)" in refused_line(
        started, "nodrop run: refused: "
    )
    os.chmod(
        directory, 0o700
    )  # fixed by its owner: accepted again (the command then fails on `true`)
    again = nodrop_as(victim, "run", "--listen", "tcp://127.0.0.1:0", "--", "true")
    assert again.returncode == 1, again.stderr


@needs_other_uids
def test_run_creates_the_fallback_directory_0700_and_serves(
    procs: Procs, uids: tuple[int, int], tmp_path: Path
) -> None:
    victim, _ = uids
    directory = Path(f"/tmp/nodrop-{victim}")
    assert not directory.exists()
    os.chmod(tmp_path, 0o755)
    log = tmp_path / "run.log"
    with open(log, "wb") as out:
        proc = procs.popen(
            as_uid(
                victim,
                PYTHON,
                "-m",
                "nodrop",
                "run",
                "--name",
                "app",
                "--listen",
                "tcp://127.0.0.1:0",
                "--",
                PYTHON,
                "-S",
                str(CHILDREN / "server.py"),
            ),
            env=user_env(),
            stdout=out,
            stderr=subprocess.STDOUT,
        )

    def serving() -> bool:
        return nodrop_as(victim, "status", "--name", "app").returncode == 0

    wait_for(serving, timeout=30, what="the victim's supervisor serving")
    st = directory.lstat()
    assert stat.S_ISDIR(st.st_mode)
    assert st.st_uid == victim
    assert stat.S_IMODE(st.st_mode) == 0o700
    assert nodrop_as(victim, "stop", "--name", "app").returncode == 0
    assert proc.wait(timeout=30) == 0


@needs_other_uids
def test_client_believes_only_a_supervisor_of_its_own_uid(
    procs: Procs, uids: tuple[int, int]
) -> None:
    """B, the client side: with an explicit --control in a directory others can
    write, a swapped-in socket can deny service but not forge an answer."""
    victim, attacker = uids
    shared = tempfile.mkdtemp(prefix="nodrop-shared-")
    try:
        os.chmod(shared, 0o1777)
        path = os.path.join(shared, "app.sock")
        forger = start_forger(procs, attacker, path)
        for command in ("reload", "status", "stop"):
            line = refused_line(
                nodrop_as(victim, command, "--control", path), f"nodrop {command}: refused: "
            )
            assert f"served by pid {forger.pid} of uid {attacker}" in line, line
    finally:
        shutil.rmtree(shared, ignore_errors=True)


# -- L: refused for our uid is not a rollback ------------------------------------------


@pytest.fixture
def reachable_dir() -> Iterator[Path]:
    """A directory other uids can reach (tmp_path's parents are 0700)."""
    path = Path(tempfile.mkdtemp(prefix="nodrop-test-"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@needs_other_uids
def test_a_peer_refused_for_its_uid_gets_its_own_exit_status(
    procs: Procs, uids: tuple[int, int], reachable_dir: Path
) -> None:
    """L: the supervisor refused uid V's reload and `nodrop reload` exited 1,
    the code of a rollback. Now 4, for both ways of being refused."""
    sup = start(procs, reachable_dir, "--listen", "tcp://127.0.0.1:0")
    victim, _ = uids
    control = Path(sup.control)
    os.chmod(control.parent, 0o711)
    # The socket file says no (0600): connect() fails with EACCES.
    refused_line(nodrop_as(victim, "reload", "--control", str(control)), "nodrop reload: refused: ")
    # The file lets anyone in; now each side refuses the other's uid: the client
    # does not believe a root supervisor, the supervisor refuses uid V.
    os.chmod(control, 0o666)
    for command in ("reload", "status", "stop"):
        line = refused_line(
            nodrop_as(victim, command, "--control", str(control)), f"nodrop {command}: refused: "
        )
        assert "of uid 0, not by us" in line, line
    raw = subprocess.run(
        as_uid(victim, PYTHON, "-c", RAW_RELOAD, str(control)),
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    )
    answer = json.loads(raw.stdout)
    assert answer["ok"] is False, answer
    assert answer["refused"] is True, answer
    assert f"runs as uid {victim}" in answer["message"]
    try:
        assert sup.status()["active_generation"] == 1  # nothing reloaded or stopped
        assert sup.stop() == 0
    finally:
        sup.notify.close()


# -- H: bad control paths ----------------------------------------------------------------


def nodrop(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "nodrop", *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env=dict(env or os.environ, PYTHONPATH=SRC),
    )


def error_line(result: subprocess.CompletedProcess[str], prefix: str) -> str:
    assert result.returncode == 2, (result.returncode, result.stderr)
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith(prefix), result.stderr
    return lines[0]


def test_a_control_path_that_cannot_be_made_is_one_line() -> None:
    """H: printed a 28-line traceback."""
    result = nodrop(
        "run", "--listen", "tcp://127.0.0.1:0", "--control", "/proc/nope/x.sock", "--", "true"
    )
    line = error_line(result, "nodrop run: cannot create the control socket /proc/nope/x.sock: ")
    assert "Traceback" not in result.stderr
    assert "/proc/nope" in line


def test_a_control_path_too_long_for_af_unix_is_one_line(tmp_path: Path) -> None:
    """H: CI's deep checkout gave `OSError: AF_UNIX path too long` from bind_control."""
    deep = tmp_path / ("d" * 100)
    long_path = str(deep / "control.sock")
    result = nodrop("run", "--listen", "tcp://127.0.0.1:0", "--control", long_path, "--", "true")
    line = error_line(result, f"nodrop run: control socket path {long_path} is ")
    assert "at most 107 bytes" in line
    for command in ("reload", "status"):
        line = error_line(nodrop(command, "--control", long_path), f"nodrop {command}: ")
        assert "at most 107 bytes" in line
    env = {k: v for k, v in os.environ.items() if k != "NODROP_CONTROL"}
    env["XDG_RUNTIME_DIR"] = str(deep)
    result = nodrop("run", "--listen", "tcp://127.0.0.1:0", "--", "true", env=env)
    assert "at most 107 bytes" in error_line(result, f"nodrop run: control socket path {deep}")


# -- K: half-written requests ------------------------------------------------------------


def open_fd_count(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def test_half_written_requests_are_bounded_and_time_out(
    supervise: Callable[..., Supervised],
) -> None:
    """K: 2,000 half-written requests held 2,000 fds in the supervisor for ever.
    Now at most MAX_READING wait, each for READ_TIMEOUT; real clients and the
    serving generation are unaffected."""
    sup = supervise("--listen", "tcp://127.0.0.1:0")
    port = sup.port()
    before = open_fd_count(sup.proc.pid)
    flood: list[socket.socket] = []
    try:
        for _ in range(1000):
            conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            flood.append(conn)
            conn.setblocking(True)  # waits while the listen backlog is full (AF_UNIX)
            conn.connect(sup.control)
            conn.sendall(b'{"cmd": "rel')  # and never the rest
        # A real client, queued behind the whole flood, is answered...
        assert sup.status()["active_generation"] == 1
        assert sup.cli("status").returncode == 0
        # ...the supervisor holds no more than its bound of them...
        held = open_fd_count(sup.proc.pid) - before
        assert held <= MAX_READING + 8, f"{held} more fds than before the flood"
        # ...the serving generation serves...
        assert http_get(port).startswith("gen=1")
        # ...and the ones it kept are closed once their deadline passes.
        last = flood[-1]
        last.settimeout(READ_TIMEOUT + 10)
        started = time.monotonic()
        assert last.recv(100) == b""
        assert time.monotonic() - started <= READ_TIMEOUT + 5
        wait_for(
            lambda: open_fd_count(sup.proc.pid) <= before,
            timeout=READ_TIMEOUT + 10,
            what="the supervisor's fds back to where they were",
        )
    finally:
        for conn in flood:
            conn.close()
    assert sup.reload()["ok"] is True


def test_a_full_control_socket_answers_busy_which_is_an_error_not_a_rollback(
    tmp_path: Path,
) -> None:
    """Past max_connections a client is told "busy": `nodrop reload` then exits 2
    (try again), never 1 (the code of a rollback)."""
    from nodrop.errors import ControlError
    from nodrop.supervisor.api import Reply
    from nodrop.supervisor.control import ControlServer, bind_control, request

    path = str(tmp_path / "c.sock")

    async def handler(_request: object) -> Reply:
        return Reply({"ok": True, "message": "fine"})

    async def scenario() -> None:
        server = ControlServer(bind_control(path), handler, max_connections=2, read_timeout=30)
        await server.start()
        loop = asyncio.get_running_loop()
        silent = [socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) for _ in range(2)]
        try:
            for conn in silent:
                conn.connect(path)
            with pytest.raises(ControlError, match="busy: too many control connections"):
                await loop.run_in_executor(None, lambda: request(path, "status", timeout=10))
            for conn in silent:
                conn.close()

            def answered() -> dict[str, Any] | None:
                try:
                    return request(path, "status", timeout=10)
                except ControlError:
                    return None  # the closed ones may not be noticed yet: busy

            # Once the silent ones are gone, the socket answers again.
            answer = await loop.run_in_executor(
                None, lambda: wait_for(answered, timeout=10, what="an answer")
            )
            assert answer["message"] == "fine"
        finally:
            for conn in silent:
                conn.close()
            await server.aclose()

    asyncio.run(scenario())
