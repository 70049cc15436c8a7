"""Metrics and the per-reload ledger: Prometheus' own parser reads what a
running supervisor exposes (``--metrics`` and ``status --format
prometheus``), the ledger counts real connections by fate, and the JSON log
carries reloads and ledgers. The parsers under them are tested table-driven.
"""

from __future__ import annotations

import json
import os
import socket
import struct
import sys
import urllib.request
from collections.abc import Iterator
from contextlib import ExitStack
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from conftest import CHILDREN, wait_for
from nodrop.supervisor import procfs, sockdiag
from nodrop.supervisor.metrics import Histogram, render_prometheus
from supervisor_harness import Start

DEMO = [sys.executable, "-m", "nodrop.demo.app"]


def families(text: str) -> dict[str, Any]:
    return {f.name: f for f in text_string_to_metric_families(text)}


def sample(fams: dict[str, Any], family: str, sample_name: str, **labels: str) -> float:
    for s in fams[family].samples:
        if s.name == sample_name and all(s.labels.get(k) == v for k, v in labels.items()):
            return float(s.value)
    raise KeyError((family, sample_name, labels))


# -- pure -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("link", "inode"),
    [("socket:[123]", 123), ("pipe:[5]", None), ("/dev/null", None), ("socket:[x]", None)],
)
def test_parse_socket_link(link: str, inode: int | None) -> None:
    assert procfs.parse_socket_link(link) == inode


def test_served_connections_are_the_ones_on_listener_ports() -> None:
    table = {
        1: sockdiag.Connection(1, "127.0.0.1", 8000, sockdiag.TCP_ESTABLISHED),
        2: sockdiag.Connection(2, "10.0.0.5", 8000, sockdiag.TCP_CLOSE_WAIT),
        3: sockdiag.Connection(3, "127.0.0.1", 41000, sockdiag.TCP_ESTABLISHED),  # outgoing
        4: sockdiag.Connection(4, "127.0.0.1", 9000, sockdiag.TCP_ESTABLISHED),
    }
    held = {1, 2, 3, 4, 99}
    assert procfs.served_connections(held, table, {("127.0.0.1", 8000)}) == {1}
    assert procfs.served_connections(held, table, {("0.0.0.0", 8000)}) == {1, 2}
    assert procfs.served_connections(held, table, {("::", 9000), ("127.0.0.1", 8000)}) == {1, 4}


def diag_message(family: int, state: int, ip: bytes, port: int, inode: int) -> bytes:
    sockid = struct.pack(">HH16s16s", port, 5555, ip.ljust(16, b"\0"), b"\0" * 16) + b"\0" * 12
    body = (
        struct.pack("=BBBB", family, state, 0, 0)
        + sockid
        + struct.pack("=IIIII", 0, 0, 0, 0, inode)
    )
    return struct.pack("=IHHII", 16 + len(body), sockdiag.SOCK_DIAG_BY_FAMILY, 2, 1, 0) + body


def test_sock_diag_messages_parse() -> None:
    v4 = diag_message(socket.AF_INET, 1, bytes([127, 0, 0, 1]), 8000, 42)
    mapped = diag_message(
        socket.AF_INET6, 8, b"\0" * 10 + b"\xff\xff" + bytes([10, 0, 0, 1]), 80, 7
    )
    done = struct.pack("=IHHII", 20, sockdiag.NLMSG_DONE, 2, 1, 0) + b"\0" * 4
    conns, last = sockdiag.parse_messages(v4 + mapped)
    assert not last
    assert conns == [
        sockdiag.Connection(42, "127.0.0.1", 8000, 1),
        sockdiag.Connection(7, "10.0.0.1", 80, 8),
    ]
    assert sockdiag.parse_messages(done) == ([], True)
    request = sockdiag.dump_request(socket.AF_INET, (sockdiag.TCP_ESTABLISHED,))
    length, kind, flags, _, _ = struct.unpack_from("=IHHII", request)
    assert (length, kind, flags) == (len(request), 20, 0x301)
    assert struct.unpack_from("=BBBBI", request, 16) == (socket.AF_INET, 6, 0, 0, 1 << 1)


def test_sock_diag_sees_a_real_connection() -> None:
    with socket.create_server(("127.0.0.1", 0)) as server:
        client = socket.create_connection(server.getsockname())
        conn, _ = server.accept()
        with client, conn:
            import os

            inode = os.fstat(conn.fileno()).st_ino
            seen = sockdiag.connections()
            assert inode in seen, "sock_diag did not list an established connection"
            assert seen[inode].local_port == server.getsockname()[1]


def test_sock_diag_port_filter_bytecode() -> None:
    code = sockdiag.port_filter([9000, 8000, 8000])
    ops = [struct.unpack_from("=BBH", code, i) for i in range(0, len(code), 4)]
    assert ops == [
        (sockdiag.INET_DIAG_BC_S_EQ, 8, 12), (0, 0, 8000), (sockdiag.INET_DIAG_BC_JMP, 4, 20),
        (sockdiag.INET_DIAG_BC_S_EQ, 8, 12), (0, 0, 9000), (sockdiag.INET_DIAG_BC_JMP, 4, 8),
        (sockdiag.INET_DIAG_BC_JMP, 4, 8),
    ]  # fmt: skip
    request = sockdiag.dump_request(socket.AF_INET, ports=[8000])
    assert struct.unpack_from("=I", request)[0] == len(request) == 16 + 56 + 4 + 16
    assert struct.unpack_from("=HH", request, 72) == (20, sockdiag.INET_DIAG_REQ_BYTECODE)
    error = struct.pack("=IHHIIi", 36, sockdiag.NLMSG_ERROR, 0, 1, 0, -22) + b"\0" * 16
    assert sockdiag.is_error(error)
    assert not sockdiag.is_error(struct.pack("=IHHIIi", 36, sockdiag.NLMSG_ERROR, 0, 1, 0, 0))
    assert not sockdiag.is_error(struct.pack("=IHHII", 20, sockdiag.NLMSG_DONE, 2, 1, 0))


def test_sock_diag_filters_by_port_in_the_kernel() -> None:
    with (
        socket.create_server(("127.0.0.1", 0)) as one,
        socket.create_server(("127.0.0.1", 0)) as two,
    ):
        pairs = [(socket.create_connection(s.getsockname()), s) for s in (one, two, two)]
        accepted = [s.accept()[0] for _, s in pairs]
        try:
            port = two.getsockname()[1]
            mine = {os.fstat(c.fileno()).st_ino for c in accepted[1:]}
            everything = sockdiag.connections()
            filtered = sockdiag.connections([port])
            assert set(filtered) == mine
            assert {i for i, c in everything.items() if c.local_port == port} == mine
            assert sockdiag.connections([]) == {}
        finally:
            for sock in [c for c, _ in pairs] + accepted:
                sock.close()


def test_histogram_is_cumulative() -> None:
    h = Histogram((0.1, 1.0))
    for value in (0.05, 0.5, 2.0):
        h.observe(value)
    assert h.to_dict() == {"buckets": [[0.1, 1], [1.0, 2]], "sum": 2.55, "count": 3}


def test_exposition_parses_and_escapes_labels() -> None:
    status = {
        "name": 'we"ird\\name',
        "version": "0.2.0",
        "strategy": "inherit",
        "active_generation": 3,
        "stopping": False,
        "uptime": 12.5,
        "generations": [{"workers": [{"state": "ready"}, {"state": "draining"}]}],
        "listeners": [{"name": "web", "address": "127.0.0.1:80", "accept_queue": 2, "backlog": 9}],
        "metrics": {"reloads": {"ok": 2, "rolled_back": 1, "failed": 0}},
        "restarts_total": 4,
        "handoff": None,
    }
    fams = families(render_prometheus(status))
    assert sample(fams, "nodrop_info", "nodrop_info", name='we"ird\\name', version="0.2.0") == 1
    assert sample(fams, "nodrop_reloads", "nodrop_reloads_total", outcome="rolled_back") == 1
    assert sample(fams, "nodrop_workers", "nodrop_workers", state="draining") == 1
    assert sample(fams, "nodrop_accept_queue", "nodrop_accept_queue", listener="web") == 2
    assert sample(fams, "nodrop_worker_restarts", "nodrop_worker_restarts_total") == 4
    assert fams["nodrop_reloads"].type == "counter"


# -- a running supervisor ----------------------------------------------------------


def keepalive_connections(port: int, count: int) -> Iterator[socket.socket]:
    """``count`` connections that each had one answer and now sit idle."""
    for _ in range(count):
        conn = socket.create_connection(("127.0.0.1", port), timeout=5)
        conn.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        data = b""
        while b"\r\n\r\n" not in data or not data.endswith(b"\n"):
            chunk = conn.recv(4096)
            assert chunk, "closed before answering"
            data += chunk
        yield conn


def held_connections(pid: int, port: int) -> set[int]:
    held = procfs.sockets_of([pid]) or set()
    return procfs.served_connections(held, sockdiag.connections(), {("127.0.0.1", port)})


def scrape(address: str) -> str:
    with urllib.request.urlopen(f"http://{address}/metrics", timeout=10) as reply:
        assert reply.headers["Content-Type"].startswith("text/plain; version=0.0.4")
        return str(reply.read().decode())


@pytest.mark.slow
@pytest.mark.parametrize("handoff", [False, True], ids=["drain", "handoff"])
def test_scrape_and_ledger_of_a_running_supervisor(supervise: Start, handoff: bool) -> None:
    sup = supervise(
        "--listen", "tcp://127.0.0.1:0", "--metrics", "tcp://127.0.0.1:0",
        "--ready-grace", "0", "--log-format", "json",
        *(["--handoff"] if handoff else ["--no-handoff"]),
        command=DEMO,
    )  # fmt: skip
    port = sup.port()
    address = sup.status()["metrics_address"]
    with ExitStack() as stack:
        for conn in keepalive_connections(port, 5):
            stack.enter_context(conn)
        answer = sup.reload(wait="drained")
        assert answer["ok"], answer
    ledger = sup.status()["reloads"][-1]["ledger"]
    assert len(ledger) == 1, ledger
    assert ledger[0]["complete"], ledger
    entry = ledger[0]
    assert entry["generation"] == 1
    assert entry["replaced_by"] == 2
    assert entry["open_at_drain"] == 5, entry
    assert entry["closed_by_signal"] == 0
    assert entry["lost"] == 0
    if handoff:
        assert entry["handed_over"] == 5, entry
        assert entry["finished"] == 0, entry
    else:
        assert entry["handed_over"] == 0, entry
        assert entry["finished"] == 5, entry
    # Where the reload's time went: the app's part and nodrop's (issue 16, item 3).
    timing = sup.status()["reloads"][-1]["timing"]
    assert set(timing) == {"control_plane", "app_start", "ready_grace", "stop_accepting", "drain"}
    assert timing["drain"] == entry["drain_duration"], (timing, entry)
    assert all(value >= 0 for value in timing.values()), timing
    assert timing["app_start"] > 0, timing
    text = sup.cli("status")
    assert "time: nodrop " in text.stdout, text.stdout
    assert ", app start " in text.stdout, text.stdout
    sup.reload()  # a second reload, and one that fails
    fams = families(scrape(address))
    assert sample(fams, "nodrop_reloads", "nodrop_reloads_total", outcome="ok") == 2
    assert (
        sample(fams, "nodrop_reload_duration_seconds", "nodrop_reload_duration_seconds_count") == 2
    )
    assert sample(fams, "nodrop_time_to_ready_seconds", "nodrop_time_to_ready_seconds_count") == 3
    assert sample(fams, "nodrop_accept_stop_seconds", "nodrop_accept_stop_seconds_count") == 2
    assert sample(fams, "nodrop_drain_duration_seconds", "nodrop_drain_duration_seconds_count") >= 1
    fate = "handed_over" if handoff else "finished"
    assert (
        sample(fams, "nodrop_drained_connections", "nodrop_drained_connections_total", fate=fate)
        == 5
    )
    assert sample(fams, "nodrop_workers", "nodrop_workers", state="ready") == 1
    assert sample(fams, "nodrop_accept_queue", "nodrop_accept_queue") == 0
    assert sample(fams, "nodrop_up", "nodrop_up") == 1
    if handoff:
        assert (
            sample(
                fams,
                "nodrop_handoff_connections",
                "nodrop_handoff_connections_total",
                event="placed",
            )
            == 5
        )
    # The CLI prints the same exposition.
    cli = sup.cli("status", "--format", "prometheus")
    assert cli.returncode == 0, cli.stderr
    assert sample(families(cli.stdout), "nodrop_reloads", "nodrop_reloads_total", outcome="ok") == 2
    with pytest.raises(urllib.error.HTTPError) as not_found:
        urllib.request.urlopen(f"http://{address}/", timeout=10)
    assert not_found.value.code == 404
    not_found.value.close()
    assert sup.stop() == 0
    # --log-format json: one object per line for the supervisor's own lines.
    records = [json.loads(line) for line in sup.log().splitlines() if line.startswith("{")]
    reloads = [r for r in records if r["event"] == "reload"]
    ledgers = [r for r in records if r["event"] == "ledger"]
    assert len(reloads) == 2
    assert reloads[0]["data"]["generation"] == 2
    assert ledgers
    assert ledgers[0]["data"]["open_at_drain"] == 5
    assert {"time", "pid", "level", "message"} <= set(reloads[0])


@pytest.mark.slow
def test_ledger_counts_connections_cut_by_the_drain_timeout(supervise: Start) -> None:
    server = [sys.executable, str(CHILDREN / "server.py"), "--ignore-term"]
    sup = supervise(
        "--listen", "tcp://127.0.0.1:0", "--ready-grace", "0", "--drain-timeout", "1",
        command=server,
    )  # fmt: skip
    port = sup.port()
    with ExitStack() as stack:
        # Requests in flight: connected, request not complete, the server waits for it.
        for _ in range(3):
            conn = stack.enter_context(socket.create_connection(("127.0.0.1", port), timeout=5))
            conn.sendall(b"GET / HTTP/1.1")  # no end of line: the server waits for more
        # The old generation must hold them (accepted) before the reload.
        worker = sup.status()["generations"][0]["workers"][0]["pid"]
        wait_for(lambda: len(held_connections(worker, port)) == 3, what="the server to accept 3")
        answer = sup.reload(wait="drained")
        assert answer["ok"], answer
    entry = sup.status()["reloads"][-1]["ledger"][0]
    assert entry["complete"], entry
    assert entry["closed_by_signal"] == 3, entry
    assert entry["finished"] == 0, entry
    assert entry["lost"] == 0, entry
    assert sup.stop() == 0
