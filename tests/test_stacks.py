"""The stack matrix in CI: real apps on the servers people deploy, under
``nodrop run``, with the strictest clients.

For every cell of ``benchmarks/stack_matrix/cells.py`` (FastAPI on uvicorn with
asyncio+h11 and with uvloop+httptools, on gunicorn's three ASGI worker
classes and on hypercorn; plain ASGI; aiohttp; Django and Flask on gunicorn
sync and gthread):

* five reloads while ``http.client`` (persistent connections, idle gaps,
  /fast + /slow + /stream + 1 MB /echo, never retrying) and ``wrk`` (a new
  connection per request) run: zero failed requests;
* a new version whose start-up raises (``APP_VERSION=broken-start``) or
  whose module does not import (``import-error``): ``nodrop reload`` exits 1
  with the reason on its own line, and the old generation keeps serving
  with zero failed requests while the clients run.

The full form (10 reloads, every client, the servers' own reloads side by
side) is ``python benchmarks/stacks.py``. A cell whose server or client is
not installed is skipped with the reason. No cell is marked as expected to
fail: a failing cell fails, with every failure listed.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))

from stack_matrix.cells import APPS, CELLS, Cell, Kind, select  # noqa: E402
from stack_matrix.exercise import STRICT_CLIENTS, ClientSet, Load, Reloads, check_loop, probe  # noqa: E402
from stack_matrix.httpclients import HttpClientClient, HttpxClient  # noqa: E402
from stack_matrix.launch import (  # noqa: E402
    ReloadResult,
    app_env,
    child_pythonpath,
    nodrop_run_args,
    wait_drained,
    write_env_config,
)
from stack_matrix.mix import STREAM_EVENTS, Endpoint, Mix, judge  # noqa: E402
from stack_matrix.outcomes import Failure  # noqa: E402
from stack_matrix.wrk import WrkClient  # noqa: E402
from supervisor_harness import Supervised  # noqa: E402

RELOADS = 5
GAP = 0.3
"""Seconds of traffic after each reload is ready, before the next."""
STARTUP = 1.0
"""The apps' start-up time (lifespan, on_startup, WSGI import)."""
LOAD = Load(connections=4, wrk_connections=16)
MIN_ANSWERED = {"http.client": 10, "wrk-close": 200}
"""Below this many answers a client barely ran, and its zero proves nothing."""
MIN_ANSWERED_ROLLBACK = {"http.client": LOAD.connections, "wrk-close": 100}
"""A rollback takes a few seconds: every connection answered at least once."""

NODROP_CELLS = [c for c in CELLS if c.kind is Kind.NODROP]


def params(cells: list[Cell]) -> list[Any]:
    return [pytest.param(cell, id=cell.id) for cell in cells]


def skip_if_missing(cell: Cell) -> None:
    missing = cell.missing() or (None if shutil.which("wrk") else "wrk is not installed")
    if missing:
        pytest.skip(missing)


def start_cell(
    supervise: Callable[..., Supervised], tmp_path: Path, cell: Cell
) -> tuple[Supervised, Path]:
    """The cell under ``nodrop run`` (the supervise fixture stops it); its
    ``--config`` holds the app version the next generation starts with."""
    config = tmp_path / "nodrop.toml"
    write_env_config(config, app_env(cell, "good", STARTUP))
    sup = supervise(
        *nodrop_run_args(cell, config),
        command=cell.command(),
        env={"PYTHONPATH": child_pythonpath()},
    )
    return sup, config


def reload_through(sup: Supervised) -> Callable[[], ReloadResult]:
    def reload() -> ReloadResult:
        started = time.monotonic()
        return ReloadResult.from_answer(sup.reload(), time.monotonic() - started)

    return reload


def status_or_none(sup: Supervised) -> Callable[[], dict[str, Any] | None]:
    return lambda: sup.status() if sup.proc.poll() is None else None


def assert_clients_clean(
    clients: ClientSet, sup: Supervised, what: str, minimum: dict[str, int]
) -> None:
    log = sup.log()[-4000:]
    assert clients.failed == 0, f"{what}:\n{clients.describe()}\n--- supervisor log ---\n{log}"
    for report in clients.reports:
        wanted = minimum.get(report.client, 1)
        assert report.ok >= wanted, (
            f"{report.client} barely ran ({report.ok} answers)\n{clients.describe()}"
        )


def test_clients_and_apps_agree_on_the_stream() -> None:
    sys.path.insert(0, str(APPS))
    try:
        import stackapp
    finally:
        sys.path.remove(str(APPS))
    assert stackapp.STREAM_CHUNKS == STREAM_EVENTS


@pytest.mark.slow
@pytest.mark.parametrize("cell", params(NODROP_CELLS))
def test_reloads_under_strict_clients_fail_nothing(
    cell: Cell, supervise: Callable[..., Supervised], tmp_path: Path
) -> None:
    skip_if_missing(cell)
    sup, _ = start_cell(supervise, tmp_path, cell)
    port = sup.port()
    wrong_loop = check_loop(cell, port)
    assert wrong_loop is None, wrong_loop
    reloads = Reloads()
    with ClientSet(port, STRICT_CLIENTS, cell, LOAD) as clients:
        reloads.run(reload_through(sup), RELOADS, GAP)
        drained = wait_drained(status_or_none(sup))
    assert reloads.ok == RELOADS, f"{reloads.to_list()}\n{sup.log()[-4000:]}"
    assert drained, f"an old generation was still draining\n{sup.status()}"
    assert_clients_clean(
        clients, sup, f"{cell.id}: failed requests across {RELOADS} reloads", MIN_ANSWERED
    )
    # The reloads really happened: the last generation answers.
    assert probe(port).get("x-generation") == str(RELOADS + 1)


BROKEN_VERSIONS = {
    # APP_VERSION -> what the app says when it fails (stackapp.py)
    "broken-start": "start-up failed on purpose",
    "import-error": "stacks_module_this_version_forgot_to_install",
}


def rollback_problems(
    version: str, outcome: subprocess.CompletedProcess[str], active: int, log: str
) -> list[str]:
    """What is wrong with how ``nodrop reload`` handled a broken version."""
    problems = []
    if outcome.returncode == 1 and BROKEN_VERSIONS[version] not in log:
        # Not nodrop's fault but the test's: the new version must have failed
        # the way it was meant to, or its rollback proves nothing.
        problems.append(
            f"{version}: the app's error {BROKEN_VERSIONS[version]!r} is not in the log"
        )
    if outcome.returncode != 1:
        problems.append(f"{version}: `nodrop reload` exited {outcome.returncode}, not 1")
    lines = outcome.stdout.splitlines()
    if not lines or not lines[0].startswith("reload failed: ") or lines[0] == "reload failed: ":
        problems.append(f"{version}: no 'reload failed: REASON' line first")
    if active != 1:
        problems.append(f"{version}: generation {active} is active, not the old generation 1")
    if problems:
        problems.append(f"  stdout: {outcome.stdout.strip()}\n  stderr: {outcome.stderr.strip()}")
    return problems


@pytest.mark.slow
@pytest.mark.parametrize("cell", params([c for c in NODROP_CELLS if c.rollback_test]))
def test_broken_new_versions_are_rolled_back(
    cell: Cell, supervise: Callable[..., Supervised], tmp_path: Path
) -> None:
    """A start-up that raises, then a module that does not import: each
    reload exits 1 with the reason, the old generation serves on."""
    skip_if_missing(cell)
    sup, config = start_cell(supervise, tmp_path, cell)
    port = sup.port()
    problems: list[str] = []
    with ClientSet(port, STRICT_CLIENTS, cell, LOAD) as clients:
        for version in BROKEN_VERSIONS:
            write_env_config(config, app_env(cell, version, STARTUP))
            outcome = sup.cli("reload")
            active = sup.status()["active_generation"]
            found = rollback_problems(version, outcome, active, sup.log())
            problems += found
            if outcome.returncode == 0:
                break  # the broken version now serves: the next step would prove nothing
        drained = wait_drained(status_or_none(sup))
    assert not problems, "\n".join(problems) + f"\n--- supervisor log ---\n{sup.log()[-4000:]}"
    assert drained, f"a failed generation was still there\n{sup.status()}"
    assert_clients_clean(
        clients,
        sup,
        f"{cell.id}: failed requests while broken versions were rolled back",
        MIN_ANSWERED_ROLLBACK,
    )
    assert probe(port).get("x-generation") == "1"


# -- the harness itself: it must see what it claims to see --------------------------


class OneShotServer:
    """A keep-alive HTTP/1.1 server on 127.0.0.1:0 (a thread) that closes each
    connection after one response: with ``Connection: close`` (a signal the
    client can act on) or silently (no signal: the client's next request on
    that connection must fail)."""

    def __init__(self, signal_close: bool, answers: int) -> None:
        self.signal_close = signal_close
        self.answers = answers
        self.served = 0
        self.done = threading.Event()
        """Set once ``answers`` responses went out; the server keeps answering
        (a request the client sends meanwhile must not wait for its timeout)."""
        self.closing = threading.Event()
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.thread = threading.Thread(target=self._serve, daemon=True)

    def __enter__(self) -> OneShotServer:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.closing.set()
        self.thread.join(10)
        self.listener.close()

    def _serve(self) -> None:
        self.listener.settimeout(0.1)
        header = b"Connection: close\r\n" if self.signal_close else b""
        body = b"fast gen=1 pid=1\n"
        while not self.closing.is_set():
            try:
                conn, _ = self.listener.accept()
            except TimeoutError:
                continue
            with conn:
                conn.settimeout(5)
                request = b""
                while b"\r\n\r\n" not in request:
                    chunk = conn.recv(4096)
                    if not chunk:
                        break
                    request += chunk
                if not request:
                    continue
                conn.sendall(
                    b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\nX-Generation: 1\r\n%s\r\n%s"
                    % (len(body), header, body)
                )
                self.served += 1
                if self.served >= self.answers:
                    self.done.set()


def run_client(client: Any, server: OneShotServer) -> Any:
    client.start()
    assert server.done.wait(20), f"the client sent {server.served} requests"
    return client.stop()


FAST_ONLY = Mix(fast=1, slow=0, stream=0, echo=0)


def test_http_client_counts_a_silent_close_as_a_failure() -> None:
    with OneShotServer(signal_close=False, answers=4) as server:
        report = run_client(
            HttpClientClient(server.port, connections=1, mix=FAST_ONLY, max_idle=0.05), server
        )
    assert report.failures["eof"] + report.failures["reset"] >= 2, report.describe()
    assert report.reconnects == 0, report.describe()


@pytest.mark.parametrize("client_class", [HttpClientClient, HttpxClient])
def test_connection_close_is_a_reconnect_not_a_failure(client_class: type[Any]) -> None:
    with OneShotServer(signal_close=True, answers=4) as server:
        report = run_client(
            client_class(server.port, connections=1, mix=FAST_ONLY, max_idle=0.05), server
        )
    assert report.failed == 0, report.describe()
    assert report.reconnects >= 3, report.describe()


JUDGED = [
    (Endpoint.FAST, 200, b"fast gen=2 pid=9\n", None),
    (Endpoint.FAST, 503, b"busy", Failure.HTTP_5XX),
    (Endpoint.SLOW, 404, b"no", Failure.BAD_STATUS),
    (Endpoint.SLOW, 200, b"", Failure.PROTOCOL),
    (Endpoint.ECHO, 200, b"abc", None),
    (Endpoint.ECHO, 200, b"ab", Failure.ECHO_BAD),
    (Endpoint.ECHO, 200, b"abd", Failure.ECHO_BAD),
    (
        Endpoint.STREAM,
        200,
        b"".join(b"data: %d gen=1 pid=2\n\n" % i for i in range(STREAM_EVENTS)),
        None,
    ),
    (
        Endpoint.STREAM,
        200,
        b"".join(b"data: %d gen=1 pid=2\n\n" % i for i in range(STREAM_EVENTS - 1)),
        Failure.STREAM_TRUNCATED,
    ),
]


@pytest.mark.parametrize(("endpoint", "status", "body", "expected"), JUDGED)
def test_judge(endpoint: Endpoint, status: int, body: bytes, expected: Failure | None) -> None:
    verdict = judge(endpoint, status, body, b"abc")
    assert (verdict[0] if verdict else None) is expected


def test_wrk_summary_becomes_a_report() -> None:
    client = WrkClient(1, close=True)
    client._fill(  # noqa: SLF001 - the parser of wrk's summary, fed a fixed text
        "  100 requests in 1.00s, 1MB read\n"
        "  Socket errors: connect 0, read 3, write 1, timeout 0\n"
        "  Non-2xx or 3xx responses: 2\n"
    )
    assert client.report.ok == 98
    assert dict(client.report.failures) == {"read": 3, "write": 1, "non-2xx": 2}
    client._dir.cleanup()  # noqa: SLF001 - the fixed text above needs no run


def test_cells_select_by_id_or_prefix() -> None:
    assert [c.id for c in select(["fastapi/uvicorn-h11"])] == ["fastapi/uvicorn-h11"]
    assert {c.id for c in select(["django/"], own=False)} == {
        "django/gunicorn-sync",
        "django/gunicorn-gthread",
    }
    with pytest.raises(ValueError, match="no cell matches"):
        select(["nosuch"])
