"""The release: version and changelog agree, `python -m build` makes an sdist
and a wheel that hold what a user needs, the wheel installs into a fresh
virtualenv and with pipx and runs a real supervisor, and CI's tests import
the installed wheel rather than the source tree.

The sdist and the wheel come from :mod:`release_fixtures`.
"""

from __future__ import annotations

import json
import os
import re
import select
import shutil
import subprocess
import sys
import tarfile
import time
import venv
import zipfile
from pathlib import Path

import pytest

import nodrop
from conftest import Procs
from nodrop.supervisor.control import request
from nodrop.systemd.receiver import NotifyReceiver
from release_fixtures import ROOT, VERSION, built_dist, wheel_of


@pytest.fixture(scope="session")
def dist(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return built_dist(tmp_path_factory)


pytestmark = pytest.mark.slow


def test_changelog_starts_with_this_version() -> None:
    text = (ROOT / "CHANGELOG.md").read_text()
    # Changes not released yet go under "## Unreleased", above the version.
    versions = [v for v in re.findall(r"^## (\S+)", text, flags=re.MULTILINE) if v != "Unreleased"]
    assert versions, "CHANGELOG.md has no '## VERSION' heading"
    assert versions[0] == VERSION, (versions[0], VERSION)
    assert len(versions) == len(set(versions))


def test_version_is_pep440_release() -> None:
    assert re.fullmatch(r"\d+\.\d+\.\d+(\.dev\d+|rc\d+)?", VERSION), VERSION


def test_wheel_holds_the_package_and_the_command(dist: Path) -> None:
    with zipfile.ZipFile(wheel_of(dist)) as whl:
        names = set(whl.namelist())
        meta = whl.read(f"nodrop-{VERSION}.dist-info/METADATA").decode()
        entry_points = whl.read(f"nodrop-{VERSION}.dist-info/entry_points.txt").decode()
    for needed in (
        "nodrop/py.typed",
        "nodrop/_version.py",
        "nodrop/demo/app.py",
        "nodrop/adapters/uvicorn.py",
        "nodrop/adapters/gunicorn.py",
        "nodrop/supervisor/supervisor.py",
    ):
        assert needed in names, needed
    assert not [n for n in names if n.startswith("tests/")]
    assert f"Version: {VERSION}" in meta
    assert "Requires-Python: >=3.11" in meta
    assert "Requires-Dist" not in meta.split("Provides-Extra")[0]  # no runtime dependency
    assert "nodrop = nodrop.cli:main" in entry_points


def test_sdist_holds_what_a_rebuild_needs(dist: Path) -> None:
    with tarfile.open(dist / f"nodrop-{VERSION}.tar.gz") as sdist:
        names = set(sdist.getnames())
    prefix = f"nodrop-{VERSION}/"
    for needed in (
        "pyproject.toml",
        "README.md",
        "LICENSE",
        "CHANGELOG.md",
        "src/nodrop/__init__.py",
    ):
        assert prefix + needed in names, needed


def run_installed_supervisor(procs: Procs, tmp_path: Path, nodrop_bin: Path, python: Path) -> None:
    """The installed `nodrop` runs the bundled demo app (imported from the same
    install), reloads it and stops it."""
    notify = NotifyReceiver(str(tmp_path / "notify.sock"))
    control = str(tmp_path / "control.sock")
    log_path = tmp_path / "supervisor.log"
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "NODROP_CONTROL")}
    env["NOTIFY_SOCKET"] = notify.path
    try:
        with open(log_path, "wb") as log:
            proc = procs.popen(
                [
                    str(nodrop_bin),
                    "run",
                    "--control",
                    control,
                    "--listen",
                    "tcp://127.0.0.1:0",
                    "--",
                    str(python),
                    "-m",
                    "nodrop.demo.app",
                ],
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=str(tmp_path),  # not the checkout: nothing imported from src/
            )
        deadline = time.monotonic() + 30
        while True:
            assert time.monotonic() < deadline, log_path.read_text()
            if select.select([notify], [], [], 0.5)[0]:
                note = notify.receive()
                if note is not None and note.fields.get("READY") == "1":
                    break
            assert proc.poll() is None, log_path.read_text()
        reload = subprocess.run(
            [str(nodrop_bin), "reload", "--control", control, "--json"],
            capture_output=True,
            text=True,
            timeout=60,
            env=env,
            check=False,
        )
        assert reload.returncode == 0, reload.stdout + reload.stderr + log_path.read_text()
        assert json.loads(reload.stdout)["generation"] == 2
        status = request(control, "status", timeout=10)
        assert status["active_generation"] == 2
        request(control, "stop", timeout=60)
        assert proc.wait(timeout=30) == 0
    finally:
        notify.close()


def test_wheel_installs_into_a_fresh_venv_and_runs(
    dist: Path, tmp_path: Path, procs: Procs
) -> None:
    env_dir = tmp_path / "venv"
    venv.EnvBuilder(with_pip=True).create(env_dir)
    pip = subprocess.run(
        [
            str(env_dir / "bin" / "python"),
            "-m",
            "pip",
            "install",
            "-q",
            "--no-index",
            str(wheel_of(dist)),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert pip.returncode == 0, pip.stdout + pip.stderr
    version = subprocess.run(
        [str(env_dir / "bin" / "nodrop"), "--version"],
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    )
    assert version.stdout.strip() == f"nodrop {VERSION}"
    run_installed_supervisor(
        procs, tmp_path, env_dir / "bin" / "nodrop", env_dir / "bin" / "python"
    )


@pytest.mark.skipif(
    shutil.which("pipx") is None and not (Path(sys.prefix) / "bin" / "pipx").exists(),
    reason="pipx is not installed (it is in the test extra)",
)
def test_pipx_installs_the_wheel(dist: Path, tmp_path: Path, procs: Procs) -> None:
    pipx = Path(sys.prefix) / "bin" / "pipx"
    env = dict(
        os.environ,
        PIPX_HOME=str(tmp_path / "pipx"),
        PIPX_BIN_DIR=str(tmp_path / "bin"),
        PIPX_MAN_DIR=str(tmp_path / "man"),
    )
    done = subprocess.run(
        [str(pipx if pipx.exists() else "pipx"), "install", str(wheel_of(dist))],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    app = tmp_path / "bin" / "nodrop"
    version = subprocess.run([str(app), "--version"], capture_output=True, text=True, timeout=30)
    assert version.stdout.strip() == f"nodrop {VERSION}"
    # pipx's own venv holds nodrop: the demo app runs from it, as an app's venv would.
    python = tmp_path / "pipx" / "venvs" / "nodrop" / "bin" / "python"
    run_installed_supervisor(procs, tmp_path, app, python)


def test_ci_tests_the_installed_wheel() -> None:
    if os.environ.get("NODROP_TESTED_FROM") != "wheel":
        pytest.skip("only under .ci/run, which installs the wheel (NODROP_TESTED_FROM=wheel)")
    location = Path(nodrop.__file__).resolve()
    assert "site-packages" in location.parts, location
    assert ROOT / "src" not in location.parents, location
    from importlib.metadata import distributions

    # The metadata beside the copy imported (not the first "nodrop" on sys.path,
    # which a test's working directory can shadow).
    (dist,) = distributions(name="nodrop", path=[str(location.parent.parent)])
    direct = dist.read_text("direct_url.json")
    assert direct is not None, direct
    assert '"editable": true' not in direct, direct
