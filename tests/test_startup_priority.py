"""``--startup-priority``: parsing, the config file, and a real worker that
starts lowered and gets its priority back on READY=1."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from nodrop.errors import ConfigError
from nodrop.supervisor.config import (
    RunConfig,
    config_from_dict,
    config_to_dict,
    parse_config_text,
)
from nodrop.supervisor.priority import (
    LOW_NICE,
    StartupPriority,
    lower,
    parse_startup_priority,
    restore,
    threads_of,
)
from nodrop.testing.waiting import wait_for
from supervisor_harness import Start


@pytest.mark.parametrize(
    ("text", "want"),
    [
        ("normal", StartupPriority.NORMAL),
        (" Low ", StartupPriority.LOW),
        ("idle", StartupPriority.IDLE),
    ],
)
def test_parse(text: str, want: StartupPriority) -> None:
    assert parse_startup_priority(text) is want


def test_parse_refuses_other_words() -> None:
    with pytest.raises(ValueError, match="expected one of normal, low, idle"):
        parse_startup_priority("nice")


def test_config_file_and_reexec_round_trip() -> None:
    values = parse_config_text('startup_priority = "idle"\n')
    assert values["startup_priority"] is StartupPriority.IDLE
    with pytest.raises(ConfigError, match="startup priority 'fast'"):
        parse_config_text('startup_priority = "fast"\n')
    config = RunConfig(command=("app",), startup_priority=StartupPriority.LOW)
    assert config_from_dict(config_to_dict(config)) == config


def _policy_and_nice(pid: int) -> tuple[int, int]:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return int(fields[38]), int(fields[16])  # policy (field 41), nice (field 19)


def _thread_policy(pid: int, tid: int) -> int:
    fields = Path(f"/proc/{pid}/task/{tid}/stat").read_text().rsplit(")", 1)[1].split()
    return int(fields[38])


def test_lower_and_restore_a_real_process() -> None:
    own_policy = os.sched_getscheduler(0)
    own_nice = os.getpriority(os.PRIO_PROCESS, 0)
    # A thread started while lowered inherits the policy: restore() reaches it too.
    code = (
        "import sys, threading, time; sys.stdin.readline(); "
        "threading.Thread(target=time.sleep, args=(60,), daemon=True).start(); "
        "print(flush=True); time.sleep(60)"
    )
    with subprocess.Popen(
        [sys.executable, "-S", "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    ) as proc:
        assert proc.stdin is not None
        assert proc.stdout is not None
        try:
            assert lower(proc.pid, StartupPriority.IDLE) is None
            assert _policy_and_nice(proc.pid)[0] == os.SCHED_IDLE
            proc.stdin.write("go\n")
            proc.stdin.flush()
            proc.stdout.readline()
            tids = threads_of(proc.pid)
            assert len(tids) == 2
            assert {_thread_policy(proc.pid, t) for t in tids} == {os.SCHED_IDLE}
            why = restore(proc.pid, StartupPriority.IDLE)
            if why is not None:  # an unprivileged run without RLIMIT_NICE: said, not hidden
                assert "CAP_SYS_NICE" in why
                pytest.skip(why)
            assert _policy_and_nice(proc.pid)[0] == own_policy
            assert {_thread_policy(proc.pid, t) for t in tids} == {own_policy}
            assert lower(proc.pid, StartupPriority.LOW) is None
            assert _policy_and_nice(proc.pid)[1] == min(19, own_nice + LOW_NICE)
            assert restore(proc.pid, StartupPriority.LOW) is None
            assert _policy_and_nice(proc.pid) == (own_policy, own_nice)
        finally:
            proc.kill()
    assert restore(proc.pid, StartupPriority.IDLE) is None  # gone: not an error


def test_workers_start_idle_and_serve_at_normal_priority(supervise: Start, tmp_path: Path) -> None:
    seen = tmp_path / "policies"
    # The demo app, after writing down the scheduling policy it starts with.
    app = (
        "import os, runpy, sys; "
        f"open({str(seen)!r}, 'a').write(f'{{os.getpid()}} {{os.sched_getscheduler(0)}}\\n'); "
        "sys.argv = ['app']; runpy.run_module('nodrop.demo.app', run_name='__main__')"
    )
    sup = supervise(
        "--listen", "tcp://127.0.0.1:0", "--workers", "2", "--ready-grace", "0",
        "--startup-priority", "idle", command=[sys.executable, "-c", app],
    )  # fmt: skip
    own = os.sched_getscheduler(0)

    def active_pids() -> list[int]:
        status = sup.status()
        gen = next(
            g for g in status["generations"] if g["generation"] == status["active_generation"]
        )
        return [w["pid"] for w in gen["workers"]]

    def restored(pids: list[int]) -> bool:
        return all(_policy_and_nice(p)[0] == own for p in pids)

    for _ in range(2):  # the first start and a reload
        workers = active_pids()
        assert len(workers) == 2
        wait_for(lambda pids=workers: restored(pids), 10)  # type: ignore[misc]
        started = dict(line.split() for line in seen.read_text().splitlines())
        assert [started[str(p)] for p in workers] == [str(os.SCHED_IDLE)] * 2, started
        assert not [w for w in sup.status()["warnings"] if "priority" in w]
        assert sup.reload()["ok"]
    assert sup.stop() == 0
