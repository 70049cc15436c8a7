"""The fleet rollout (examples/ansible/reload-fleet.yml), run with ansible-core
against two "hosts" on this machine (``ansible_connection=local``), each with
its own release layout and its own running supervisor.

A good release reaches both hosts; a broken one makes the first host's
`nodrop reload` exit 1, that host's `current` link goes back, the play stops,
and the second host is never touched (`serial`, `max_fail_percentage: 0`).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tarfile
from functools import partial
from pathlib import Path

import pytest

from conftest import HERE, Procs, wait_for
from release_fixtures import built_dist, wheel_of
from supervisor_harness import http_get

PLAYBOOK = HERE.parent / "examples" / "ansible" / "reload-fleet.yml"
ANSIBLE = Path(sys.executable).parent / "ansible-playbook"

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not ANSIBLE.exists(), reason="ansible-core is not installed (test extra)"),
]

APP = """\
import os, socket, sys
import nodrop  # from the release's own venv
RELEASE = {release!r}
{broken}
listener = nodrop.listen_fds()[0].socket
body = f"release={{RELEASE}} gen={{os.environ['NODROP_GENERATION']}}".encode()
nodrop.ready()
import signal
signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
while True:
    conn, _ = listener.accept()
    with conn:
        conn.recv(65536)
        conn.sendall(b"HTTP/1.1 200 OK\\r\\nContent-Length: %d\\r\\nConnection: close\\r\\n\\r\\n%s"
                     % (len(body), body))
"""


def archive(tmp_path: Path, version: str, broken: bool = False) -> Path:
    src = tmp_path / f"src-{version}"
    src.mkdir()
    (src / "app.py").write_text(
        APP.format(release=version, broken="sys.exit('broken release')" if broken else "")
    )
    (src / "requirements.txt").write_text("")
    path = tmp_path / f"release-{version}.tar.gz"
    with tarfile.open(path, "w:gz") as tar:
        for item in src.iterdir():
            tar.add(item, arcname=item.name)
    return path


def first_release(root: Path, wheel: Path) -> None:
    """What the host had before: releases/v1 with its venv, current -> it."""
    release = root / "releases" / "v1"
    release.mkdir(parents=True)
    (release / "app.py").write_text(APP.format(release="v1", broken=""))
    subprocess.run(
        [sys.executable, "-m", "venv", "--without-pip", str(release / "venv")], check=True
    )
    subprocess.run(
        [sys.executable, "-m", "pip", "--python", str(release / "venv" / "bin" / "python"),
         "install", "-q", "--no-index", "--no-deps", str(wheel)],
        check=True, timeout=300,
    )  # fmt: skip
    os.symlink("releases/v1", root / "current")


def port_of(control: Path) -> int:
    from nodrop.supervisor.control import request

    status = request(str(control), "status", timeout=10)
    return int(status["listeners"][0]["address"].rsplit(":", 1)[1])


def serving_generation(control: Path, env: dict[str, str], generation: int) -> bool:
    """``nodrop status`` at ``control`` says ``generation`` is active."""
    out = subprocess.run(
        [sys.executable, "-m", "nodrop", "status", "--json", "--control", str(control)],
        env=env, capture_output=True, text=True, timeout=30, check=False,
    ).stdout  # fmt: skip
    return bool(json.loads(out or "{}").get("active_generation") == generation)


# Two releases, each a venv with pip installs per host, and three plays: 108 s
# on the 2-core VM at load average ~10, near the suite's 120 s default.
@pytest.mark.timeout(400)
def test_rollout_is_gated_on_nodrop_reload(
    procs: Procs, tmp_path: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    wheel = wheel_of(built_dist(tmp_path_factory))
    hosts = {}
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "NODROP_CONTROL")}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    for host in ("host1", "host2"):
        root = tmp_path / host / "srv" / "myapp"
        run_dir = tmp_path / host / "run"
        run_dir.mkdir(parents=True, mode=0o700)
        first_release(root, wheel)
        control = run_dir / "nodrop.sock"
        log = open(tmp_path / f"{host}.log", "wb")  # noqa: SIM115 (closed below)
        procs.popen(
            [sys.executable, "-m", "nodrop", "run", "--control", str(control),
             "--listen", "tcp://127.0.0.1:0", "--ready-grace", "0",
             "--chdir", str(root / "current"), "--", "venv/bin/python", "app.py"],
            env=env, stdout=log, stderr=subprocess.STDOUT, cwd="/",
        )  # fmt: skip
        log.close()
        hosts[host] = (root, control)
    for host, (_, control) in hosts.items():
        # A supervisor says READY=1 to its own service manager; here, with none,
        # its status is the signal.
        wait_for(partial(Path.exists, control), timeout=60, what=f"{host}'s control socket")
        wait_for(partial(serving_generation, control, env, 1), timeout=60, what=f"{host} serving")
    inventory = tmp_path / "hosts.ini"
    inventory.write_text(
        "[web]\n"
        + "".join(
            f"{host} ansible_connection=local ansible_python_interpreter={sys.executable} "
            f"app_root={root} control={control}\n"
            for host, (root, control) in hosts.items()
        )
    )
    ansible_env = dict(
        env,
        ANSIBLE_HOME=str(tmp_path / "ansible-home"),
        ANSIBLE_LOCAL_TEMP=str(tmp_path / "ansible-tmp"),
        ANSIBLE_REMOTE_TEMP=str(tmp_path / "ansible-tmp"),
        ANSIBLE_NOCOLOR="1",
        ANSIBLE_RETRY_FILES_ENABLED="0",
    )

    outside = Path("/srv/myapp")
    was_there = outside.exists()

    def play(version: str, archive_path: Path) -> subprocess.CompletedProcess[str]:
        done = subprocess.run(
            [str(ANSIBLE), "-i", str(inventory), str(PLAYBOOK),
             "-e", f"version={version}", "-e", f"archive={archive_path}",
             "-e", f"nodrop_wheel={wheel}", "-e", "pip_extra_args=--no-index"],
            env=ansible_env, capture_output=True, text=True, timeout=600, check=False,
        )  # fmt: skip
        # The inventory's paths, never the playbook's defaults, were used.
        assert was_there or not outside.exists(), "the play wrote to /srv/myapp"
        return done

    good = play("v2", archive(tmp_path, "v2"))
    assert good.returncode == 0, good.stdout[-5000:] + good.stderr[-3000:]
    for root, control in hosts.values():
        assert http_get(port_of(control)).startswith("release=v2 gen=2"), root
        assert os.readlink(root / "current") == str(root / "releases" / "v2")

    bad = play("v3", archive(tmp_path, "v3", broken=True))
    assert bad.returncode != 0, bad.stdout[-5000:]
    assert "rolled back, the old generation keeps serving" in bad.stdout, bad.stdout[-5000:]
    (root1, control1), (root2, control2) = hosts["host1"], hosts["host2"]
    # host1 tried v3, was rolled back, and has current back on v2.
    assert (root1 / "releases" / "v3").is_dir()
    assert os.readlink(root1 / "current") == str(root1 / "releases" / "v2")
    assert http_get(port_of(control1)).startswith("release=v2 gen=2")
    # host2, in the next batch, was never touched.
    assert not (root2 / "releases" / "v3").exists()
    assert http_get(port_of(control2)).startswith("release=v2 gen=2")
    for _, control in hosts.values():
        stopped = subprocess.run(
            [sys.executable, "-m", "nodrop", "stop", "--control", str(control)],
            env=env, capture_output=True, text=True, timeout=60, check=False,
        )  # fmt: skip
        assert stopped.returncode == 0, stopped.stderr
    shutil.rmtree(tmp_path / "ansible-tmp", ignore_errors=True)
