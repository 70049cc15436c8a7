"""Fault matrix: exhausted resources (issue 13, item 4) -- the disk full for
the logs, RLIMIT_NOFILE reached while fds are received, the holder's TTL
running out during a slow start.

Each test asserts what the clients saw and the state nodrop ends in. The
limits are real: ``/dev/full`` (every write fails with ``ENOSPC``), a child
whose ``RLIMIT_NOFILE`` is lowered with ``prlimit``, a TTL that passes.
"""

from __future__ import annotations

import os
import resource
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from conftest import CHILDREN, Procs
from nodrop.connhandoff.broker import ConnectionBroker
from nodrop.connhandoff.client import Giver, GiveResult
from nodrop.errors import HolderError
from nodrop.holder import client as holder_client
from nodrop.load import run_load
from nodrop.load.outcome import Outcome
from nodrop.load.reload import ReloadRecord
from nodrop.testing.waiting import wait_for
from supervisor_harness import SERVER, Start, Supervised, close_mode_load
from test_broker import FakeHost, give_with_broker, run_broker, start_receiver
from test_broker import tcp_pairs as tcp_pairs  # a fixture
from test_holder import inode, listener, start_holder


def settled(sup: Supervised) -> list[str]:
    return [
        g["state"] for g in sup.status()["generations"] if g["state"] not in ("exited", "failed")
    ]


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of ``pid`` so far (/proc/PID/stat)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class Reloads:
    """Reloads through the control socket, keeping every answer."""

    def __init__(self, sup: Supervised) -> None:
        self.sup = sup
        self.answers: list[dict[str, Any]] = []

    def reload(self) -> ReloadRecord:
        started = time.monotonic()
        answer = self.sup.reload()
        self.answers.append(answer)
        done = time.monotonic()
        return ReloadRecord(started, None, None, bool(answer["ok"]), "reload", done)


# -- disk full for the logs -------------------------------------------------------------


def test_a_full_disk_for_the_logs_costs_log_lines_and_nothing_else(supervise: Start) -> None:
    """stdout and stderr of `nodrop run` on /dev/full (ENOSPC on every write)
    while its workers print without pause: two reloads under load, 0 failed
    requests; every worker of each generation stays up until it is drained
    (its output pipe is still read: none dies or blocks on it); the
    supervisor does not spin and says in `status` how many lines it lost."""
    sup = supervise(
        "--listen",
        "tcp://127.0.0.1:0?backlog=4096",
        "--workers",
        "2",
        "--ready-grace",
        "0.1",
        command=[*SERVER, "--tick", "0.002"],
        output="/dev/full",
    )
    port = sup.port()
    reloads = Reloads(sup)
    config = close_mode_load(port, reloads=2)
    result = run_load(config, reloads)
    failures = {k: v for k, v in result.outcomes.items() if k != Outcome.OK.label and v}
    assert not failures, failures
    assert result.ok > 100, "the load generator barely ran"
    assert [a["ok"] for a in reloads.answers] == [True, True], reloads.answers
    wait_for(lambda: settled(sup) == ["active"], 30, "the old generations to exit")
    status = sup.status()
    assert status["active_generation"] == 3
    assert status["restarts_total"] == 0  # no worker died on its output
    for gen in status["generations"]:
        assert [w["restarts"] for w in gen["workers"]] == [0, 0], gen
        if gen["state"] == "exited":
            assert [w["exit_code"] for w in gen["workers"]] == [0, 0], gen
        else:
            assert [w["state"] for w in gen["workers"]] == ["ready", "ready"], gen
    assert status["log_lines_lost"] > 100
    assert any("No space left on device" in w for w in status["warnings"]), status["warnings"]
    # Not spinning: the workers print 1,000 lines a second between them, and
    # the supervisor reads them all and fails to write each batch.
    before = cpu_seconds(sup.proc.pid)
    started = time.monotonic()
    threading.Event().wait(1.0)  # the measurement window itself
    used = cpu_seconds(sup.proc.pid) - before
    assert used < 0.5 * (time.monotonic() - started), f"supervisor used {used:.2f}s of CPU in 1s"
    assert sup.stop() == 0


def test_a_reader_that_stops_reading_the_logs_costs_log_lines_and_nothing_else(
    supervise: Start, tmp_path: Path
) -> None:
    """stdout and stderr of `nodrop run` on a pipe whose reader never reads
    (a stalled log collector): once the pipe is full a blocking write would
    freeze the supervisor's loop -- no reload, no worker output read, workers
    blocked on their own pipes. Lines are dropped and counted instead: two
    reloads under load, 0 failed requests, the lost lines in `status`."""
    fifo = tmp_path / "stalled-log"
    os.mkfifo(fifo)
    reader = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)  # open, never read
    try:
        sup = supervise(
            "--listen", "tcp://127.0.0.1:0?backlog=4096", "--workers", "2",
            "--ready-grace", "0.1",
            command=[*SERVER, "--tick", "0.002"], output=str(fifo),
        )  # fmt: skip
        reloads = Reloads(sup)
        result = run_load(close_mode_load(sup.port(), reloads=2), reloads)
        failures = {k: v for k, v in result.outcomes.items() if k != Outcome.OK.label and v}
        assert not failures, failures
        assert result.ok > 100, "the load generator barely ran"
        assert [a["ok"] for a in reloads.answers] == [True, True], reloads.answers
        wait_for(lambda: settled(sup) == ["active"], 30, "the old generations to exit")
        status = sup.status()
        assert status["active_generation"] == 3
        assert status["restarts_total"] == 0
        assert status["log_lines_lost"] > 100
        assert any("not reading" in w for w in status["warnings"]), status["warnings"]
        assert sup.stop() == 0
    finally:
        os.close(reader)


# -- RLIMIT_NOFILE reached while receiving fds ----------------------------------------------


def test_a_receiver_at_its_fd_limit_refuses_the_batch_and_another_takes_it(
    procs: Procs, tmp_path: Path, tcp_pairs: Any
) -> None:
    """A worker at RLIMIT_NOFILE receives a batch: the kernel truncates it
    (MSG_CTRUNC). It refuses the batch instead of losing it, so the broker
    gives those connections to a worker with room, at once: every one placed,
    none closed, and each still answers its client."""
    pairs = tcp_pairs(6)
    path = str(tmp_path / "broker.sock")
    receivers: list[subprocess.Popen[bytes]] = []

    async def scenario(broker: ConnectionBroker) -> GiveResult:
        def register() -> None:
            limited = start_receiver(procs, path, 100, "take-at-limit")
            assert limited.stdout is not None
            assert limited.stdout.readline().startswith(b"limit ")
            receivers.append(limited)
            receivers.append(start_receiver(procs, path, 100, "keep-room"))

        result = await give_with_broker(broker, [s for _, s in pairs], before=register)
        # While the broker runs (its close ends the receivers): each connection
        # lives in the worker that took it -- no FIN, no reset.
        for client, _ in pairs:
            client.sendall(b"x")
            client.setblocking(False)
            with pytest.raises(BlockingIOError):
                client.recv(1)
        return result

    host = FakeHost()
    started = time.monotonic()
    result, broker = run_broker(tmp_path, scenario, host, ack_timeout=20.0)
    # Refused, not timed out: the connections moved on without the 20 s wait.
    assert time.monotonic() - started < 10.0
    assert result == GiveResult(placed=6, closed=0, unknown=0, returned=())
    limited, roomy = receivers
    assert limited.stdout is not None
    assert roomy.stdout is not None
    refusal = limited.stdout.readline().decode()
    assert refusal.startswith("refused: file descriptors were truncated by the kernel"), refusal
    assert "RLIMIT_NOFILE" in refusal
    assert roomy.stdout.readline() == b"got 3\n"
    assert roomy.stdout.readline() == b"got 3\n"
    stats = broker.stats()
    assert (stats["placed"], stats["closed"], stats["refused_batches"]) == (6, 0, 1)
    for proc in receivers:
        assert proc.stdin is not None
        proc.stdin.close()
        assert proc.wait(timeout=10) == 0


def test_a_receiver_at_its_fd_limit_and_no_other_returns_the_batch_to_the_giver(
    procs: Procs, tmp_path: Path, tcp_pairs: Any
) -> None:
    """The only receiver is at its limit: the connections go back to the
    giver, untouched (it still owns them and nobody read from them)."""
    pairs = tcp_pairs(4)
    path = str(tmp_path / "broker.sock")
    receivers: list[subprocess.Popen[bytes]] = []

    async def scenario(broker: ConnectionBroker) -> GiveResult:
        def register() -> None:
            receivers.append(start_receiver(procs, path, 100, "take-at-limit"))

        return await give_with_broker(broker, [s for _, s in pairs], before=register)

    result, broker = run_broker(tmp_path, scenario, ack_timeout=20.0)
    assert result == GiveResult(placed=0, closed=0, unknown=0, returned=(0, 1, 2, 3))
    assert broker.stats()["closed"] == 0
    for client, server in pairs:  # still the giver's: it can serve them
        client.sendall(b"ping")
        assert server.recv(10) == b"ping"
    [limited] = receivers
    assert limited.stdin is not None
    limited.stdin.close()
    assert limited.wait(timeout=10) == 0


def test_the_broker_at_its_fd_limit_refuses_a_batch_and_the_giver_keeps_it(
    procs: Procs, tmp_path: Path, tcp_pairs: Any
) -> None:
    """The supervisor's broker at RLIMIT_NOFILE: a draining worker's batch
    is truncated on the way in. The broker says so; the giver gets every
    connection back, open and unread, and the broker serves on."""
    pairs = tcp_pairs(5)
    path = str(tmp_path / "broker.sock")
    proc = procs.popen(
        [sys.executable, str(CHILDREN / "broker_at_limit.py"), path],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
    )
    assert proc.stdout is not None
    assert proc.stdin is not None
    assert proc.stdout.readline().startswith(b"limit ")
    giver = Giver.connect(path, timeout=10)
    try:
        result = giver.give([s for _, s in pairs])
    finally:
        giver.close()
    assert result == GiveResult(placed=0, closed=0, unknown=0, returned=(0, 1, 2, 3, 4))
    for client, server in pairs:
        client.sendall(b"ping")
        assert server.recv(10) == b"ping"
    log = proc.stdout.readline().decode()
    assert "handoff peer dropped: file descriptors were truncated by the kernel" in log, log
    # It still serves: a giver of one connection (room for it) is answered.
    giver = Giver.connect(path, timeout=10)
    try:
        assert giver.give([pairs[0][1]]).returned == (0,)  # no receiver: back to us
    finally:
        giver.close()
    proc.stdin.close()
    assert proc.wait(timeout=10) == 0


def test_the_holder_at_its_fd_limit_refuses_a_deposit_and_keeps_what_it_held(
    procs: Procs, tmp_path: Path
) -> None:
    """`nodrop hold` at RLIMIT_NOFILE: a deposit of three sockets is refused
    with the reason, the depositor keeps its sockets (still listening), the
    socket held before stays held, and the holder serves on (no spin)."""
    holder = start_holder(procs, tmp_path)
    kept = listener()
    holder_client.deposit(holder.path, {"kept": kept}, ttl=60)
    kept_inode = inode(kept)
    kept.close()
    socks = {f"web{i}": listener() for i in range(3)}
    limits = resource.prlimit(holder.pid, resource.RLIMIT_NOFILE)
    room = holder.fd_count() + 2  # the depositor's connection and one fd
    # The soft limit is the one the kernel enforces; the hard one stays, so
    # the limit can be given back (lowering it needs no privilege, raising it does).
    resource.prlimit(holder.pid, resource.RLIMIT_NOFILE, (room, limits[1]))
    try:
        with pytest.raises(HolderError) as refused:
            holder_client.deposit(holder.path, socks, ttl=60)
        assert "file descriptors were truncated by the kernel" in str(refused.value)
        assert "RLIMIT_NOFILE" in str(refused.value)
        for sock in socks.values():  # still ours, still listening
            assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN) == 1
        before = cpu_seconds(holder.pid)
        assert [(h.name, h.inode) for h in holder_client.list_parked(holder.path)] == [
            ("kept", kept_inode)
        ]
        assert cpu_seconds(holder.pid) - before < 0.5
    finally:
        resource.prlimit(holder.pid, resource.RLIMIT_NOFILE, limits)
    # With room again, the same deposit goes through.
    assert len(holder_client.deposit(holder.path, socks, ttl=60).ids) == 3
    for sock in socks.values():
        sock.close()
    assert len(holder_client.list_parked(holder.path)) == 4
    assert "truncated" in holder.log_text()
    holder_client.release(holder.path, everything=True)


def test_a_claimant_at_its_fd_limit_fails_clearly_and_the_holder_keeps_the_sockets(
    procs: Procs, tmp_path: Path
) -> None:
    """`nodrop exec` at RLIMIT_NOFILE claims 40 sockets: a one-line error, the
    command is never run, and the holder still holds all 40."""
    holder = start_holder(procs, tmp_path)
    socks = {f"web{i}": listener() for i in range(40)}
    holder_client.deposit(holder.path, socks, ttl=60)
    for sock in socks.values():
        sock.close()
    marker = tmp_path / "ran"
    limited = (
        "import os, resource, sys\n"
        "resource.setrlimit(resource.RLIMIT_NOFILE, (24, 24))\n"
        "os.execv(sys.executable, [sys.executable, *sys.argv[1:]])\n"
    )
    proc = procs.python(
        limited,
        "-m",
        "nodrop",
        "exec",
        "--from-holder",
        holder.path,
        "--",
        "touch",
        str(marker),
        stderr=subprocess.PIPE,
    )
    _, err = proc.communicate(timeout=60)
    lines = err.decode().splitlines()
    assert proc.returncode == 2, err
    assert len(lines) == 1, lines
    assert lines[0].startswith("nodrop exec: claim failed:"), lines
    assert "truncated" in lines[0]
    assert not marker.exists()
    assert len(holder_client.list_parked(holder.path)) == 40
    holder_client.release(holder.path, everything=True)
