"""What `nodrop reload` promises when it exits 0: every new connection from
then on is served by the new generation (the old one has stopped accepting).

The old generation here is slow to stop accepting on purpose
(``children/recipes_slow_drain.py --linger``): without the supervisor's wait,
connections made right after the reload reach it. After `nodrop reload`
(the command, as a deploy script runs it) exits 0, 100 new connections in a
row must all be answered by the new generation -- for a server that says
STOPPING=1, one that closes its listening socket, one that exits, and the
bundled demo app. A server that never stops is waited for only up to the
bound, and the answer says so.
"""

from __future__ import annotations

import json
import socket
import sys

import pytest

from conftest import CHILDREN
from supervisor_harness import Start

SLOW = [sys.executable, str(CHILDREN / "recipes_slow_drain.py")]
DEMO = [sys.executable, "-m", "nodrop.demo.app"]

pytestmark = pytest.mark.slow


def answer(port: int) -> str:
    """One request on a new connection; the response body."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as conn:
        conn.sendall(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        data = b""
        while chunk := conn.recv(4096):
            data += chunk
    return data.split(b"\r\n\r\n", 1)[1].decode()


def generation_of(body: str) -> int:
    # "gen=N" (the slow server) or "hello from generation N, pid P" (the demo app)
    if body.startswith("gen="):
        return int(body.split()[0][4:])
    return int(body.split("generation ")[1].split(",")[0])


@pytest.mark.parametrize(
    ("command", "how"),
    [
        ([*SLOW, "--how", "stopping"], "STOPPING=1, socket kept open"),
        ([*SLOW, "--how", "close"], "listening socket closed"),
        ([*SLOW, "--how", "exit"], "exited"),
        (DEMO, "the demo app"),
    ],
    ids=["stopping", "close", "exit", "demo"],
)
def test_after_reload_exits_0_every_new_connection_reaches_the_new_generation(
    supervise: Start, command: list[str], how: str
) -> None:
    sup = supervise(
        "--listen", "tcp://127.0.0.1:0", "--workers", "2", "--ready-grace", "0",
        command=command,
    )  # fmt: skip
    port = sup.port()
    assert generation_of(answer(port)) == 1
    for expected in (2, 3):
        done = sup.cli("reload", "--json")
        assert done.returncode == 0, done.stdout + done.stderr + sup.log()
        outcome = json.loads(done.stdout)  # exactly one JSON document
        assert outcome["generation"] == expected
        stop = outcome["old_stopped_accepting"]
        assert stop["confirmed"] is True, (how, stop)
        assert stop["how"] == "stopped", (how, stop)
        seen = [generation_of(answer(port)) for _ in range(100)]
        assert seen == [expected] * 100, (how, seen)
    assert sup.stop() == 0


def test_an_old_generation_that_never_stops_is_waited_for_only_up_to_the_bound(
    supervise: Start,
) -> None:
    sup = supervise(
        "--listen", "tcp://127.0.0.1:0", "--ready-grace", "0", "--drain-timeout", "1.5",
        command=[*SLOW, "--how", "never"],
    )  # fmt: skip
    done = sup.cli("reload", "--json")
    assert done.returncode == 0, done.stdout + done.stderr
    outcome = json.loads(done.stdout)
    stop = outcome["old_stopped_accepting"]
    assert stop["confirmed"] is False
    assert stop["how"] == "timeout"
    assert stop["waiting"] == ["g1.w1"]
    assert 1.4 <= stop["seconds"] < 5, stop  # the drain timeout (1.5 s) is the bound here
    assert "not confirmed within" in outcome["message"]
    text = sup.cli("reload")
    assert text.returncode == 0
    # The text form says it too -- when it happened: the bound and the drain
    # timeout are both 1.5 s here, so the old worker's SIGKILL may confirm it first.
    last = sup.status()["reloads"][-1]
    if last["old_stopped_accepting"]["how"] == "timeout":
        assert "not confirmed within" in text.stdout, (text.stdout, last)
    else:
        assert last["old_stopped_accepting"]["confirmed"] is True, last
    assert sup.stop() == 0
