"""The supervisor: one event loop, generations of workers, and reloads.

The reload state machine (single flight, coalescing)::

    idle --reload--> starting n+1 --all READY=1--> n+1 active, n draining --> idle
                           |                                  |
                           +--exit / timeout--> rollback      +--drain timeout--> SIGKILL n
                                (n keeps serving)

* A reload requested while one is starting is coalesced into *one* more
  reload after it; every caller gets the outcome of the reload that covers
  its request.
* Draining generations never block a reload; past ``max_draining`` the
  oldest is killed (and ``status`` says so).
* The supervisor never touches the data path: workers accept on the
  listening sockets themselves.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import functools
import os
import signal
import sys
import time
from collections.abc import Callable, Mapping
from typing import Any, Protocol, TextIO

from nodrop.errors import NodropError
from nodrop.supervisor import api, reexec
from nodrop.supervisor.config import (
    DEFAULT_RESTART_BACKOFF,
    ReadyMode,
    RunConfig,
    load_config,
    worker_env,
)
from nodrop.supervisor.control import ControlServer, bind_control
from nodrop.supervisor.inherit_listeners import ListenerProvider
from nodrop.supervisor.model import (
    Generation,
    GenState,
    ReloadOutcome,
    Worker,
    WorkerState,
)
from nodrop.supervisor.output import WorkerOutput
from nodrop.supervisor.process import OsProcesses, Processes, signal_name
from nodrop.supervisor.readiness import wait_ready
from nodrop.systemd.notify import notify as sd_notify
from nodrop.systemd.receiver import NotifyReceiver


class Broker(Protocol):
    """A companion service on the supervisor's loop (the connection broker of
    keep-alive handoff): workers find it at ``$NODROP_HANDOFF``."""

    path: str

    async def start(self, supervisor: Supervisor) -> None: ...

    def close(self) -> None: ...


HISTORY = 50
KEEP_EXITED_GENERATIONS = 5
RESTART_RESET_AFTER = 10.0
"""A worker that stayed up this long resets its restart backoff."""


class Supervisor:
    """Runs generations of a command; see the module docstring."""

    def __init__(
        self,
        config: RunConfig,
        listeners: ListenerProvider,
        *,
        control_path: str,
        config_path: str | None = None,
        cli_values: Mapping[str, Any] | None = None,
        processes: Processes | None = None,
        tag_output: bool = True,
        log: TextIO | None = None,
        service_notify_socket: str | None = None,
        broker: Broker | None = None,
        resume: reexec.Resume | None = None,
    ) -> None:
        self.config = config
        self.listeners = listeners
        self.control_path = control_path
        self.config_path = config_path
        self.cli_values = dict(cli_values or {})
        self.processes = processes or OsProcesses()
        self.tag_output = tag_output
        self._log_stream = log or sys.stderr
        self._service_notify = service_notify_socket
        self.broker = broker
        self.generations: list[Generation] = []
        self.active: Generation | None = None
        self.history: collections.deque[ReloadOutcome] = collections.deque(maxlen=HISTORY)
        self.warnings_log: collections.deque[str] = collections.deque(maxlen=20)
        self._next_number = 1
        self._workers: dict[int, tuple[Worker, Generation]] = {}
        self.output: WorkerOutput | None = None
        self._changed: dict[int, asyncio.Event] = {}
        self._drained: dict[int, asyncio.Future[float]] = {}
        self._kill_timers: dict[int, asyncio.TimerHandle] = {}
        self._restart_times: collections.deque[float] = collections.deque(maxlen=64)
        self._current: asyncio.Future[ReloadOutcome] | None = None
        self._reload_task: asyncio.Task[None] | None = None
        self._next: asyncio.Future[ReloadOutcome] | None = None
        self._stopping = False
        self._stopped: asyncio.Future[int] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self.notify: NotifyReceiver | None = None
        self.control: ControlServer | None = None
        self.started = time.monotonic()
        self.reexecs = 0
        self._resume = resume

    # -- logging and systemd ------------------------------------------------
    def log(self, message: str) -> None:
        print(f"nodrop[{os.getpid()}]: {message}", file=self._log_stream, flush=True)

    def warn(self, message: str) -> None:
        self.warnings_log.append(message)
        self.log(f"warning: {message}")

    def _tell_service_manager(self, **fields: str) -> None:
        if not self._service_notify:
            return
        try:
            # Never block the event loop on a service manager that does not
            # read: a full queue costs one status message, not the supervisor.
            sd_notify(fields, environ={"NOTIFY_SOCKET": self._service_notify}, timeout=0)
        except NodropError as exc:
            self.log(f"cannot notify the service manager: {exc}")

    # -- start-up -----------------------------------------------------------
    async def run(self) -> int:
        """Start generation 1, serve until stopped; returns the exit status."""
        loop = asyncio.get_running_loop()
        self._loop = loop
        self.output = WorkerOutput(loop, enabled=self.tag_output)
        self._stopped = loop.create_future()
        resume, self._resume = self._resume, None
        if resume is not None:
            self.notify = NotifyReceiver.adopt(
                reexec.adopt_socket(resume.state["notify"]["fd"]),
                resume.state["notify"]["path"],
                resume.state["notify"]["dir"],
            )
            control_sock = reexec.adopt_socket(resume.state["control"]["fd"])
            control_sock.setblocking(False)
        else:
            self.notify = NotifyReceiver()
            control_sock = bind_control(self.control_path)
        loop.add_reader(self.notify.fileno(), self._on_notify)
        loop.add_signal_handler(signal.SIGCHLD, self._on_sigchld)
        loop.add_signal_handler(signal.SIGHUP, self._on_sighup)
        loop.add_signal_handler(signal.SIGTERM, self._on_stop_signal, signal.SIGTERM)
        loop.add_signal_handler(signal.SIGINT, self._on_stop_signal, signal.SIGINT)
        loop.add_signal_handler(signal.SIGUSR1, self._forward, signal.SIGUSR1)
        # Signals held across a re-exec are delivered from here on.
        signal.pthread_sigmask(signal.SIG_UNBLOCK, reexec.HELD_SIGNALS)
        try:
            self.control = ControlServer(control_sock, functools.partial(api.handle, self))
            await self.control.start()
            if resume is not None:
                reexec.adopt(self, resume)  # before the broker: it maps peers to workers
            if self.broker is not None:
                await self.broker.start(self)
            if resume is not None:
                self.log(
                    f"re-executed (#{self.reexecs}): generation "
                    f"{self.active.number if self.active else '-'} still serving, "
                    f"{len(self._workers)} worker(s) adopted"
                )
                self._tell_service_manager(STATUS=self._status_line())
                return await self._stopped
            outcome = await self._start_generation_and_wait(self.config, first=True)
            self.history.append(outcome)
            if not outcome.ok:
                self.log(f"could not start: {outcome.message}")
                await self._shutdown()
                return 1
            self.log(
                f"generation {outcome.generation} ready in {outcome.duration:.3f}s; control socket {self.control_path}"
            )
            self._tell_service_manager(
                READY="1", MAINPID=str(os.getpid()), STATUS=self._status_line()
            )
            return await self._stopped
        finally:
            await self._shutdown()

    # -- generations ----------------------------------------------------------
    def _spawn_worker(self, gen: Generation, index: int, restarts: int = 0) -> Worker:
        config = gen.config
        env = worker_env(config)
        assert self.notify is not None
        env["NOTIFY_SOCKET"] = self.notify.path
        env["NODROP_GENERATION"] = str(gen.number)
        env["NODROP_WORKER"] = str(index)
        if self.broker is not None:
            env["NODROP_HANDOFF"] = self.broker.path
        fds = [h.fileno() for h in gen.listeners]
        names = [h.name for h in gen.listeners]
        assert self.output is not None
        pipes = self.output.pipes()
        try:
            pid = self.processes.spawn(
                config.command,
                env,
                fds,
                names,
                pipes[0][1] if pipes else None,
                pipes[1][1] if pipes else None,
            )
        except OSError:
            for r, w in pipes:
                os.close(r)
                os.close(w)
            raise
        for _, w in pipes:
            os.close(w)
        worker = Worker(gen.number, index, pid, restarts=restarts)
        self.output.attach(pid, worker.label, [r for r, _ in pipes], worker.stderr_tail.append)
        self._workers[pid] = (worker, gen)
        if config.ready.mode is ReadyMode.DELAY:
            assert self._loop is not None
            self._loop.call_later(config.ready.delay, self._delay_passed, worker)
        return worker

    def _delay_passed(self, worker: Worker) -> None:
        if worker.state is WorkerState.STARTING:
            self._mark_ready(worker)

    def _mark_ready(self, worker: Worker) -> None:
        worker.state = WorkerState.READY
        worker.ready_at = time.monotonic()
        self._poke(worker.generation)

    def _poke(self, number: int) -> None:
        event = self._changed.get(number)
        if event is not None:
            event.set()

    def _new_generation(self, config: RunConfig, listeners: list[Any]) -> Generation:
        gen = Generation(self._next_number, config, listeners)
        self._next_number += 1
        self.generations.append(gen)
        self._changed[gen.number] = asyncio.Event()
        self._drained[gen.number] = asyncio.get_running_loop().create_future()
        for index in range(1, config.workers + 1):
            try:
                gen.workers.append(self._spawn_worker(gen, index))
            except OSError as exc:
                gen.note = f"cannot start worker {index}: {exc}"
                break
        return gen

    def _kill_generation(self, gen: Generation) -> None:
        for worker in gen.live_workers():
            self.processes.signal_group(worker.pid, signal.SIGKILL)
            self.processes.signal(worker.pid, signal.SIGKILL)
        if not gen.live_workers():
            self._generation_exited(gen)

    def _drain(self, gen: Generation, note: str = "", failed: bool = False) -> None:
        """Send the drain signal; SIGKILL what is left after the drain timeout.

        A failed (rolled back) generation is drained too rather than killed
        outright: sharing the listening socket, it may already have accepted
        connections, and those deserve their answers.
        """
        if gen.drain_started is not None or gen.state is GenState.EXITED:
            return
        gen.state = GenState.FAILED if failed else GenState.DRAINING
        gen.drain_started = time.monotonic()
        if note:
            gen.note = note
        self.listeners.draining(gen.listeners)
        sig = gen.config.drain_signal
        for worker in gen.live_workers():
            worker.state = WorkerState.DRAINING
            self.processes.signal(worker.pid, sig)
        if not gen.live_workers():
            self._generation_exited(gen)
            return
        assert self._loop is not None
        self._kill_timers[gen.number] = self._loop.call_later(
            gen.config.drain_timeout, self._drain_timeout, gen
        )

    def _drain_timeout(self, gen: Generation) -> None:
        live = gen.live_workers()
        if live:
            self.warn(
                f"generation {gen.number} still had {len(live)} worker(s) after the "
                f"{gen.config.drain_timeout:g}s drain timeout: SIGKILL"
            )
            gen.note = "killed at the drain timeout"
            self._kill_generation(gen)

    def _enforce_drain_cap(self) -> None:
        draining = [g for g in self.generations if g.state is GenState.DRAINING]
        excess = len(draining) - self.config.max_draining
        for gen in draining[: max(excess, 0)]:
            self.warn(
                f"generation {gen.number} killed: more than {self.config.max_draining} "
                "generations were draining (--max-draining)"
            )
            gen.note = "killed at the drain cap"
            self._kill_generation(gen)

    def _generation_exited(self, gen: Generation) -> None:
        if gen.state is not GenState.FAILED:
            gen.state = GenState.EXITED
        gen.exited_at = time.monotonic()
        timer = self._kill_timers.pop(gen.number, None)
        if timer is not None:
            timer.cancel()
        fut = self._drained.get(gen.number)
        if fut is not None and not fut.done():
            fut.set_result(gen.exited_at)
        self.listeners.collect(
            g.listeners
            for g in self.generations
            if g.state not in (GenState.EXITED, GenState.FAILED) or g.live_workers()
        )
        done = [
            g
            for g in self.generations
            if g.state in (GenState.EXITED, GenState.FAILED) and not g.live_workers()
        ]
        for old in done[:-KEEP_EXITED_GENERATIONS]:
            self.generations.remove(old)
            self._changed.pop(old.number, None)
            self._drained.pop(old.number, None)
        if self._stopping:
            self._maybe_stopped()

    def _maybe_stopped(self) -> None:
        """Once stopping and every worker of every generation has exited."""
        if all(not g.live_workers() for g in self.generations) and (
            self._stopped is not None and not self._stopped.done()
        ):
            self._stopped.set_result(0)

    async def _start_generation_and_wait(
        self, config: RunConfig, first: bool = False
    ) -> ReloadOutcome:
        started = time.monotonic()

        def failed(message: str, number: int | None = None) -> ReloadOutcome:
            return ReloadOutcome(False, number, message, started, time.monotonic())

        try:
            listeners = self.listeners.prepare(config)
        except NodropError as exc:
            return failed(f"{exc}; the old generation keeps serving" if not first else str(exc))
        gen = self._new_generation(config, listeners)
        why = await wait_ready(
            gen, self._changed[gen.number], config.ready_timeout, config.ready_grace
        )
        if why is not None or self._stopping:
            if self._stopping and why is None:
                why = "the supervisor is stopping"
            self.listeners.abort(listeners)
            self._drain(gen, note=why or "", failed=True)
            suffix = "" if first else "; rolled back, the old generation keeps serving"
            return failed(f"{why}{suffix}", gen.number)
        gen.state = GenState.ACTIVE
        gen.ready_at = max(w.ready_at or 0.0 for w in gen.workers)
        self.listeners.activate(listeners)
        old = [g for g in self.generations if g.state is GenState.ACTIVE and g is not gen]
        self.active = gen
        self.config = config
        for previous in old:
            self._drain(previous)
        self._enforce_drain_cap()
        return ReloadOutcome(
            True,
            gen.number,
            f"generation {gen.number} ready"
            + (f"; generation {', '.join(str(g.number) for g in old)} draining" if old else ""),
            started,
            time.monotonic(),
            ready=gen.ready_at,
            old_generations=tuple(g.number for g in old),
        )

    # -- reloads --------------------------------------------------------------
    def request_reload(self) -> asyncio.Future[ReloadOutcome]:
        """Ask for a reload; the future gives the outcome of the reload that covers it."""
        loop = asyncio.get_running_loop()
        if self._current is None:
            self._current = loop.create_future()
            self._reload_task = loop.create_task(self._reload_loop())
            return self._current
        if self._next is None:
            self._next = loop.create_future()
        return self._next

    async def _reload_loop(self) -> None:
        while self._current is not None:
            try:
                outcome = await self._reload_once()
            except Exception as exc:  # a bug must not wedge every later reload
                now = time.monotonic()
                outcome = ReloadOutcome(False, None, f"internal error: {exc!r}", now, now)
            self.history.append(outcome)
            self.log(("reload: " if outcome.ok else "reload failed: ") + outcome.message)
            self._current.set_result(outcome)
            self._current, self._next = self._next, None

    async def _reload_once(self) -> ReloadOutcome:
        started = time.monotonic()
        if self._stopping:
            return ReloadOutcome(False, None, "the supervisor is stopping", started, started)
        self._tell_service_manager(
            RELOADING="1", MONOTONIC_USEC=str(time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000)
        )
        try:
            config = self.config
            if self.config_path is not None:
                config = load_config(self.config_path, self.cli_values)
            outcome = await self._start_generation_and_wait(config)
        except NodropError as exc:
            outcome = ReloadOutcome(
                False, None, f"{exc}; the old generation keeps serving", started, time.monotonic()
            )
        self._tell_service_manager(READY="1", STATUS=self._status_line())
        return outcome

    async def reload_and_wait(self, wait: str = "ready") -> ReloadOutcome:
        outcome = await self.request_reload()
        if outcome.ok and wait == "drained" and outcome.old_generations:
            exited = [await self._drained[n] for n in outcome.old_generations if n in self._drained]
            if exited:
                outcome = ReloadOutcome(
                    outcome.ok,
                    outcome.generation,
                    outcome.message,
                    outcome.started,
                    outcome.finished,
                    outcome.ready,
                    outcome.old_generations,
                    max(exited),
                )
        return outcome

    # -- events ---------------------------------------------------------------
    def _on_notify(self) -> None:
        assert self.notify is not None
        for _ in range(256):  # bounded per wake-up; the loop calls us again
            try:
                note = self.notify.receive()
            except NodropError as exc:
                self.log(f"ignored a notify message: {exc}")
                continue
            if note is None:
                return
            note.close_fds()  # nodrop run keeps no fd store
            entry = self.worker_of(note.pid)
            if entry is None:
                continue
            worker, _gen = entry
            if "STATUS" in note.fields:
                worker.status_text = note.fields["STATUS"]
            if note.fields.get("READY") == "1" and worker.state is WorkerState.STARTING:
                self._mark_ready(worker)

    def _on_sigchld(self) -> None:
        for pid, code in self.processes.reap():
            entry = self._workers.pop(pid, None)
            if self.output is not None:
                self.output.detach(pid)
            if entry is None:
                continue  # an orphan handed to us (we are PID 1 or a subreaper)
            worker, gen = entry
            was = worker.state
            worker.state = WorkerState.EXITED
            worker.exit_code = code
            self._poke(gen.number)
            if (
                gen.state is GenState.ACTIVE
                and not self._stopping
                and was is not WorkerState.DRAINING
            ):
                self._schedule_restart(gen, worker)
            elif not gen.live_workers() and gen.state in (GenState.DRAINING, GenState.FAILED):
                self._generation_exited(gen)

    def _schedule_restart(self, gen: Generation, worker: Worker) -> None:
        now = time.monotonic()
        self._restart_times.append(now)
        uptime = now - worker.started
        restarts = 0 if uptime >= RESTART_RESET_AFTER else worker.restarts + 1
        low, high = DEFAULT_RESTART_BACKOFF
        delay = 0.0 if restarts == 0 else min(high, low * 2 ** (restarts - 1))
        recent = api.restarts_last_minute(self, now)
        message = f"worker {worker.label} (pid {worker.pid}) {worker.describe_exit()}; restarting in {delay:.1f}s"
        if recent >= api.CRASH_LOOP_RESTARTS:
            self.warn(
                f"crash loop: {recent} restarts in the last {api.CRASH_LOOP_WINDOW:g}s; {message}"
            )
        else:
            self.log(message)
        assert self._loop is not None
        self._loop.call_later(delay, self._restart, gen, worker.index, restarts)

    def _restart(self, gen: Generation, index: int, restarts: int) -> None:
        if gen.state is not GenState.ACTIVE or self._stopping:
            return
        try:
            new = self._spawn_worker(gen, index, restarts)
        except OSError as exc:
            self.warn(f"cannot restart worker {index} of generation {gen.number}: {exc}")
            return
        gen.workers = [new if w.index == index else w for w in gen.workers]

    def _on_sighup(self) -> None:
        self.log("SIGHUP: reloading")
        self.request_reload()

    def _forward(self, sig: int) -> None:
        if self.active is not None:
            for worker in self.active.live_workers():
                self.processes.signal(worker.pid, sig)

    def _on_stop_signal(self, sig: int) -> None:
        if self._stopping:
            self.log(f"{signal_name(sig)} again: killing every worker now")
            for gen in self.generations:
                self._kill_generation(gen)
            return
        self.log(f"{signal_name(sig)}: stopping gracefully (send it again to kill)")
        self.stop()

    def stop(self) -> None:
        if self._stopping:
            return
        self._stopping = True
        self._tell_service_manager(STOPPING="1", STATUS="stopping")
        for gen in list(self.generations):
            if gen.live_workers():
                self._drain(gen)
        self._maybe_stopped()

    async def _shutdown(self) -> None:
        loop = self._loop
        if loop is None:
            return
        self._loop = None
        for gen in self.generations:
            self._kill_generation(gen)
        for sig in (signal.SIGHUP, signal.SIGTERM, signal.SIGINT, signal.SIGUSR1):
            loop.remove_signal_handler(sig)
        # Reap what we killed so nothing is left a zombie behind us.
        deadline = time.monotonic() + 5
        while self._workers and time.monotonic() < deadline:
            self._on_sigchld()
            if self._workers:
                await asyncio.sleep(0.01)
        loop.remove_signal_handler(signal.SIGCHLD)
        if self.output is not None:
            self.output.close()
        for fut in (self._current, self._next):
            if fut is not None and not fut.done():
                fut.set_result(
                    ReloadOutcome(
                        False, None, "the supervisor stopped", time.monotonic(), time.monotonic()
                    )
                )
        if self.control is not None:
            await self.control.aclose()
            with contextlib.suppress(OSError):
                os.unlink(self.control_path)
        if self.broker is not None:
            self.broker.close()
        if self.notify is not None:
            loop.remove_reader(self.notify.fileno())
            self.notify.close()
        self.listeners.close()

    # -- queries for companions (the connection broker) -------------------------
    def worker_of(self, pid: int) -> tuple[Worker, Generation] | None:
        """The worker (and its generation) that ``pid`` is, or belongs to."""
        entry = self._workers.get(pid)
        if entry is None:
            group = self.processes.group_of(pid)
            entry = self._workers.get(group) if group is not None else None
        return entry

    def _status_line(self) -> str:
        gen = self.active
        if gen is None:
            return "starting"
        return f"generation {gen.number} serving with {len(gen.live_workers())} worker(s)"


def run_supervisor(supervisor: Supervisor, on_exit: Callable[[], None] | None = None) -> int:
    try:
        return asyncio.run(supervisor.run())
    finally:
        if on_exit is not None:
            on_exit()
