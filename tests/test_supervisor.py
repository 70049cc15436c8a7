"""`nodrop run` end to end: real supervisor, real workers, real clients.

The timing logic (backoff, crash loops, drain timeout and cap, ready timeout
and grace) is tested on fake workers and virtual time in test_supervisor_fake.py.
"""

from __future__ import annotations

import concurrent.futures
import os
import signal
from pathlib import Path
from typing import Any

import pytest

from conftest import Procs
from nodrop.load import LoadConfig, Mode, run_load
from nodrop.load.control_reloader import ControlReloader
from nodrop.testing.waiting import wait_for
from supervisor_harness import SERVER, Start, http_get


def test_twenty_reloads_under_load_drop_nothing(supervise: Start) -> None:
    # The harness never reads the supervisor's own READY=1/RELOADING=1 after
    # start-up: its queue fills, and the supervisor must not block on it.
    sup = supervise(
        "--listen", "tcp://127.0.0.1:0?name=web", "--workers", "2", "--ready-grace", "0.05"
    )
    port = sup.port()
    config = LoadConfig(
        host="127.0.0.1",
        port=port,
        mode=Mode.CLOSE,
        concurrency=16,
        duration=8.0,
        processes=1,
        reload_every=0.3,
        reloads=20,
        timeout=5.0,
    )
    result = run_load(config, ControlReloader(sup.control))
    assert len(result.reloads) == 20
    assert all(r.ok for r in result.reloads), [r.message for r in result.reloads if not r.ok]
    assert result.ok > 1000, "the load generator barely ran"
    assert result.failed == 0, result.outcomes
    status = sup.status()
    assert status["active_generation"] == 21
    assert [g["state"] for g in status["generations"] if g["state"] != "exited"] == ["active"]
    assert sup.stop() == 0


def test_supervisor_speaks_systemd_notify(supervise: Start) -> None:
    sup = supervise("--listen", "tcp://127.0.0.1:0", "--ready-grace", "0")
    answer = sup.reload()
    assert answer["ok"]
    assert sup.wait_for_field("RELOADING").fields["MONOTONIC_USEC"].isdigit()
    ready = sup.wait_for_field("READY")
    assert "generation 2" in ready.fields["STATUS"]
    assert ready.pid == sup.proc.pid  # the supervisor's pid never changes
    os.kill(sup.proc.pid, signal.SIGTERM)
    sup.wait_for_field("STOPPING")
    assert sup.proc.wait(timeout=30) == 0


BROKEN = [
    (["--exit-at-start", "3"], "worker 1 exited with status 3 before it was ready", "boom"),
    (["--never-ready"], "was not ready within 1s", "READY=1"),
    (["--crash-after-ready", "0.05"], "exited with status 3", "after it was ready"),
]


WEB = "tcp://127.0.0.1:0?name=web"
"""Port 0: the kernel picks a port once; every reload keeps it (the listener's name)."""


def write_config(path: Path, tag: str, extra: list[str] | None = None, **keys: Any) -> None:
    command = [*SERVER, "--tag", tag, *(extra or [])]
    lines = [
        f"command = {command!r}".replace("'", '"'),
        f'listen = ["{WEB}"]',
    ]
    lines += [f"{k} = {v!r}".replace("'", '"') for k, v in keys.items()]
    path.write_text("\n".join(lines) + "\n")


@pytest.mark.parametrize(
    ("extra", "message", "detail"), BROKEN, ids=["exits", "never-ready", "crashes"]
)
def test_broken_new_version_rolls_back_and_old_keeps_serving(
    supervise: Start, tmp_path: Path, extra: list[str], message: str, detail: str
) -> None:
    cfg = tmp_path / "nodrop.toml"
    write_config(cfg, "v1", ready_timeout=1, ready_grace=0.5)
    sup = supervise("--config", str(cfg), command=[])
    port = sup.port()
    assert "tag=v1" in http_get(port)
    write_config(cfg, "v2", extra, ready_timeout=1, ready_grace=0.5)
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        load = pool.submit(
            run_load,
            LoadConfig(
                host="127.0.0.1",
                port=port,
                mode=Mode.CLOSE,
                concurrency=8,
                duration=2.5,
                processes=1,
            ),
        )
        done = sup.cli("reload")
        result = load.result()
    assert done.returncode == 1, done.stdout + done.stderr
    assert message in done.stdout
    assert detail in done.stdout
    assert "rolled back, the old generation keeps serving" in done.stdout
    assert result.failed == 0, result.outcomes
    assert "tag=v1" in http_get(port)
    status = sup.status()
    assert status["active_generation"] == 1
    assert status["reloads"][-1]["ok"] is False
    # A fixed version goes through afterwards.
    write_config(cfg, "v3", ready_timeout=5, ready_grace=0)
    assert sup.cli("reload").returncode == 0
    assert "tag=v3" in http_get(port)


def test_three_reloads_at_once_end_consistent(supervise: Start) -> None:
    sup = supervise("--listen", "tcp://127.0.0.1:0", "--ready-grace", "0.2")
    with concurrent.futures.ThreadPoolExecutor(3) as pool:
        answers = list(pool.map(lambda _: sup.reload(), range(3)))
    assert all(a["ok"] for a in answers), answers
    # The first starts generation 2; the two asked while it was starting are
    # coalesced into one more reload: generation 3.
    assert sorted(a["generation"] for a in answers) == [2, 3, 3]
    status = sup.status()
    assert status["active_generation"] == 3
    assert not status["reload_in_progress"]
    live = [g for g in status["generations"] if g["state"] not in ("exited", "failed")]
    wait_for(
        lambda: (
            [g["state"] for g in sup.status()["generations"] if g["state"] != "exited"]
            == ["active"]
        ),
        what="old generations to exit",
    )
    assert [g["generation"] for g in live if g["state"] == "active"] == [3]


def test_config_reload_adds_and_removes_listeners_keeping_the_kept_one(
    supervise: Start, tmp_path: Path
) -> None:
    cfg = tmp_path / "nodrop.toml"
    command = [*SERVER, "--tag", "v1"]
    cfg.write_text(
        f"command = {command!r}\n".replace("'", '"')
        + 'listen = ["tcp://127.0.0.1:0?name=keep", "tcp://127.0.0.1:0?name=drop"]\n'
        + "ready_grace = 0\n"
    )
    sup = supervise("--config", str(cfg), command=[])
    before = {item["name"]: item["inode"] for item in sup.status()["listeners"]}
    keep, drop = sup.port("keep"), sup.port("drop")
    # The kept one with a new backlog: still the same kernel socket (listen(2)
    # again updates the backlog in place) on the same port (port 0 keeps the
    # port it got, by name).
    cfg.write_text(
        f"command = {command!r}\n".replace("'", '"')
        + 'listen = ["tcp://127.0.0.1:0?name=add", "tcp://127.0.0.1:0?name=keep&backlog=64"]\n'
        + "ready_grace = 0\n"
    )
    answer = sup.reload(wait="drained")
    assert answer["ok"], answer
    listeners = {item["name"]: item for item in sup.status()["listeners"]}
    after = {name: item["inode"] for name, item in listeners.items()}
    assert after["keep"] == before["keep"], "the kept listener must be the same kernel socket"
    assert listeners["keep"]["backlog"] == 64
    assert set(after) == {"keep", "add"}
    assert sup.port("keep") == keep
    assert "gen=2" in http_get(keep)
    assert "gen=2" in http_get(sup.port("add"))
    with pytest.raises(ConnectionRefusedError):
        http_get(drop)


def test_bind_error_in_new_config_keeps_old_generation(supervise: Start, tmp_path: Path) -> None:
    import socket

    cfg = tmp_path / "nodrop.toml"
    write_config(cfg, "v1", ready_grace=0)
    sup = supervise("--config", str(cfg), command=[])
    port = sup.port()
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", 0))
        squatter.listen()
        busy = squatter.getsockname()[1]
        cfg.write_text(cfg.read_text().replace(f'"{WEB}"', f'"{WEB}", "tcp://127.0.0.1:{busy}"'))
        done = sup.cli("reload")
    assert done.returncode == 1
    assert f"cannot listen on tcp://127.0.0.1:{busy}" in done.stdout
    assert "keeps serving" in done.stdout
    assert "gen=1" in http_get(port)
    cfg.write_text("this is = not toml [")
    done = sup.cli("reload")
    assert done.returncode == 1
    assert "nodrop.toml" in done.stdout
    assert "gen=1" in http_get(port)


def test_crashed_worker_is_restarted(supervise: Start) -> None:
    sup = supervise("--listen", "tcp://127.0.0.1:0", "--workers", "2")
    victim = sup.status()["generations"][0]["workers"][1]["pid"]
    os.kill(victim, signal.SIGKILL)

    def restarted() -> dict[str, Any] | None:
        worker = sup.status()["generations"][0]["workers"][1]
        return worker if worker["pid"] != victim and worker["state"] == "ready" else None

    worker = wait_for(restarted, what="worker 2 to be restarted")
    assert isinstance(worker, dict)
    assert worker["restarts"] == 1
    assert "was killed by signal 9; restarting" in sup.log()
    assert "gen=1" in http_get(sup.port())


def test_status_cli_and_readiness_probe_exit_code(supervise: Start) -> None:
    sup = supervise("--listen", "tcp://127.0.0.1:0?name=web", "--workers", "2")
    done = sup.cli("status")
    assert done.returncode == 0
    assert "generation 1: active" in done.stdout
    assert "listener web: tcp 127.0.0.1:" in done.stdout
    assert "accept queue 0/4096" in done.stdout
    assert sup.cli("status", "--json").returncode == 0
    assert sup.cli("stop").returncode == 0
    assert sup.proc.wait(timeout=30) == 0
    gone = sup.cli("status")
    assert gone.returncode == 2
    assert "no supervisor answers" in gone.stderr


def test_first_generation_failing_is_a_clear_start_failure(procs: Procs, tmp_path: Path) -> None:
    import subprocess
    import sys

    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "nodrop",
            "run",
            "--control",
            str(tmp_path / "c.sock"),
            "--listen",
            "tcp://127.0.0.1:0",
            "--",
            *SERVER,
            "--exit-at-start",
            "7",
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 1
    assert (
        "could not start: generation 1, worker 1 exited with status 7 before it was ready"
        in done.stderr
    )


@pytest.mark.parametrize(
    ("args", "error"),
    [
        (["--listen", "tcp://127.0.0.1:99999"], "port must be a number"),
        (
            ["--listen", "tcp://127.0.0.1:0", "--ready", "soon"],
            "expected 'notify' or 'delay:SECONDS'",
        ),
        (["--listen", "tcp://127.0.0.1:0", "--workers", "0"], "workers must be between"),
        (["--listen", "tcp://127.0.0.1:0", "--drain-signal", "SIGNOPE"], "unknown signal"),
        ([], "nothing to listen on"),
    ],
)
def test_bad_command_lines_are_clear_errors(tmp_path: Path, args: list[str], error: str) -> None:
    import subprocess
    import sys

    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "nodrop",
            "run",
            "--control",
            str(tmp_path / "c.sock"),
            *args,
            "--",
            "true",
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2
    assert error in done.stderr


def test_reexec_keeps_serving_with_the_same_pid_sockets_and_workers(supervise: Start) -> None:
    sup = supervise(
        "--listen", "tcp://127.0.0.1:0?name=web", "--workers", "2", "--ready-grace", "0.05"
    )
    before = sup.status()
    workers_before = [w["pid"] for w in before["generations"][0]["workers"]]
    inode_before = before["listeners"][0]["inode"]
    port = sup.port()
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        load = pool.submit(
            run_load,
            LoadConfig(
                host="127.0.0.1",
                port=port,
                mode=Mode.CLOSE,
                concurrency=8,
                duration=3.0,
                processes=1,
            ),
        )
        outputs = [sup.cli("reexec") for _ in range(3)]
        result = load.result()
    for done in outputs:
        assert done.returncode == 0, done.stdout + done.stderr
    assert "re-exec #3" in outputs[-1].stdout
    assert result.failed == 0, result.outcomes
    assert result.ok > 100
    after = sup.status()
    assert after["pid"] == before["pid"] == sup.proc.pid
    assert after["reexecs"] == 3
    assert [w["pid"] for w in after["generations"][0]["workers"]] == workers_before
    assert after["listeners"][0]["inode"] == inode_before
    # The re-executed supervisor still reloads, reaps and stops.
    answer = sup.reload(wait="drained")
    assert answer["ok"]
    assert answer["old_exited"] is not None
    for pid in workers_before:
        assert not os.path.exists(f"/proc/{pid}")
    assert sup.stop() == 0


def test_drain_cap_kills_the_oldest_draining_generation(supervise: Start, tmp_path: Path) -> None:
    cfg = tmp_path / "nodrop.toml"
    write_config(
        cfg, "stubborn", ["--ignore-term"], drain_timeout=60, ready_grace=0, max_draining=1
    )
    sup = supervise("--config", str(cfg), command=[])
    port = sup.port()
    assert sup.reload()["ok"]  # generation 1 drains (and ignores SIGTERM)
    assert sup.reload()["ok"]  # generation 2 drains too: over the cap of 1
    wait_for(
        lambda: sup.status()["generations"][0]["state"] == "exited",
        what="generation 1 to be killed at the drain cap",
    )
    status = sup.status()
    gen1, gen2, gen3 = status["generations"][:3]
    assert gen1["note"] == "killed at the drain cap"
    assert gen1["workers"][0]["exit_code"] == -signal.SIGKILL
    assert gen2["state"] == "draining"
    assert gen3["state"] == "active"
    assert any("--max-draining" in w for w in status["warnings"])
    # (generation 2 ignores SIGTERM and keeps accepting on the shared socket,
    # so which generation answers a request is not fixed)
    assert "tag=stubborn" in http_get(port)
    # A second TERM while stopping kills the stubborn draining generation now.
    os.kill(sup.proc.pid, signal.SIGTERM)
    wait_for(lambda: sup.status()["stopping"], what="the supervisor to start stopping")
    os.kill(sup.proc.pid, signal.SIGTERM)
    assert sup.proc.wait(timeout=10) == 0
    assert "again: killing every worker now" in sup.log()
