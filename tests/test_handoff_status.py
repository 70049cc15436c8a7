"""What ``nodrop status`` says about the connection handoff, with a real
supervisor and real servers: per reload, how many connections were handed
over, returned (then closed with a signal), closed by the broker or lost;
the warning when workers of the active generation did not register; and
2,000 idle keep-alive connections across one reload.
"""

from __future__ import annotations

import importlib.util
import json
import resource
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from conftest import HERE
from nodrop.testing.waiting import wait_for
from supervisor_harness import SERVER, Start, Supervised
from test_metrics import families, sample

SERVERS = HERE / "children" / "servers"
sys.path.insert(0, str(SERVERS))

from stack_clients import IdleConnections  # noqa: E402

PY = sys.executable
UNREGISTERED = "did not register with the connection broker"

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("aiohttp") is None,
    reason="aiohttp is a test dependency (pip install -e '.[test]')",
)


def aiohttp_command() -> list[str]:
    # A keep-alive timeout longer than the test: only the reload may close.
    return [
        PY, "-m", "nodrop.adapters.aiohttp", "stack_aiohttp:create_app",
        "--keepalive-timeout", "120", "--drain-timeout", "20",
    ]  # fmt: skip


ENV = {"PYTHONPATH": ":".join([str(SERVERS), *sys.path]), "STARTUP_SECONDS": "0.1"}


def write_config(path: Path, command: list[str]) -> None:
    path.write_text(f"command = {json.dumps(command)}\n")


def last_ledger(sup: Supervised) -> dict[str, Any]:
    [ledger] = sup.status()["reloads"][-1]["ledger"]
    assert ledger["complete"], ledger
    return dict(ledger)


@pytest.fixture
def nofile() -> Iterator[None]:
    """Room for a few thousand sockets here and in the supervisor we start
    (children inherit the soft limit)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard < 8192:
        pytest.skip(f"RLIMIT_NOFILE hard limit {hard} is too low for 2,000 connections")
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, 8192), hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


@pytest.mark.slow
def test_status_counts_handed_over_and_returned_and_warns_once(
    supervise: Start, tmp_path: Path
) -> None:
    config = tmp_path / "nodrop.toml"
    write_config(config, aiohttp_command())
    sup = supervise(
        "--config", str(config), "--listen", "tcp://127.0.0.1:0", "--handoff",
        "--ready-grace", "0.1", "--drain-timeout", "30",
        command=[], env=ENV,
    )  # fmt: skip
    assert not [w for w in sup.status()["warnings"] if UNREGISTERED in w]
    n = 12
    with IdleConnections(sup.port(), n) as idle:
        assert idle.check()[0] == n
        # 1 -> 2: both generations take part: every idle connection moves.
        assert sup.reload(wait="drained")["ok"]
        ledger = last_ledger(sup)
        assert ledger["handed_over"] == n, ledger
        assert ledger["returned"] == ledger["closed_by_broker"] == 0, ledger
        assert ledger["closed_by_signal"] == ledger["lost"] == ledger["finished"] == 0, ledger
        ok, failures, generations = idle.check()
        assert (ok, failures, set(generations)) == (n, [], {"2"})
        # 2 -> 3: the new version runs a server without handoff support.
        write_config(config, SERVER)
        answer = sup.reload()
        assert answer["ok"], answer
        # Nobody registered to take them: the broker returns them, and the
        # old generation closes each after its next response.
        wait_for(lambda: sup.status()["handoff"]["returned"] >= n, 20, "the broker to return them")
        ok, failures, generations = idle.check()
        assert (ok, set(generations)) == (n, {"2"}), failures
        assert failures == [f"connection {i}: answered with Connection: close" for i in range(n)]

    def ledger_of_2() -> dict[str, Any] | None:
        entries = [e for r in sup.status()["reloads"] for e in r["ledger"]]
        return next((e for e in entries if e["generation"] == 2 and e["complete"]), None)

    ledger = wait_for(ledger_of_2, 20, "generation 2 to exit")
    assert ledger["returned"] == n, ledger
    assert ledger["handed_over"] == ledger["closed_by_broker"] == ledger["lost"] == 0, ledger
    assert ledger["finished"] == ledger["closed_by_signal"] == 0, ledger

    status = sup.status()
    warnings = [w for w in status["warnings"] if UNREGISTERED in w]
    assert len(warnings) == 1, status["warnings"]
    active = status["active_generation"]
    assert f"1 of 1 worker(s) of generation {active}" in warnings[0]
    assert "--no-handoff" in warnings[0]
    assert "does not support handoff" in warnings[0]
    # One log line for the generation that serves without registering.
    assert sup.log().count(UNREGISTERED) == 1, sup.log()[-3000:]

    text = sup.cli("status")
    assert f"{n} handed over" in text.stdout, text.stdout
    assert f"{n} returned (then closed with a signal)" in text.stdout, text.stdout
    assert "warning: connection handoff is on, but 1 of 1 worker(s)" in text.stdout
    prom = sup.cli("status", "--format", "prometheus").stdout
    fams = families(prom)
    total = "nodrop_drained_connections_total"
    assert sample(fams, "nodrop_drained_connections", total, fate="handed_over") == n
    assert sample(fams, "nodrop_drained_connections", total, fate="returned") == n
    unregistered = "nodrop_handoff_unregistered_workers"
    assert sample(fams, unregistered, unregistered) == 1
    assert sup.stop() == 0


@pytest.mark.slow
@pytest.mark.timeout(60)
def test_two_thousand_idle_connections_survive_a_reload(supervise: Start, nofile: None) -> None:
    n = 2000
    sup = supervise(
        "--listen", "tcp://127.0.0.1:0", "--workers", "2", "--handoff",
        "--ready-grace", "0.1", "--drain-timeout", "30",
        command=aiohttp_command(), env=ENV,
    )  # fmt: skip
    with IdleConnections(sup.port(), n) as idle:
        ok, failures, _ = idle.check()
        assert (ok, failures) == (n, [])
        answer = sup.reload(wait="drained")
        assert answer["ok"], answer
        ok, failures, generations = idle.check()
        assert failures == [], (failures[:10], sup.log()[-2000:])
        assert (ok, set(generations)) == (n, {"2"})
    ledger = last_ledger(sup)
    assert ledger["handed_over"] == n, ledger
    assert ledger["returned"] == ledger["closed_by_broker"] == ledger["lost"] == 0, ledger
    assert not [w for w in sup.status()["warnings"] if UNREGISTERED in w]
    assert sup.stop() == 0


@pytest.mark.slow
def test_handoff_is_on_by_default_and_quiet_for_servers_that_do_not_take_part(
    supervise: Start,
) -> None:
    """Without ``--handoff``: an adapter's idle connections move at a reload;
    a server without handoff support serves as before, with one note in the
    log at start and no warning in ``nodrop status`` (``--handoff`` warns)."""
    adapter = supervise(
        "--listen", "tcp://127.0.0.1:0", "--ready-grace", "0.1", "--drain-timeout", "30",
        command=aiohttp_command(), env=ENV,
    )  # fmt: skip
    n = 4
    with IdleConnections(adapter.port(), n) as idle:
        assert idle.check()[0] == n
        assert adapter.reload(wait="drained")["ok"]
        assert last_ledger(adapter)["handed_over"] == n
        ok, failures, generations = idle.check()
        assert (ok, failures, set(generations)) == (n, [], {"2"})
    assert adapter.status()["handoff"]["requested"] is False
    assert adapter.stop() == 0

    plain = supervise("--listen", "tcp://127.0.0.1:0", "--ready-grace", "0.1", command=SERVER)
    note = "connection handoff: 1 worker(s) of generation 1 did not register"
    wait_for(lambda: note in plain.log(), 10, "the note about the unregistered worker")
    assert plain.reload(wait="drained")["ok"]
    status = plain.status()
    assert status["handoff"]["registered_workers"] == []
    assert not [w for w in status["warnings"] if UNREGISTERED in w], status["warnings"]
    log = plain.log()
    assert log.count("did not register") == 1, log[-3000:]
    assert "warning:" not in log, log[-3000:]
    assert plain.stop() == 0
