"""The test doubles of :mod:`nodrop.testing` behave as they promise."""

from __future__ import annotations

import asyncio
import itertools
import signal
import socket
import threading
import time

import pytest

from nodrop.supervisor.process import Processes
from nodrop.testing import FakeClock, FakeProcesses, VirtualTimeLoop, exit_on, wait_for
from nodrop.testing.clock import DEFAULT_START, run
from nodrop.testing.processes import FIRST_PID

# -- VirtualTimeLoop -------------------------------------------------------------------


def test_virtual_time_jumps_over_sleeps_in_order() -> None:
    async def main() -> tuple[list[tuple[str, float]], float]:
        loop = asyncio.get_running_loop()
        woke: list[tuple[str, float]] = []

        async def sleeper(name: str, seconds: float) -> None:
            await asyncio.sleep(seconds)
            woke.append((name, loop.time()))

        await asyncio.gather(sleeper("late", 3600), sleeper("early", 30), sleeper("mid", 600))
        return woke, loop.time()

    started = time.monotonic()
    woke, end = run(main())
    assert time.monotonic() - started < 5  # an hour of virtual time
    assert woke == [
        ("early", DEFAULT_START + 30),
        ("mid", DEFAULT_START + 600),
        ("late", DEFAULT_START + 3600),
    ]
    assert end == DEFAULT_START + 3600


def test_virtual_time_times_out_a_wait_that_cannot_end() -> None:
    async def main() -> float:
        loop = asyncio.get_running_loop()
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(loop.create_future(), 30)
        return loop.time()

    assert run(main(), start=5.0) == pytest.approx(35.0)


def test_ready_io_runs_before_time_jumps() -> None:
    """A datagram already queued is read before a timer 10 s away fires."""

    async def main() -> list[str]:
        loop = asyncio.get_running_loop()
        events: list[str] = []
        a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
        with a, b:
            a.setblocking(False)
            loop.call_later(10, events.append, "timer")
            loop.add_reader(a.fileno(), lambda: events.append(a.recv(16).decode()))
            b.send(b"io")
            await asyncio.sleep(20)
            loop.remove_reader(a.fileno())
        return events

    assert run(main()) == ["io", "timer"]


def test_autojump_threshold_lets_a_thread_finish_first() -> None:
    """With a threshold, time jumps only after the loop was idle that long
    (real seconds): work in a thread that signals the loop wins."""

    async def main() -> float:
        loop = asyncio.get_running_loop()
        go = threading.Event()

        def work() -> str:
            go.wait(10)
            return "done"

        future = loop.run_in_executor(None, work)
        loop.call_soon(go.set)
        assert await asyncio.wait_for(future, timeout=1.0) == "done"
        return loop.time()

    assert run(main(), autojump_threshold=5.0) < DEFAULT_START + 1.0


def test_loop_advance_and_its_refusals() -> None:
    loop = VirtualTimeLoop(start=10.0)
    try:
        fired: list[float] = []
        loop.call_later(5, lambda: fired.append(loop.time()))
        loop.advance(7)
        assert loop.time() == 17.0
        assert loop.jumped == 7
        loop.run_until_complete(asyncio.sleep(0))
        assert fired == [17.0]  # due timers run on the next iteration, at the new time
        with pytest.raises(ValueError, match="cannot go back"):
            loop.advance(-1)
    finally:
        loop.close()
    with pytest.raises(ValueError, match="must not be negative"):
        VirtualTimeLoop(autojump_threshold=-1)


def test_fake_clock() -> None:
    clock = FakeClock()
    assert clock() == DEFAULT_START
    assert clock.advance(2.5) == DEFAULT_START + 2.5 == clock()
    with pytest.raises(ValueError, match="cannot go back"):
        clock.advance(-0.1)


# -- FakeProcesses ------------------------------------------------------------------------


def _spawn(fake: FakeProcesses, *argv: str) -> int:
    return fake.spawn(list(argv), {"A": "1"}, [7, 8], ["web", "admin"], None, None)


def test_fake_processes_implement_the_seam() -> None:
    processes: Processes = FakeProcesses()  # checked by mypy
    assert processes.reap() == []


def test_spawn_records_what_a_worker_gets_and_pids_are_never_real() -> None:
    fake = FakeProcesses()
    first, second = _spawn(fake, "app", "--x"), _spawn(fake, "app")
    assert (first, second) == (FIRST_PID, FIRST_PID + 1)
    assert FIRST_PID > 2**22  # above PID_MAX_LIMIT: no real process has it
    proc = fake.processes[first]
    assert (proc.argv, proc.env, proc.fds, proc.names) == (
        ("app", "--x"),
        {"A": "1"},
        (7, 8),
        ("web", "admin"),
    )
    assert proc.running
    assert proc.exit_code is None
    assert fake.group_of(first) == first
    fake.spawn_errors.append(OSError(2, "nope"))
    with pytest.raises(OSError, match="nope"):
        _spawn(fake, "broken")
    assert _spawn(fake, "app") == FIRST_PID + 2  # the error was used up
    assert [p.pid for p in fake.spawned()] == [first, second, FIRST_PID + 2]


def test_signals_are_recorded_and_only_sigkill_always_kills() -> None:
    fake = FakeProcesses()
    pid = _spawn(fake, "stubborn")
    fake.signal(pid, signal.SIGTERM)
    fake.signal(pid, signal.SIGUSR1)
    proc = fake.processes[pid]
    assert proc.running
    assert proc.signals == [signal.SIGTERM, signal.SIGUSR1]
    fake.signal(pid, signal.SIGKILL)
    assert proc.exit_code == -signal.SIGKILL
    fake.signal(pid, signal.SIGTERM)  # gone: nothing happens, nothing recorded
    assert proc.signals == [signal.SIGTERM, signal.SIGUSR1, signal.SIGKILL]
    fake.signal(123, signal.SIGTERM)  # never spawned: ignored, as kill(2) on ESRCH
    assert fake.reap() == [(pid, -signal.SIGKILL)]
    assert fake.reap() == []
    assert proc.reaped
    assert fake.group_of(pid) is None


def test_on_signal_decides_and_signal_group_reaches_the_leader() -> None:
    fake = FakeProcesses(on_signal=exit_on(signal.SIGTERM, code=3))
    a, b = _spawn(fake, "a"), _spawn(fake, "b")
    fake.processes[b].on_signal = exit_on(signal.SIGINT)
    fake.signal_group(a, signal.SIGTERM)
    fake.signal(b, signal.SIGTERM)
    assert fake.processes[a].exit_code == 3
    assert fake.processes[b].running
    fake.signal(b, signal.SIGINT)
    assert fake.reap() == [(a, 3), (b, 0)]
    assert fake.running() == []


def test_exit_is_delivered_through_watch_on_the_loop() -> None:
    async def main() -> list[list[tuple[int, int]]]:
        loop = asyncio.get_running_loop()
        fake = FakeProcesses()
        reaped: list[list[tuple[int, int]]] = []
        fake.watch(loop, lambda: reaped.append(fake.reap()))
        pid = _spawn(fake, "app")
        fake.exit(pid, 7)
        assert reaped == []  # on the loop, as a signal handler runs: not inside exit()
        await asyncio.sleep(0)
        with pytest.raises(ValueError, match="not a running fake process"):
            fake.exit(pid, 1)
        fake.unwatch(loop)
        other = _spawn(fake, "app")
        fake.exit(other, 1)
        await asyncio.sleep(0)
        assert fake.reap() == [(other, 1)]  # unwatched: only an explicit reap sees it
        return reaped

    assert run(main()) == [[(FIRST_PID, 7)]]


def test_wait_until_wakes_on_changes_and_times_out_in_virtual_time() -> None:
    async def main() -> None:
        loop = asyncio.get_running_loop()
        fake = FakeProcesses()
        loop.call_later(5, _spawn, fake, "a")
        loop.call_later(9, _spawn, fake, "b")
        second = await fake.wait_spawned(2, timeout=60)
        assert second.argv == ("b",)
        assert loop.time() == DEFAULT_START + 9
        started = loop.time()
        with pytest.raises(TimeoutError, match="3 processes spawned"):
            await fake.wait_spawned(3, timeout=60)
        assert loop.time() - started == pytest.approx(60)

    run(main())


# -- wait_for ---------------------------------------------------------------------------


def test_wait_for_returns_the_first_true_value() -> None:
    answers = itertools.chain([0, None, ""], itertools.repeat({"ok": 1}))
    assert wait_for(lambda: next(answers), timeout=5) == {"ok": 1}


def test_wait_for_raises_at_its_deadline_after_a_last_check() -> None:
    calls = []
    started = time.monotonic()
    with pytest.raises(TimeoutError, match="waiting for the moon"):
        wait_for(lambda: calls.append(1), timeout=0.05, what="the moon")
    assert 0.05 <= time.monotonic() - started < 5
    assert len(calls) >= 2
