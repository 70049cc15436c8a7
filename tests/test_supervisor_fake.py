"""The supervisor's timing logic on fake workers and virtual time.

A real :class:`~nodrop.supervisor.supervisor.Supervisor` (its control socket,
notify socket and listening sockets are real) runs on a
:class:`~nodrop.testing.clock.VirtualTimeLoop` with
:class:`~nodrop.testing.processes.FakeProcesses`: the test says when each
worker is ready and when it exits, and a 30 s drain timeout or a 10 s
backoff passes in microseconds. Every duration below is therefore exact:
``pytest.approx`` only absorbs float rounding. Real workers, sockets and
reloads under load are tested end to end in ``test_supervisor.py``.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import errno
import functools
import io
import signal
from collections.abc import AsyncIterator, Callable, Coroutine
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ParamSpec

import pytest

from nodrop.listeners.spec import parse_spec
from nodrop.supervisor.config import RunConfig
from nodrop.supervisor.inherit_listeners import InheritListeners
from nodrop.supervisor.model import ReloadOutcome
from nodrop.supervisor.process import Processes
from nodrop.supervisor.restarts import RestartPolicy
from nodrop.supervisor.stopping import SETTLE
from nodrop.supervisor.supervisor import Supervisor
from nodrop.systemd.receiver import Notification, NotifyReceiver
from nodrop.testing import FakeProcess, FakeProcesses, exit_on
from nodrop.testing.clock import run

#: Virtual seconds any one wait may take; far above every timeout under test,
#: and free: a wait that can never end fails at once, not after a real minute.
DEADLINE = 3600.0

P = ParamSpec("P")
SUPERVISOR_SIGNALS = (signal.SIGHUP, signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)
TERM = signal.SIGTERM
KILL = signal.SIGKILL


def config(**overrides: Any) -> RunConfig:
    base = RunConfig(
        command=("fake-worker",),
        listen=(parse_spec("tcp://127.0.0.1:0?name=web"),),
        ready_timeout=30.0,
        ready_grace=0.5,
        drain_timeout=30.0,
    )
    return dataclasses.replace(base, **overrides).validate()


@dataclass
class Harness:
    """A supervisor on fake workers, and the service manager's view of it."""

    sup: Supervisor
    fake: FakeProcesses
    service: NotifyReceiver
    log: io.StringIO
    task: asyncio.Task[int]

    @property
    def now(self) -> float:
        return asyncio.get_running_loop().time()

    def ready(self, *procs: FakeProcess) -> None:
        """Each worker sends READY=1 (as the kernel would stamp its pid)."""
        for proc in procs:
            self.sup.gens.notified(Notification(proc.pid, 0, 0, {"READY": "1"}))

    async def spawned(self, count: int) -> FakeProcess:
        """The ``count``-th worker ever spawned, once it is."""
        return await self.fake.wait_spawned(count, DEADLINE)

    async def service_note(self, key: str, value: str = "1") -> Notification:
        """The next message from the supervisor to its service manager with
        ``key=value`` (what systemd reads)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + DEADLINE
        while True:
            note = self.service.receive()
            if note is not None:
                note.close_fds()
                if note.fields.get(key) == value:
                    return note
                continue
            readable: asyncio.Future[None] = loop.create_future()
            loop.add_reader(self.service.fileno(), readable.set_result, None)
            try:
                await asyncio.wait_for(readable, deadline - loop.time())
            finally:
                loop.remove_reader(self.service.fileno())

    async def reload(self, *workers: int) -> ReloadOutcome:
        """A reload whose new workers say READY=1 at once (``workers``: how
        many to expect, counting every spawn so far)."""
        future = self.sup.request_reload()
        for count in workers:
            self.ready(await self.spawned(count))
        return await future


@contextlib.asynccontextmanager
async def supervising(
    tmp_path: Path,
    cfg: RunConfig,
    fake: FakeProcesses | None = None,
    restarts: RestartPolicy | None = None,
    *,
    start: bool = True,
) -> AsyncIterator[Harness]:
    """A supervisor running ``cfg`` on fake workers; with ``start``, its
    first generation is ready (every worker said READY=1 at once)."""
    loop = asyncio.get_running_loop()
    fake = fake or FakeProcesses()
    processes: Processes = fake  # the fake implements the seam's protocol
    # The supervisor handles these on its loop and, when it stops, resets them
    # to the defaults; this process (a pytest worker) gets its own back.
    handlers = {sig: signal.getsignal(sig) for sig in SUPERVISOR_SIGNALS}
    service = NotifyReceiver(str(tmp_path / "service.sock"))
    log = io.StringIO()
    sup = Supervisor(
        cfg,
        InheritListeners(),
        control_path=str(tmp_path / "control.sock"),
        processes=processes,
        tag_output=False,
        log=log,
        service_notify_socket=service.path,
        restarts=restarts,
        clock=loop.time,
    )
    task = loop.create_task(sup.run())
    harness = Harness(sup, fake, service, log, task)
    try:
        if start:
            for count in range(1, cfg.workers + 1):
                harness.ready(await harness.spawned(count))
            await harness.service_note("READY")
        yield harness
    finally:
        if not task.done():
            sup.stop()
        try:
            # Stubborn fake workers are killed at the (virtual) drain timeout.
            await asyncio.wait_for(asyncio.shield(task), DEADLINE)
        finally:
            service.close()
            for sig, handler in handlers.items():
                signal.signal(sig, handler)


def virtual(test: Callable[P, Coroutine[Any, Any, None]]) -> Callable[P, None]:
    """Run an async test on a :class:`~nodrop.testing.clock.VirtualTimeLoop`."""

    @functools.wraps(test)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> None:
        run(test(*args, **kwargs))

    return wrapper


# -- start-up and readiness ----------------------------------------------------------


def test_the_supervisor_leaves_this_process_s_signal_handlers_as_it_found_them(
    tmp_path: Path,
) -> None:
    def mine(signum: int, frame: object) -> None:
        raise AssertionError(f"signal {signum} reached the test's own handler")

    original = {sig: signal.signal(sig, mine) for sig in SUPERVISOR_SIGNALS}
    try:

        async def scenario() -> None:
            async with supervising(tmp_path, config()) as h:
                assert signal.getsignal(signal.SIGTERM) is not mine  # the supervisor's now
                h.sup.stop()

        run(scenario())
        assert {sig: signal.getsignal(sig) for sig in SUPERVISOR_SIGNALS} == dict.fromkeys(
            SUPERVISOR_SIGNALS, mine
        )
    finally:
        for sig, handler in original.items():
            signal.signal(sig, handler)


@virtual
async def test_first_generation_is_ready_after_every_worker_said_so_and_the_grace(
    tmp_path: Path,
) -> None:
    async with supervising(tmp_path, config(workers=2, ready_grace=0.5), start=False) as h:
        first = await h.spawned(1)
        second = await h.spawned(2)
        h.ready(first)
        await asyncio.sleep(3)  # one worker ready is not enough, however long
        assert h.sup.active is None
        h.ready(second)
        ready_at = h.now
        note = await h.service_note("READY")
        assert h.now - ready_at == pytest.approx(0.5)
        assert note.fields["STATUS"] == "generation 1 serving with 2 worker(s)"
        assert first.env["NODROP_WORKER"] == "1"
        assert second.env["NODROP_WORKER"] == "2"
        assert first.env["NODROP_GENERATION"] == "1"
        assert first.names == ("web",)
        assert len(first.fds) == 1
        assert h.sup.status()["active_generation"] == 1
        assert h.sup.gens.running == 2


@virtual
async def test_first_generation_failing_stops_the_supervisor_with_status_1(
    tmp_path: Path,
) -> None:
    async with supervising(tmp_path, config(ready_timeout=20), start=False) as h:
        await h.spawned(1)
        started = h.now
        assert await h.task == 1
        assert h.now - started == pytest.approx(20)
        assert "could not start: generation 1 was not ready within 20s" in h.log.getvalue()
        # The worker that never got ready was drained, then killed.
        assert h.fake.spawned()[0].signals == [TERM, KILL]


# -- restarts and crash loops ------------------------------------------------------


@virtual
async def test_restart_backoff_doubles_to_its_cap_and_resets_after_a_long_run(
    tmp_path: Path,
) -> None:
    restarts = RestartPolicy(backoff=(0.1, 1.0), reset_after=10.0)
    async with supervising(tmp_path, config(workers=2), restarts=restarts) as h:
        delays = []
        count = 2
        for _ in range(6):
            worker = h.fake.running()[-1]
            crashed = h.now
            h.fake.exit(worker.pid, 3)
            count += 1
            new = await h.spawned(count)
            delays.append(h.now - crashed)
            assert new.env["NODROP_WORKER"] == worker.env["NODROP_WORKER"] == "2"
        assert delays == pytest.approx([0.1, 0.2, 0.4, 0.8, 1.0, 1.0])
        workers = h.sup.status()["generations"][0]["workers"]
        assert [w["restarts"] for w in workers] == [0, 6]
        # Up for the reset time: the next crash restarts at once, from zero.
        await asyncio.sleep(10)
        crashed = h.now
        h.fake.exit(h.fake.running()[-1].pid, 3)
        await h.spawned(count + 1)
        assert h.now - crashed == pytest.approx(0)
        assert h.sup.status()["generations"][0]["workers"][1]["restarts"] == 0
        assert "worker g1.w2 (pid " in h.log.getvalue()
        assert "exited with status 3; restarting in 0.1s" in h.log.getvalue()


@virtual
async def test_crash_loop_is_reported_not_hidden_and_clears_after_a_quiet_minute(
    tmp_path: Path,
) -> None:
    async with supervising(tmp_path, config()) as h:
        for count in range(2, 7):
            assert not h.sup.status()["crash_loop"]
            h.fake.exit(h.fake.running()[0].pid, -signal.SIGSEGV)
            h.ready(await h.spawned(count))
        status = h.sup.status()
        assert status["crash_loop"]
        assert status["restarts_last_minute"] == 5
        assert status["generations"][0]["workers"][0]["restarts"] == 5
        assert any(
            w.startswith("crash loop: 5 restarts in the last 60s") for w in status["warnings"]
        )
        assert "was killed by signal 11" in h.log.getvalue()
        await asyncio.sleep(60)
        assert not h.sup.status()["crash_loop"]
        assert h.sup.status()["restarts_last_minute"] == 0


@virtual
async def test_no_restart_while_stopping(tmp_path: Path) -> None:
    async with supervising(tmp_path, config(), FakeProcesses(on_signal=exit_on(TERM))) as h:
        worker = h.fake.running()[0]
        h.fake.on_signal = exit_on()  # nothing spawned from here on exits on its own
        worker.on_signal = exit_on()
        h.sup.stop()
        h.fake.exit(worker.pid, 1)  # it crashes while draining
        assert await h.task == 0
        assert len(h.fake.spawned()) == 1


# -- reloads: drain, drain timeout, drain cap --------------------------------------


@virtual
async def test_drained_generation_that_exits_is_not_killed(tmp_path: Path) -> None:
    fake = FakeProcesses(on_signal=exit_on(TERM))
    async with supervising(tmp_path, config(drain_timeout=30), fake) as h:
        old = h.fake.spawned()[0]
        outcome = await h.reload(2)
        assert outcome.ok
        assert outcome.generation == 2
        assert outcome.old_generations == (1,)
        assert old.signals == [TERM]  # drained at once, never killed
        assert old.exit_code == 0
        gen1 = h.sup.status()["generations"][0]
        assert gen1["state"] == "exited"
        assert gen1["note"] == ""


@virtual
async def test_drain_that_ignores_sigterm_is_killed_at_exactly_the_timeout(
    tmp_path: Path,
) -> None:
    async with supervising(tmp_path, config(drain_timeout=30, ready_grace=0)) as h:
        old = h.fake.spawned()[0]
        future = asyncio.ensure_future(h.sup.reload_and_wait("drained"))
        h.ready(await h.spawned(2))
        outcome = await future
        assert outcome.ok
        assert outcome.ready is not None
        assert outcome.old_exited is not None
        assert outcome.old_exited - outcome.ready == pytest.approx(30)
        assert old.signals == [TERM, KILL]
        gen1 = h.sup.status()["generations"][0]
        assert gen1["note"] == "killed at the drain timeout"
        assert gen1["workers"][0]["exit_code"] == -KILL
        assert any("after the 30s drain timeout: SIGKILL" in w for w in h.sup.status()["warnings"])


@virtual
async def test_drain_cap_kills_the_oldest_draining_generation(tmp_path: Path) -> None:
    cfg = config(drain_timeout=60, ready_grace=0, max_draining=1)
    async with supervising(tmp_path, cfg) as h:
        gen1 = h.fake.spawned()[0]
        assert (await h.reload(2)).ok  # generation 1 drains (and ignores SIGTERM)
        assert gen1.signals == [TERM]
        reloaded = h.now
        assert (await h.reload(3)).ok  # generation 2 drains too: over the cap of 1
        assert h.now == reloaded  # killed at once, not at the drain timeout
        gen2 = h.fake.spawned()[1]
        assert gen1.signals == [TERM, KILL]
        assert gen2.signals == [TERM]
        status = h.sup.status()
        states = [(g["generation"], g["state"], g["note"]) for g in status["generations"]]
        assert states == [
            (1, "exited", "killed at the drain cap"),
            (2, "draining", ""),
            (3, "active", ""),
        ]
        assert any("--max-draining" in w for w in status["warnings"])
        # Generation 2 still gets its whole drain timeout.
        await h.fake.wait_until(lambda: not gen2.running, DEADLINE, "generation 2 killed")
        assert h.now - reloaded == pytest.approx(60)
        assert gen2.signals == [TERM, KILL]


@virtual
async def test_reloads_asked_while_one_starts_are_coalesced_into_one(tmp_path: Path) -> None:
    async with supervising(tmp_path, config(ready_grace=0)) as h:
        first = h.sup.request_reload()
        second = h.sup.request_reload()
        third = h.sup.request_reload()
        assert second is third
        h.ready(await h.spawned(2))
        h.ready(await h.spawned(3))
        outcomes = [await first, await second, await third]
        assert [o.generation for o in outcomes] == [2, 3, 3]
        assert len(h.fake.spawned()) == 3
        assert h.sup.status()["active_generation"] == 3


# -- rollbacks ---------------------------------------------------------------------------


@virtual
async def test_ready_timeout_rolls_back_and_the_old_generation_keeps_serving(
    tmp_path: Path,
) -> None:
    async with supervising(tmp_path, config(ready_timeout=20, drain_timeout=5)) as h:
        old = h.fake.spawned()[0]
        future = h.sup.request_reload()
        new = await h.spawned(2)
        started = h.now
        outcome = await future
        assert not outcome.ok
        assert h.now - started == pytest.approx(20)
        assert outcome.message == (
            "generation 2 was not ready within 20s: worker(s) 1 still starting (does the "
            "server send READY=1 to $NOTIFY_SOCKET? if it cannot, use --ready delay:SECONDS)"
            "; rolled back, the old generation keeps serving"
        )
        assert old.running
        assert old.signals == []
        assert new.signals == [TERM]  # a failed generation is drained too...
        await h.fake.wait_until(lambda: not new.running, DEADLINE, "the failed worker killed")
        assert h.now - started == pytest.approx(25)  # ...and killed at its drain timeout
        status = h.sup.status()
        assert status["active_generation"] == 1
        assert status["generations"][1]["state"] == "failed"
        assert status["reloads"][-1]["ok"] is False


@virtual
async def test_worker_exiting_before_it_is_ready_rolls_back(tmp_path: Path) -> None:
    async with supervising(tmp_path, config()) as h:
        future = h.sup.request_reload()
        new = await h.spawned(2)
        await asyncio.sleep(1.5)
        h.fake.exit(new.pid, 3)
        outcome = await future
        assert not outcome.ok
        assert outcome.duration == pytest.approx(1.5)
        assert outcome.message.startswith(
            "generation 2, worker 1 exited with status 3 before it was ready"
        )
        assert "rolled back, the old generation keeps serving" in outcome.message
        assert h.sup.status()["active_generation"] == 1


@virtual
async def test_exit_within_the_ready_grace_rolls_back(tmp_path: Path) -> None:
    async with supervising(tmp_path, config(ready_grace=0.5)) as h:
        old = h.fake.spawned()[0]
        future = h.sup.request_reload()
        new = await h.spawned(2)
        h.ready(new)
        await asyncio.sleep(0.3)
        h.fake.exit(new.pid, 3)
        outcome = await future
        assert not outcome.ok
        assert "worker 1 exited with status 3 0.30s after it was ready" in outcome.message
        assert old.running
        assert old.signals == []
        assert h.sup.status()["active_generation"] == 1


@virtual
async def test_exit_after_the_ready_grace_is_a_restart_not_a_rollback(tmp_path: Path) -> None:
    async with supervising(tmp_path, config(ready_grace=0.5)) as h:
        old = h.fake.spawned()[0]
        future = h.sup.request_reload()
        new = await h.spawned(2)
        h.ready(new)
        outcome = await future
        assert outcome.ok
        assert outcome.duration == pytest.approx(0.5)
        h.fake.exit(new.pid, 3)
        assert (await h.spawned(3)).env["NODROP_GENERATION"] == "2"
        assert old.signals == [TERM]
        assert h.sup.status()["active_generation"] == 2


@virtual
async def test_a_worker_that_cannot_be_started_rolls_back(tmp_path: Path) -> None:
    async with supervising(tmp_path, config(workers=2)) as h:
        h.fake.spawn_errors.append(OSError(errno.ENOENT, "No such file or directory"))
        outcome = await h.sup.request_reload()
        assert not outcome.ok
        assert outcome.message.startswith(
            "generation 2: cannot start worker 1: [Errno 2] No such file or directory"
        ), outcome.message
        assert "rolled back, the old generation keeps serving" in outcome.message
        assert outcome.duration == 0
        assert len(h.fake.running()) == 2
        assert h.sup.status()["active_generation"] == 1


# -- stopping ------------------------------------------------------------------------------


@virtual
async def test_stop_drains_every_generation_and_kills_the_stubborn_at_the_timeout(
    tmp_path: Path,
) -> None:
    async with supervising(tmp_path, config(workers=2, drain_timeout=30)) as h:
        first, second = h.fake.spawned()
        second.on_signal = exit_on(TERM)
        stopped = h.now
        h.sup.stop()
        note = await h.service_note("STOPPING")
        assert note.fields["STATUS"] == "stopping"
        assert await h.task == 0
        # The queue is served first (empty, and still empty SETTLE later), then the drain.
        assert h.now - stopped == pytest.approx(SETTLE + 30)
        assert first.signals == [TERM, KILL]
        assert first.exit_code == -KILL
        assert second.signals == [TERM]
        assert second.exit_code == 0
        assert h.sup.gens.running == 0


# -- who may speak for a worker (issue 13 F) --------------------------------------------


@virtual
async def test_a_workers_descendant_may_say_ready_and_no_other_process(tmp_path: Path) -> None:
    async with supervising(tmp_path, config(ready_grace=0), start=False) as h:
        worker = await h.spawned(1)
        stranger, grandchild = 900_001, 900_003
        h.fake.parents.update({900_002: worker.pid, grandchild: 900_002, stranger: 1})
        assert h.sup.gens.notified(Notification(stranger, 0, 0, {"READY": "1"})) is False
        await asyncio.sleep(1)
        assert h.sup.active is None  # a stranger's READY=1 counts for nothing
        assert h.sup.gens.notified(Notification(grandchild, 0, 0, {"READY": "1"})) is True
        await h.service_note("READY")
        assert h.sup.status()["active_generation"] == 1
