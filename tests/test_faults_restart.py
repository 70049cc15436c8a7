"""Fault matrix: a worker's restart that fails (out of fds, out of
processes) is retried with the backoff, and ``status`` says the generation
is short of workers meanwhile (issue 13, A)."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import resource
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from nodrop.commands.status import serving
from nodrop.supervisor.restarts import RestartPolicy
from nodrop.testing import FakeProcesses
from nodrop.testing.waiting import wait_for
from supervisor_harness import Start, http_get
from test_supervisor_fake import config, supervising, virtual


@virtual
async def test_a_restart_that_cannot_spawn_is_retried_with_the_backoff_and_shown(
    tmp_path: Path,
) -> None:
    restarts = RestartPolicy(backoff=(0.1, 1.0))
    async with supervising(tmp_path, config(workers=2), restarts=restarts) as h:
        fake: FakeProcesses = h.fake
        worker = fake.running()[1]
        fake.spawn_errors = [
            OSError(errno.EMFILE, "Too many open files"),
            OSError(errno.EAGAIN, "Resource temporarily unavailable"),
            OSError(errno.EMFILE, "Too many open files"),
        ]
        crashed = h.now
        fake.exit(worker.pid, -signal.SIGKILL)
        await asyncio.sleep(0.5)  # virtual: attempts at 0.1 and 0.3 s failed
        assert len(fake.spawn_errors) == 1
        status = h.sup.status()
        assert status["degraded"]
        assert status["summary"] == "generation 1 DEGRADED: serving with 1 of 2 worker(s)"
        assert not serving(dict(status))  # `nodrop status` exits 3
        new = await h.spawned(3)
        # first attempt at 0.1 s (the backoff), then 0.2, 0.4, 0.8 after each failure
        assert h.now - crashed == pytest.approx(0.1 + 0.2 + 0.4 + 0.8)
        assert new.env["NODROP_WORKER"] == "2"
        assert h.sup.status()["restart_failures"] == 3
        warnings = h.sup.status()["warnings"]
        assert sum("cannot restart worker 2 of generation 1" in w for w in warnings) == 3
        assert "trying again in 0.2s" in warnings[0]
        h.ready(new)
        status = h.sup.status()
        assert not status["degraded"]
        assert status["summary"] == "generation 1 serving with 2 worker(s)"
        assert serving(dict(status))


def test_a_real_worker_is_restarted_once_the_supervisor_has_fds_again(
    supervise: Start, tmp_path: Path
) -> None:
    """The attack of issue 13 A: the supervisor's fds are exhausted when a
    worker dies; once they are free again, the worker is back without a reload."""
    sup = supervise("--listen", "tcp://127.0.0.1:0")
    port = sup.port()
    [worker] = sup.status()["generations"][0]["workers"]
    limits = resource.prlimit(sup.proc.pid, resource.RLIMIT_NOFILE)
    # Only fds 0-2 may be opened: every pipe, socket and spawn fails with EMFILE.
    resource.prlimit(sup.proc.pid, resource.RLIMIT_NOFILE, (3, limits[1]))
    try:
        os.kill(worker["pid"], signal.SIGKILL)
        wait_for(lambda: "cannot restart worker 1 of generation 1" in sup.log(), 30, "EMFILE")
    finally:
        resource.prlimit(sup.proc.pid, resource.RLIMIT_NOFILE, limits)
    wait_for(lambda: sup.status()["generations"][0]["workers"][0]["state"] == "ready", 30)
    assert http_get(port).startswith("gen=1 ")
    cli = subprocess.run(
        [sys.executable, "-m", "nodrop", "status", "--control", sup.control],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert cli.returncode == 0, cli.stdout + cli.stderr
    assert "trying again in" in sup.log()


PIDS_CGROUP = Path("/sys/fs/cgroup/pids")


def _pids_cgroup_unavailable() -> str | None:
    if not os.access(PIDS_CGROUP, os.W_OK):
        return "no writable cgroup v1 pids controller at /sys/fs/cgroup/pids"
    return None


@pytest.mark.skipif(_pids_cgroup_unavailable() is not None, reason=str(_pids_cgroup_unavailable()))
def test_a_real_fork_failure_is_retried_and_status_says_degraded(
    supervise: Start, tmp_path: Path
) -> None:
    """Fork failure for real: the supervisor alone in a pids cgroup whose
    limit it has reached (RLIMIT_NPROC does not bind root; pids.max does),
    so posix_spawn fails with EAGAIN while its worker must be restarted."""
    sup = supervise("--listen", "tcp://127.0.0.1:0")
    port = sup.port()
    [worker] = sup.status()["generations"][0]["workers"]
    group = PIDS_CGROUP / f"nodrop-test-{os.getpid()}-{sup.proc.pid}"
    group.mkdir()
    try:
        (group / "cgroup.procs").write_text(str(sup.proc.pid))
        (group / "pids.max").write_text((group / "pids.current").read_text().strip())
        os.kill(worker["pid"], signal.SIGKILL)
        wait_for(lambda: "cannot restart worker 1 of generation 1" in sup.log(), 30, "EAGAIN")
        assert "Resource temporarily unavailable" in sup.log()
        cli = subprocess.run(
            [sys.executable, "-m", "nodrop", "status", "--control", sup.control],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert cli.returncode == 3, cli.stdout + cli.stderr
        assert "DEGRADED: serving with 0 of 1 worker(s)" in cli.stdout
        (group / "pids.max").write_text("max")
        wait_for(lambda: sup.status()["generations"][0]["workers"][0]["state"] == "ready", 30)
        assert http_get(port).startswith("gen=1 ")
        assert not sup.status()["degraded"]
    finally:
        (group / "pids.max").write_text("max")
        # The supervisor, and the worker it restarted in there, go back.
        for pid in (group / "cgroup.procs").read_text().split():
            with contextlib.suppress(OSError):
                (PIDS_CGROUP / "cgroup.procs").write_text(pid)
        group.rmdir()
