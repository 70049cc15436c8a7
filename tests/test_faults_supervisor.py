"""Fault matrix: kill -9 of the supervisor, idle and in the middle of a
reload, under load; then the same ``nodrop run`` again (issue 13, C / item 2).

What clients see: not one failed request. What the second supervisor does:
serves within 2 s on the very same listening socket (no EADDRINUSE, no
refused connection), drains every worker of the first, and afterwards no
process of the first remains. The test process stands in for the service
manager: it is the subreaper that inherits the orphans (as systemd or PID 1
would), so it can prove each one exited.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from conftest import Procs, waitpid_status
from nodrop.load import run_load
from nodrop.load.reload import ReloadRecord
from nodrop.supervisor.recovery import read_state, state_path
from nodrop.testing.waiting import wait_for
from supervisor_harness import SERVER, Supervised, close_mode_load, http_get, start

PR_SET_CHILD_SUBREAPER = 36


def _may_take_fds() -> str | None:
    """Why pidfd_getfd(2) on a non-descendant is not allowed here, if it is not."""
    if os.geteuid() == 0:
        return None
    try:
        scope = Path("/proc/sys/kernel/yama/ptrace_scope").read_text().strip()
    except OSError:
        return None
    return None if scope == "0" else f"not root and kernel.yama.ptrace_scope={scope}"


pytestmark = pytest.mark.skipif(_may_take_fds() is not None, reason=str(_may_take_fds()))


@pytest.fixture
def subreaper() -> Iterator[list[int]]:
    """This process inherits the orphans (as the service manager would);
    the test lists their pids, and any still running at the end (a failed
    test) are killed and reaped."""
    libc = ctypes.CDLL(None, use_errno=True)
    assert libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) == 0
    orphans: list[int] = []
    try:
        yield orphans
    finally:
        libc.prctl(PR_SET_CHILD_SUBREAPER, 0, 0, 0, 0)
        for pid in orphans:
            with contextlib.suppress(ChildProcessError, ProcessLookupError):
                if os.waitpid(pid, os.WNOHANG) == (0, 0):
                    os.kill(pid, signal.SIGKILL)
                    os.waitpid(pid, 0)


class KillAndRestart:
    """A "reload" that is kill -9 of the supervisor and the same command again."""

    def __init__(
        self,
        procs: Procs,
        tmp_path: Path,
        first: Supervised,
        args: list[str],
        mid_reload: bool,
        adopted: list[int],
    ) -> None:
        self.adopted = adopted
        self.procs = procs
        self.tmp_path = tmp_path
        self.first = first
        self.args = args
        self.mid_reload = mid_reload
        self.second: Supervised | None = None
        self.orphans: list[int] = []
        self.killed_at = 0.0
        self.serving_at = 0.0

    def reload(self) -> ReloadRecord:
        started = time.monotonic()
        if self.mid_reload:
            os.kill(self.first.proc.pid, signal.SIGHUP)
            wait_for(
                lambda: (
                    any(g["state"] == "starting" for g in self.first.status()["generations"])
                    or None
                ),
                30,
            )
        generations = self.first.status()["generations"]
        self.orphans = [
            w["pid"] for g in generations for w in g["workers"] if w["state"] != "exited"
        ]
        os.kill(self.first.proc.pid, signal.SIGKILL)
        self.first.proc.wait(timeout=10)
        self.killed_at = time.monotonic()
        self.second = start(
            self.procs,
            self.tmp_path / "second",
            *self.args,
            command=[*SERVER, "--ready-after", "0.2"],
            control=self.first.control,
        )
        self.serving_at = time.monotonic()
        return ReloadRecord(
            started, self.serving_at, None, True, "kill -9 and run again", self.serving_at
        )


@pytest.mark.parametrize(
    ("mid_reload", "strategy"),
    [(False, "inherit"), (True, "inherit"), (False, "reuseport")],
    ids=["idle", "mid-reload", "idle-reuseport"],
)
def test_kill_9_of_the_supervisor_under_load_loses_nothing(
    procs: Procs, tmp_path: Path, subreaper: list[int], mid_reload: bool, strategy: str
) -> None:
    (tmp_path / "second").mkdir()
    args = ["--listen", "tcp://127.0.0.1:0?name=web", "--workers", "2", "--ready-grace", "0.05"]
    args += ["--strategy", strategy]
    first = start(procs, tmp_path, *args, command=[*SERVER, "--ready-after", "0.2"])
    port = first.port()
    killer = KillAndRestart(procs, tmp_path, first, args, mid_reload, subreaper)
    config = close_mode_load(port)
    try:
        result = run_load(config, killer)
        second = killer.second
        assert second is not None
        assert result.ok > 500, "the load generator barely ran"
        assert result.failed == 0, result.outcomes
        took = killer.serving_at - killer.killed_at
        print(f"\nserving {took:.2f}s after the kill; {result.attempts} requests, 0 failed")
        assert took < 2.0, second.log()
        assert len(killer.orphans) == (4 if mid_reload else 2)
        # Every worker of the first supervisor was drained and exited (we reap it).
        for pid in killer.orphans:
            try:
                code = waitpid_status(pid, timeout=30)
            except TimeoutError as exc:
                raise AssertionError(f"{exc}\n{second.log()}\n{first.log()}") from None
            assert code == 0, second.log()
        status = second.status()
        first_new = 3 if mid_reload else 2
        assert status["active_generation"] == first_new, second.log()
        assert status["listeners"][0]["address"].endswith(f":{port}")
        assert http_get(port).startswith(f"gen={first_new} ")
        assert "taking over from supervisor pid" in second.log()
        wait_for(lambda: not second.status()["recovery"]["orphans"], 30)
        assert {w["pid"] for w in read_state(state_path(first.control))["workers"]} == {  # type: ignore[index]
            w["pid"] for w in status["generations"][-1]["workers"]
        }
        assert second.stop() == 0
        assert not os.path.exists(state_path(first.control))
    finally:
        first.notify.close()
        if killer.second is not None:
            killer.second.notify.close()


def test_orphans_that_write_to_stdout_survive_and_their_output_is_taken_over(
    procs: Procs, tmp_path: Path, subreaper: list[int]
) -> None:
    """Workers that write all the time (and die of SIGPIPE, as C programs do,
    if their stdout has no reader) outlive the supervisor's kill -9; the next
    supervisor passes their output on, tagged as before."""
    (tmp_path / "second").mkdir()
    args = ["--listen", "tcp://127.0.0.1:0", "--ready-grace", "0.05"]
    command = [*SERVER, "--tick", "0.01"]
    first = start(procs, tmp_path, *args, command=command)
    try:
        [worker] = first.status()["generations"][0]["workers"]
        subreaper.append(worker["pid"])
        wait_for(lambda: "[g1.w1] tick 5" in first.log(), 30, "ticks")
        first.proc.kill()
        first.proc.wait(timeout=10)
        # The worker, alone, writes on: with no reader it would die of SIGPIPE now.
        second = start(procs, tmp_path / "second", *args, command=command, control=first.control)
        try:
            assert waitpid_status(worker["pid"], timeout=30) == 0, second.log()
            ticks = [line for line in second.log().splitlines() if line.startswith("[g1.w1] tick")]
            assert ticks, second.log()
            assert second.stop() == 0
        finally:
            second.notify.close()
    finally:
        first.notify.close()


def test_a_stop_during_the_takeover_drains_the_orphans_too(
    procs: Procs, tmp_path: Path, subreaper: list[int]
) -> None:
    """The second supervisor is stopped before its own generation is ready:
    the service stops, so the orphans get their drain signal and exit; no
    state is left for a third."""
    first = start(procs, tmp_path, "--listen", "tcp://127.0.0.1:0", command=SERVER)
    try:
        orphans = [w["pid"] for w in first.status()["generations"][0]["workers"]]
        subreaper.extend(orphans)
        first.proc.kill()
        first.proc.wait(timeout=10)
        log = tmp_path / "second.log"
        with open(log, "wb") as out:
            second = procs.popen(
                [sys.executable, "-m", "nodrop", "run", "--control", first.control,
                 "--listen", "tcp://127.0.0.1:0", "--", *SERVER, "--never-ready"],
                stdout=out, stderr=subprocess.STDOUT,
                env=dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path)),
            )  # fmt: skip
        wait_for(lambda: "taking over from supervisor pid" in log.read_text(), 30)

        # Its signal handlers are in place once it writes its own state.
        def written_by_second() -> bool:
            state = read_state(state_path(first.control))
            return state is not None and state["supervisor"] == second.pid

        wait_for(written_by_second, 30, "the second supervisor's recovery state")
        second.send_signal(signal.SIGTERM)
        second.wait(timeout=30)
        for pid in orphans:
            assert waitpid_status(pid, timeout=30) == 0, log.read_text()
        assert not os.path.exists(state_path(first.control)), log.read_text()
    finally:
        first.notify.close()
