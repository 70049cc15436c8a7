"""Fault matrix: ``nodrop stop`` under load, and stop and reload crossing
(issue 13, E / item 3).

What stop promises (src/nodrop/supervisor/stopping.py): from the stop on,
new connections get no answer and, once the socket is closed, a clean
"refused"; every connection the kernel had already completed is served.
So under load: no reset, no timeout, no connection closed unanswered --
only refusals, and only after the stop began.
"""

from __future__ import annotations

import time

from nodrop.load import run_load
from nodrop.load.outcome import Outcome
from nodrop.load.reload import ReloadRecord
from nodrop.supervisor.control import request
from supervisor_harness import Start, close_mode_load


class Stopper:
    """A "reload" that is ``nodrop stop`` (synchronous: returns once stopped)."""

    def __init__(self, control: str) -> None:
        self.control = control
        self.reply: dict[str, object] = {}

    def reload(self) -> ReloadRecord:
        started = time.monotonic()
        self.reply = request(self.control, "stop", timeout=60)
        done = time.monotonic()
        return ReloadRecord(started, None, done, bool(self.reply.get("ok")), "stop", done)


def test_stop_under_load_resets_nothing(supervise: Start) -> None:
    sup = supervise("--listen", "tcp://127.0.0.1:0?name=web&backlog=4096", "--workers", "2")
    port = sup.port()
    stopper = Stopper(sup.control)
    config = close_mode_load(port, duration=3.0, concurrency=32)
    result = run_load(config, stopper)
    assert stopper.reply.get("ok"), stopper.reply
    assert sup.proc.wait(timeout=30) == 0
    assert result.ok > 300, "the load generator barely ran"
    failures = {k: v for k, v in result.outcomes.items() if k != Outcome.OK.label and v}
    print(f"\nstop under load: {dict(result.outcomes)}")
    # Refused: the service is stopped. Anything else lost a request.
    assert set(failures) <= {Outcome.REFUSED.label}, (failures, sup.log())
    assert "new connections refused on 1 listener(s)" in sup.log()


def test_stop_during_a_reload_abandons_it_and_says_so(supervise: Start) -> None:
    from supervisor_harness import SERVER

    sup = supervise("--listen", "tcp://127.0.0.1:0", command=[*SERVER, "--ready-after", "0.2"])
    import threading

    outcome: dict[str, object] = {}
    reloading = threading.Thread(target=lambda: outcome.update(sup.reload()))
    reloading.start()
    from nodrop.testing.waiting import wait_for

    wait_for(lambda: sup.status()["reload_in_progress"] or None, 30)
    assert sup.stop() == 0
    reloading.join(timeout=30)
    assert outcome["ok"] is False
    message = str(outcome["message"])
    # "is stopping" from the reload itself, "stopped" if the stop finished first.
    assert message.startswith("abandoned: the supervisor "), message
    assert "rolled back" not in message


def test_reload_during_stop_is_refused_with_the_reason(supervise: Start) -> None:
    sup = supervise("--listen", "tcp://127.0.0.1:0", "--drain-timeout", "5")
    import threading

    stopped: dict[str, object] = {}
    stopping = threading.Thread(
        target=lambda: stopped.update(request(sup.control, "stop", timeout=60))
    )
    stopping.start()
    from nodrop.testing.waiting import wait_for

    wait_for(lambda: sup.status()["stopping"] or None, 30)
    reply = sup.reload()
    assert reply["ok"] is False
    assert "stopping" in str(reply["message"])
    stopping.join(timeout=60)
    assert stopped["ok"]
    assert sup.proc.wait(timeout=30) == 0
