"""The systemd recipe with a release-directory deploy, run as systemd runs it.

Layout, as on a host (under tmp_path)::

    /srv/myapp/releases/1/{app.py, venv/}     each release has its own venv,
    /srv/myapp/releases/2/{app.py, venv/}     with nodrop installed from the wheel
    /srv/myapp/current -> releases/N          flipped atomically by the deploy

``examples/systemd/myapp.service`` runs ``nodrop run --chdir
/srv/myapp/current -- venv/bin/python -m nodrop.adapters.uvicorn app:app``;
the deploy flips ``current`` and runs the unit's ExecReload. The new
generation must run the new release: its code, its venv, its nodrop.

What is exercised: the unit's ExecStart and ExecReload lines, with only
paths substituted, started the way systemd starts them (cwd ``/``,
``NOTIFY_SOCKET``, SIGTERM to the main pid for ``KillMode=process``), and
``systemd-analyze verify`` on the substituted units. What is not (there is
no systemd as PID 1 here): systemd itself starting, reloading and stopping
the unit, ``RuntimeDirectory=`` creation, ``Restart=``, the journal.

The release venvs are real (``python -m venv``) with the nodrop wheel
installed into each; uvicorn is not downloaded per release but reached
through a ``.pth`` file pointing at the test venv's site-packages (appended
after the release's own site-packages, so nodrop comes from the release).
"""

from __future__ import annotations

import os
import shlex
import shutil
import signal
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

from conftest import HERE, Procs, waitpid_status
from nodrop.supervisor.control import request
from nodrop.systemd.receiver import NotifyReceiver
from release_fixtures import built_dist, wheel_of
from supervisor_harness import Supervised, http_get


@pytest.fixture(scope="session")
def dist(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return built_dist(tmp_path_factory)


UNITS = HERE.parent / "examples" / "systemd"

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        __import__("importlib").util.find_spec("uvicorn") is None,
        reason="uvicorn is not installed (it is in the test extra)",
    ),
]

APP = """\
import os
import nodrop

RELEASE = {release!r}
{broken}
BODY = (
    f"release={{RELEASE}} gen={{os.environ.get('NODROP_GENERATION')}} "
    f"cwd={{os.getcwd()}} nodrop={{os.path.dirname(nodrop.__file__)}}\\n"
).encode()


async def app(scope, receive, send):
    if scope["type"] == "lifespan":
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await send({{"type": "lifespan.startup.complete"}})
            elif message["type"] == "lifespan.shutdown":
                await send({{"type": "lifespan.shutdown.complete"}})
                return
    await send({{"type": "http.response.start", "status": 200,
                "headers": [(b"content-length", b"%d" % len(BODY))]}})
    await send({{"type": "http.response.body", "body": BODY}})
"""


def unit_settings(path: Path) -> dict[str, str]:
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


def make_release(root: Path, name: str, wheel: Path, broken: bool = False) -> Path:
    """releases/NAME with app.py and a venv holding the nodrop wheel."""
    release = root / "releases" / name
    release.mkdir(parents=True)
    (release / "app.py").write_text(
        APP.format(
            release=name,
            broken="raise ImportError('release is broken: missing setting')" if broken else "",
        )
    )
    env_dir = release / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(env_dir)], check=True)
    done = subprocess.run(
        [sys.executable, "-m", "pip", "--python", str(env_dir / "bin" / "python"), "install",
         "-q", "--no-index", "--no-deps", str(wheel)],
        capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    site = next((env_dir / "lib").glob("python3*/site-packages"))
    (site / "zz-test-deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    return release


def flip(root: Path, name: str) -> None:
    """Point ``current`` at releases/NAME atomically (a rename over the link)."""
    tmp = root / "current.new"
    os.symlink(f"releases/{name}", tmp)
    os.replace(tmp, root / "current")


def localize(command: str, root: Path, run_dir: Path, port: int) -> list[str]:
    """A unit command with its paths pointed at tmp_path (the only change)."""
    text = (
        command.replace("/run/myapp", str(run_dir))
        .replace("/srv/myapp", str(root))
        .replace("0.0.0.0:8000", f"127.0.0.1:{port}")
        .replace("--workers 4", "--workers 2")
    )
    argv = shlex.split(text)
    assert argv[0] == "/opt/nodrop/bin/nodrop", argv
    return [sys.executable, "-m", "nodrop", *argv[1:]]


@pytest.fixture
def layout(tmp_path: Path, dist: Path) -> Path:
    root = tmp_path / "srv" / "myapp"
    make_release(root, "1", wheel_of(dist))
    flip(root, "1")
    return root


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="no systemd-analyze")
def test_units_verify_with_the_release_layout(tmp_path: Path, layout: Path) -> None:
    nodrop_bin = tmp_path / "opt" / "nodrop" / "bin" / "nodrop"
    nodrop_bin.parent.mkdir(parents=True)
    nodrop_bin.symlink_to(shutil.which("true") or "/bin/true")
    paths = []
    for unit in sorted(UNITS.glob("*.s*")):
        text = unit.read_text().replace("/opt/nodrop/bin/nodrop", str(nodrop_bin))
        text = text.replace("/srv/myapp", str(layout))
        (tmp_path / unit.name).write_text(text)
        paths.append(str(tmp_path / unit.name))
    out = subprocess.run(
        ["systemd-analyze", "verify", "--man=no", *paths],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert out.returncode == 0, out
    assert not out.stderr.strip(), out
    assert not out.stdout.strip(), out


def test_flip_current_and_reload_runs_the_new_release(
    procs: Procs,
    tmp_path: Path,
    layout: Path,
    dist: Path,
) -> None:
    unit = unit_settings(UNITS / "myapp.service")
    assert "--chdir /srv/myapp/current" in unit["ExecStart"]
    run_dir = tmp_path / "run"
    run_dir.mkdir(mode=0o700)
    notify = NotifyReceiver(str(tmp_path / "systemd-notify.sock"))
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "NODROP_CONTROL")}
    env["NOTIFY_SOCKET"] = notify.path
    log_path = tmp_path / "journal.log"
    port_probe = __import__("socket").socket()
    port_probe.bind(("127.0.0.1", 0))
    port = port_probe.getsockname()[1]
    port_probe.close()
    start = localize(unit["ExecStart"], layout, run_dir, port)
    reload = localize(unit["ExecReload"], layout, run_dir, port)
    try:
        with open(log_path, "wb") as log:
            pid = procs.popen(
                start, env=env, stdout=log, stderr=subprocess.STDOUT, cwd="/"
            ).pid  # systemd's default WorkingDirectory for a system unit is /
        sup = Supervised(None, str(run_dir / "nodrop.sock"), notify, log_path)  # type: ignore[arg-type]
        assert sup.wait_for_field("READY", timeout=60).pid == pid
        release1 = (layout / "releases" / "1").resolve()
        body = http_get(port)
        assert body.startswith("release=1 gen=1 "), body
        assert f"cwd={release1} " in body, body
        assert f"nodrop={release1}/venv/lib/" in body, body  # the release's own nodrop

        # Deploy release 2: unpack beside, flip the link, reload.
        make_release(layout, "2", wheel_of(dist))
        flip(layout, "2")
        done = subprocess.run(reload, env=env, capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stdout + done.stderr + sup.log()
        release2 = (layout / "releases" / "2").resolve()
        bodies = {http_get(port) for _ in range(20)}
        assert len(bodies) <= 2, bodies
        assert all(b.startswith("release=2 gen=2 ") for b in bodies), bodies
        assert all(f"cwd={release2} " in b and f"nodrop={release2}/venv/lib/" in b for b in bodies)
        status = request(sup.control, "status", timeout=10)
        gens = {g["generation"]: g for g in status["generations"]}
        assert gens[2]["cwd"] == str(release2)
        assert gens[1]["cwd"] == str(release1)

        # A broken release 3 is rolled back: release 2 keeps serving.
        make_release(layout, "3", wheel_of(dist), broken=True)
        flip(layout, "3")
        done = subprocess.run(reload, env=env, capture_output=True, text=True, timeout=60)
        assert done.returncode == 1, done.stdout + done.stderr
        first, *rest = done.stdout.splitlines()
        assert "rolled back, the old generation keeps serving" in first, done.stdout
        assert any("release is broken" in line for line in rest), done.stdout
        assert http_get(port).startswith("release=2 gen=2 ")
        flip(layout, "2")  # the deploy tool's rollback of the link

        os.kill(pid, signal.SIGTERM)  # KillMode=process: the main process only
        assert waitpid_status(pid, timeout=45) == 0
        sup.wait_for_field("STOPPING")
    finally:
        notify.close()


def test_a_missing_release_directory_is_rolled_back(
    supervise: object, tmp_path: Path, layout: Path
) -> None:
    start = supervise  # the harness's `nodrop run`, with --chdir to the layout
    sup = start(  # type: ignore[operator]
        "--listen", "tcp://127.0.0.1:0", "--chdir", str(layout / "current"),
        command=[sys.executable, str(HERE / "children" / "server.py")],
    )  # fmt: skip
    (layout / "current").unlink()
    os.symlink("releases/does-not-exist", layout / "current")
    done = sup.cli("reload")
    assert done.returncode == 1
    assert "is not a directory" in done.stdout, done.stdout
    assert "rolled back" in done.stdout, done.stdout
    assert sup.status()["active_generation"] == 1
    assert sup.stop() == 0


@pytest.mark.parametrize("shell", ["/bin/sh", None], ids=["sh-shim", "python-shim"])
def test_spawn_shims_change_directory_before_the_exec(tmp_path: Path, shell: str | None) -> None:
    from nodrop.systemd.spawn import shim_argv

    target = tmp_path / "release"
    target.mkdir()
    argv = shim_argv(
        [
            sys.executable,
            "-c",
            "import os; print(os.getcwd(), os.environ['LISTEN_PID'] == str(os.getpid()))",
        ],
        shell,
        str(target),
    )
    done = subprocess.run(argv, capture_output=True, text=True, timeout=30, check=True, cwd="/")
    assert done.stdout.split() == [str(target), "True"]
    missing = shim_argv(["true"], shell, str(tmp_path / "gone"))
    assert subprocess.run(missing, capture_output=True, timeout=30, check=False).returncode != 0
