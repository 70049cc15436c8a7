"""The container recipe, built and run for real with podman (Debian's package).

``examples/container/Dockerfile`` is built from this repository's wheel on a
base image made here (``debootstrap`` of Debian bookworm with python3 and
python3-venv, imported with ``podman import``: no registry is reachable),
uvicorn installed from wheels downloaded beforehand (``--network none``).
Then, inside the running container: nodrop is PID 1, ``nodrop status`` (the
HEALTHCHECK) exits 0, ``nodrop reload`` exits 0 and 100 new connections in a
row reach generation 2, and ``podman stop`` (SIGTERM to PID 1) ends the
container with exit status 0.

This machine's container runtime needs three settings, found by probing and
used only if the defaults fail: crun refuses hybrid cgroups here (``crun:
cgroups in hybrid mode not supported``), so ``--runtime runc
--cgroup-manager cgroupfs``; and podman's default RLIMIT_NOFILE/NPROC for
root exceed this sandbox's hard limits (``setrlimit RLIMIT_NOFILE: Operation
not permitted``), so ``--ulimit nofile=`` this process's own limits and
``--ulimit nproc=16384`` (65536 is refused by the runtime here).
When no setting works the test skips with the engine's own error.
"""

from __future__ import annotations

import json
import resource
import shutil
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from conftest import HERE
from release_fixtures import built_dist, wheel_of

ROOT = HERE.parent
BASE = "localhost/nodrop-base:bookworm"
_NOFILE = resource.getrlimit(resource.RLIMIT_NOFILE)
RUNC = ["--runtime", "runc", "--cgroup-manager", "cgroupfs"]
# Tried in order: the defaults, then runc with limits this sandbox allows
# (this process's RLIMIT_NOFILE; for RLIMIT_NPROC, which counts every
# process of the user on the host, the largest that the runtime may set).
ENGINE_SETTINGS: list[tuple[list[str], list[str]]] = [([], [])] + [
    (RUNC, ["--ulimit", "nofile={}:{}".format(*_NOFILE), "--ulimit", f"nproc={n}:{n}"])
    for n in (65536, 16384, 4096, 1024)
]

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(shutil.which("podman") is None, reason="podman is not installed"),
]


def run(argv: list[str], timeout: float = 600) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=False)


def make_base(tmp_path_factory: pytest.TempPathFactory) -> None:
    """A Debian bookworm image with python3 and venv, from Debian's packages."""
    if run(["podman", "image", "exists", BASE]).returncode == 0:
        return
    if shutil.which("debootstrap") is None:
        pytest.skip("no base image and no debootstrap to make one")
    rootfs = tmp_path_factory.mktemp("rootfs") / "bookworm"
    done = run(
        ["debootstrap", "--variant=minbase", "--include=python3,python3-venv", "bookworm",
         str(rootfs), "http://deb.debian.org/debian"],
        timeout=1200,
    )  # fmt: skip
    if done.returncode != 0:
        pytest.skip(f"debootstrap failed: {done.stderr[-2000:]}")
    tar = subprocess.Popen(["tar", "-C", str(rootfs), "-c", "."], stdout=subprocess.PIPE)
    imported = subprocess.run(
        ["podman", "import", "-", BASE], stdin=tar.stdout, capture_output=True, timeout=600
    )
    assert tar.stdout is not None
    tar.stdout.close()
    tar.wait(timeout=60)
    assert imported.returncode == 0, imported.stderr


@dataclass(frozen=True)
class Engine:
    """``podman`` with the global options and the run options that work here."""

    cmd: list[str]
    run_opts: list[str]


@pytest.fixture(scope="module")
def engine(tmp_path_factory: pytest.TempPathFactory) -> Engine:
    make_base(tmp_path_factory)
    errors = []
    for global_opts, run_opts in ENGINE_SETTINGS:
        probe = run(["podman", *global_opts, "run", "--rm", "--network", "none", *run_opts,
                     BASE, "python3", "-c", "import os; print(os.getpid())"], timeout=120)  # fmt: skip
        if probe.returncode == 0 and probe.stdout.strip() == "1":
            return Engine(["podman", *global_opts], run_opts)
        errors.append(f"podman {' '.join(global_opts + run_opts)}: {probe.stderr.strip()}")
    pytest.skip("no container can run on this machine:\n" + "\n".join(errors))


@pytest.fixture(scope="module")
def image(engine: Engine, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    context = tmp_path_factory.mktemp("context")
    (context / "examples" / "container").mkdir(parents=True)
    for name in ("Dockerfile", "app.py"):
        shutil.copy(ROOT / "examples" / "container" / name, context / "examples" / "container")
    (context / "dist").mkdir()
    shutil.copy(wheel_of(built_dist(tmp_path_factory)), context / "dist")
    fetched = run([sys.executable, "-m", "pip", "download", "-q", "--only-binary=:all:",
                   "-d", str(context / "dist"), "uvicorn==0.54.0"])  # fmt: skip
    assert fetched.returncode == 0, fetched.stderr
    tag = f"localhost/nodrop-example:test-{uuid.uuid4().hex[:8]}"
    run_opts = engine.run_opts
    built = run([*engine.cmd, "build", "--format", "docker", "--network", "none", *run_opts,
                 "--build-arg", f"BASE={BASE}",
                 "--build-arg", "PIP_INDEX_OPTS=--no-index --find-links /tmp/dist",
                 "-f", "examples/container/Dockerfile", "-t", tag, str(context)])  # fmt: skip
    assert built.returncode == 0, built.stdout[-3000:] + built.stderr[-3000:]
    yield tag
    run([*engine.cmd, "rmi", "-f", tag])


GET_100 = """
import urllib.request
bodies = [urllib.request.urlopen("http://127.0.0.1:8000/", timeout=5).read().decode()
          for _ in range(100)]
print("\\n".join(b.split()[0] for b in bodies))
"""


def test_image_runs_nodrop_as_pid1_and_reloads(engine: Engine, image: str) -> None:
    run_opts = engine.run_opts
    podman = engine.cmd
    name = f"nodrop-test-{uuid.uuid4().hex[:8]}"
    started = run([*podman, "run", "-d", "--name", name, "--network", "none", *run_opts, image])
    assert started.returncode == 0, started.stderr
    try:
        deadline = time.monotonic() + 60
        while run([*podman, "exec", name, "nodrop", "status"]).returncode != 0:
            # The readiness probe itself: nothing in the container to wait on from here.
            assert time.monotonic() < deadline, run([*podman, "logs", name]).stderr
            time.sleep(0.2)
        status = json.loads(run([*podman, "exec", name, "nodrop", "status", "--json"]).stdout)
        assert status["pid"] == 1, status
        assert status["active_generation"] == 1, status
        health = run([*podman, "healthcheck", "run", name])
        assert health.returncode == 0, health.stdout + health.stderr
        reload = run([*podman, "exec", name, "nodrop", "reload"])
        assert reload.returncode == 0, reload.stdout + reload.stderr
        seen = run([*podman, "exec", name, "python", "-c", GET_100])
        assert seen.returncode == 0, seen.stderr
        assert seen.stdout.split() == ["gen=2"] * 100
        stopped = run([*podman, "stop", "-t", "20", name], timeout=60)
        assert stopped.returncode == 0, stopped.stderr
        code = run([*podman, "inspect", name, "--format", "{{.State.ExitCode}}"]).stdout.strip()
        logs = run([*podman, "logs", name])
        assert code == "0", logs.stdout[-3000:] + logs.stderr[-3000:]
        assert "SIGTERM: stopping gracefully" in logs.stdout + logs.stderr
    finally:
        run([*podman, "rm", "-f", name], timeout=120)
