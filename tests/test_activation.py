"""systemd socket activation: the reference behaviour, both sides, for real."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import subprocess
import sys
from typing import Any, BinaryIO

import pytest

from conftest import CHILDREN, Procs, waitpid_status
from nodrop.errors import ActivationError
from nodrop.listeners.bind import bind, resolve
from nodrop.listeners.spec import parse_spec
from nodrop.systemd.activation import activation_env, listen_fds, parse_listen_env
from nodrop.systemd.spawn import shim_argv, spawn

PID = 4242

# (environment, expected result or the error message fragment)
CASES: list[tuple[dict[str, str], Any]] = [
    ({}, []),
    ({"LISTEN_FDS": "2"}, []),  # no LISTEN_PID: not for us
    ({"LISTEN_PID": "999", "LISTEN_FDS": "2"}, []),  # another process's
    ({"LISTEN_PID": str(PID)}, []),  # no LISTEN_FDS
    ({"LISTEN_PID": str(PID), "LISTEN_FDS": "0"}, []),
    ({"LISTEN_PID": str(PID), "LISTEN_FDS": "2"}, [(3, "unknown"), (4, "unknown")]),
    (
        {"LISTEN_PID": str(PID), "LISTEN_FDS": "2", "LISTEN_FDNAMES": "web:admin"},
        [(3, "web"), (4, "admin")],
    ),
    ({"LISTEN_PID": str(PID), "LISTEN_FDS": "1", "LISTEN_FDNAMES": ""}, [(3, "")]),
    ({"LISTEN_PID": "abc", "LISTEN_FDS": "1"}, "LISTEN_PID='abc' is not a number"),
    ({"LISTEN_PID": "0", "LISTEN_FDS": "1"}, "must be positive"),
    ({"LISTEN_PID": "-5", "LISTEN_FDS": "1"}, "not a number"),
    ({"LISTEN_PID": str(PID), "LISTEN_FDS": "x"}, "LISTEN_FDS='x' is not a number"),
    ({"LISTEN_PID": str(PID), "LISTEN_FDS": "-1"}, "not a number"),
    ({"LISTEN_PID": str(PID), "LISTEN_FDS": "99999999999"}, "out of range"),
    (
        {"LISTEN_PID": str(PID), "LISTEN_FDS": "2", "LISTEN_FDNAMES": "web"},
        "1 names but LISTEN_FDS=2",
    ),
    (
        {"LISTEN_PID": str(PID), "LISTEN_FDS": "1", "LISTEN_FDNAMES": "a:b"},
        "2 names but LISTEN_FDS=1",
    ),
]


@pytest.mark.parametrize(("env", "expected"), CASES)
def test_parse_listen_env(env: dict[str, str], expected: Any) -> None:
    if isinstance(expected, str):
        with pytest.raises(ActivationError, match=expected.replace("(", r"\(")):
            parse_listen_env(env, PID)
    else:
        assert parse_listen_env(env, PID) == expected


@pytest.mark.parametrize(
    "env",
    [
        {"LISTEN_PID": "1", "LISTEN_FDS": "1", "LISTEN_FDNAMES": "x"},  # not ours
        {"LISTEN_PID": "garbage", "LISTEN_FDS": "1", "LISTEN_FDNAMES": "x"},  # error
        {"LISTEN_PID": str(os.getpid()), "LISTEN_FDS": "1", "LISTEN_FDNAMES": "a:b"},
    ],
)
def test_variables_are_unset_on_every_path(env: dict[str, str]) -> None:
    environ = dict(env, OTHER="kept")
    with contextlib.suppress(ActivationError):
        listen_fds(unset_environment=True, environ=environ)
    assert environ == {"OTHER": "kept"}
    environ = dict(env)
    with contextlib.suppress(ActivationError):
        listen_fds(unset_environment=False, environ=environ)
    assert environ == env


def test_activation_env_rejects_bad_names() -> None:
    assert activation_env(["web", "admin"]) == {"LISTEN_FDS": "2", "LISTEN_FDNAMES": "web:admin"}
    with pytest.raises(ActivationError):
        activation_env(["a:b"])


def run_child(
    procs: Procs, fds: list[int], names: list[str], *extra: str
) -> tuple[int, dict[str, Any], BinaryIO]:
    """Spawn the activation child with ``fds``; return (pid, report, its stdout)."""
    r, w = os.pipe()
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    pid = procs.adopt(
        spawn(
            [sys.executable, str(CHILDREN / "activation_child.py"), *extra],
            env=env,
            fds=fds,
            names=names,
            stdout=w,
        )
    )
    os.close(w)
    reader = os.fdopen(r, "rb")
    line = reader.readline()
    assert line, "child exited without a report"
    return pid, json.loads(line), reader


def test_spawned_child_sees_its_sockets_at_3_with_its_own_pid(procs: Procs) -> None:
    web = bind(*resolve(parse_spec("tcp://127.0.0.1:0")))
    admin = bind(*resolve(parse_spec("tcp://[::1]:0")))
    with web, admin:
        pid, report, reader = run_child(
            procs, [web.fileno(), admin.fileno()], ["web", "admin"], "--serve"
        )
        with reader:
            assert report["pid"] == pid
            assert report["before"] == {
                "LISTEN_PID": str(pid),
                "LISTEN_FDS": "2",
                "LISTEN_FDNAMES": "web:admin",
            }
            assert report["after"] == {
                "LISTEN_PID": None,
                "LISTEN_FDS": None,
                "LISTEN_FDNAMES": None,
            }
            assert report["fds"] == [3, 4]
            assert report["names"] == ["web", "admin"]
            assert report["cloexec"] == [True, True]
            port = web.getsockname()[1]
            assert report["identities"][0] == f"tcp 127.0.0.1:{port} (listening)"
            # Nothing but stdio and the two sockets leaked into the child (the
            # listdir itself shows one more fd).
            assert [fd for fd in report["open_fds"] if fd > 4] in ([], [5])
            for sock, name in ((web, b"web"), (admin, b"admin")):
                with socket.create_connection(sock.getsockname()[:2], timeout=5) as conn:
                    assert conn.recv(16) == name
            assert waitpid_status(pid) == 0


def test_fds_already_sitting_at_target_numbers(procs: Procs) -> None:
    """Sources at 3 and 4 swapped: posix_spawn must not clobber or keep CLOEXEC."""
    a = bind(*resolve(parse_spec("tcp://127.0.0.1:0")))
    b = bind(*resolve(parse_spec("tcp://127.0.0.1:0")))
    with a, b:
        pid, report, reader = run_child(procs, [b.fileno(), a.fileno()], ["b", "a"])
        with reader:
            assert report["identities"] == [
                f"tcp 127.0.0.1:{b.getsockname()[1]} (listening)",
                f"tcp 127.0.0.1:{a.getsockname()[1]} (listening)",
            ]
            assert waitpid_status(pid) == 0


def test_python_shim_when_there_is_no_shell(procs: Procs) -> None:
    argv = shim_argv(["sh", "-c", 'echo "$LISTEN_PID $$"'], shell=None)
    out = subprocess.run(argv, capture_output=True, check=True, timeout=30, env=dict(os.environ))
    listen_pid, pid = out.stdout.split()
    assert listen_pid == pid


@pytest.mark.skipif(
    shutil.which("systemd-socket-activate") is None, reason="systemd-socket-activate not installed"
)
def test_interop_with_systemd_socket_activate(procs: Procs) -> None:
    """systemd's own tool passes a socket; nodrop.listen_fds sees it, named, working."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    proc = procs.popen(
        [
            "systemd-socket-activate",
            "-l",
            f"127.0.0.1:{port}",
            "--fdname=web",
            "-E",
            "PYTHONPATH",
            sys.executable,
            str(CHILDREN / "activation_child.py"),
            "--serve",
        ],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    # systemd-socket-activate listens first and execs the child at the first
    # connection (it "accepts" lazily), so connect, then read the report.
    assert proc.stderr is not None
    assert proc.stdout is not None
    line = proc.stderr.readline()  # "Listening on 127.0.0.1:PORT as 3."
    assert b"Listening on" in line
    with socket.create_connection(("127.0.0.1", port), timeout=10) as conn:
        report = json.loads(proc.stdout.readline())
        assert report["names"] == ["web"]
        assert report["fds"] == [3]
        assert report["identities"] == [f"tcp 127.0.0.1:{port} (listening)"]
        assert conn.recv(16) == b"web"
    assert proc.wait(timeout=10) == 0
