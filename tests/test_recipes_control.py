"""Two apps on one machine, no --control: each supervisor names its control
socket after --name or its listeners, and the commands find them again."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from conftest import CHILDREN, Procs
from nodrop.errors import ConfigError
from nodrop.listeners.spec import parse_spec
from nodrop.supervisor.discovery import check_name, derive_name
from supervisor_harness import Supervised

SERVER = [sys.executable, str(CHILDREN / "server.py")]


@pytest.mark.parametrize(
    ("specs", "inherited", "name"),
    [
        (["tcp://0.0.0.0:8000"], [], "tcp-0.0.0.0-8000"),
        (["tcp://[::1]:8000?name=web"], [], "tcp-__1-8000"),
        (
            ["tcp://127.0.0.1:8000", "unix:/run/app.sock"],
            [],
            "tcp-127.0.0.1-8000_unix-run-app.sock",
        ),
        (["tcp://127.0.0.1:0"], [], "tcp-127.0.0.1-0-pid42"),
        ([], ["tcp 0.0.0.0:8000"], "tcp-0.0.0.0-8000"),
        ([], [], "nodrop"),
    ],
)
def test_derive_name(specs: list[str], inherited: list[str], name: str) -> None:
    assert derive_name([parse_spec(s) for s in specs], inherited, 42) == name
    assert check_name(name) == name


@pytest.mark.parametrize("bad", ["", "../x", "a/b", "-x", "x" * 65, "a b"])
def test_bad_names_are_refused(bad: str) -> None:
    with pytest.raises(ConfigError):
        check_name(bad)


def nodrop(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "nodrop", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def start(procs: Procs, tmp_path: Path, env: dict[str, str], label: str, *args: str) -> Supervised:
    from nodrop.systemd.receiver import NotifyReceiver

    notify = NotifyReceiver(str(tmp_path / f"{label}-notify.sock"))
    log_path = tmp_path / f"{label}.log"
    with open(log_path, "wb") as log:
        proc = procs.popen(
            [sys.executable, "-m", "nodrop", "run", *args, "--", *SERVER],
            env=dict(env, NOTIFY_SOCKET=notify.path),
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    sup = Supervised(proc, "", notify, log_path)
    try:
        sup.wait_for_field("READY")
    except BaseException:
        notify.close()
        raise
    return sup


@pytest.mark.slow
def test_two_apps_need_no_control_flag(
    procs: Procs, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    # A short runtime dir: under a deep checkout (CI clones to /check/work/main)
    # tmp_path/xdg/nodrop/NAME.sock can pass the 107-byte AF_UNIX limit.
    runtime = Path(tempfile.mkdtemp(prefix="xdg-", dir="/tmp"))
    request.addfinalizer(lambda: shutil.rmtree(runtime, ignore_errors=True))
    env = {k: v for k, v in os.environ.items() if k != "NODROP_CONTROL"}
    env.update(XDG_RUNTIME_DIR=str(runtime), PYTHONPATH=os.pathsep.join(sys.path))
    web = start(procs, tmp_path, env, "web", "--name", "web", "--listen", "tcp://127.0.0.1:0")
    try:
        api = start(procs, tmp_path, env, "api", "--listen", "tcp://127.0.0.1:0")
    except BaseException:
        web.notify.close()
        raise
    try:
        entries = sorted(p.name for p in (runtime / "nodrop").iterdir())
        sockets = [name for name in entries if name.endswith(".sock")]
        # Beside each control socket, its supervisor's recovery state (docs/recovery.md).
        assert entries == sorted([*sockets, *(f"{name}.state" for name in sockets)]), entries
        assert sockets[1] == "web.sock", sockets
        assert sockets[0].startswith("tcp-127.0.0.1-0-pid"), sockets
        api_name = sockets[0].removesuffix(".sock")

        listed = nodrop(env, "status", "--all")
        assert listed.returncode == 0, listed.stdout + listed.stderr
        assert listed.stdout.count("generation 1 serving") == 2, listed.stdout
        assert "web: pid" in listed.stdout
        assert f"{api_name}: pid" in listed.stdout
        as_json = json.loads(nodrop(env, "status", "--all", "--json").stdout)
        assert sorted(s["name"] for s in as_json) == sorted(["web", api_name])

        ambiguous = nodrop(env, "reload")
        assert ambiguous.returncode == 2
        assert "2 supervisors run here" in ambiguous.stderr
        assert "--name" in ambiguous.stderr

        done = nodrop(env, "reload", "--name", "web")
        assert done.returncode == 0, done.stdout + done.stderr
        statuses = {
            s["name"]: s["active_generation"]
            for s in json.loads(nodrop(env, "status", "--all", "--json").stdout)
        }
        assert statuses == {"web": 2, api_name: 1}

        assert nodrop(env, "stop", "--name", "web").returncode == 0
        assert web.proc.wait(timeout=30) == 0
        only = nodrop(env, "reload")  # one left: found without a flag
        assert only.returncode == 0, only.stdout + only.stderr
        assert json.loads(nodrop(env, "status", "--json").stdout)["active_generation"] == 2
        assert nodrop(env, "stop").returncode == 0
        assert api.proc.wait(timeout=30) == 0
        none = nodrop(env, "status", "--all")
        assert none.returncode == 2
        assert "no supervisor answers" in none.stdout
    finally:
        web.notify.close()
        api.notify.close()
