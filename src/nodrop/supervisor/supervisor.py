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

Collaborators, each behind a seam: :class:`~.process.Processes` (spawn,
signal, reap), the listener strategy (:class:`~.inherit_listeners.ListenerProvider`),
:class:`~.restarts.RestartPolicy`, the control socket (:mod:`.api`), the
optional connection broker, and a monotonic ``clock``.
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
from typing import Any, TextIO

from nodrop.errors import NodropError
from nodrop.lograte import RateLimitedLog
from nodrop.supervisor import api
from nodrop.supervisor import reexec as carry
from nodrop.supervisor.companion import Broker
from nodrop.supervisor.config import (
    RunConfig,
    load_config,
    worker_env,
)
from nodrop.supervisor.control import ControlServer, bind_control
from nodrop.supervisor.eventlog import EventLog
from nodrop.supervisor.generations import GenerationSet
from nodrop.supervisor.inherit_listeners import ListenerProvider
from nodrop.supervisor.ledger import Ledgers, lost_is_known
from nodrop.supervisor.metrics import Metrics
from nodrop.supervisor.metrics_http import MetricsServer
from nodrop.supervisor.model import Generation, ReloadOutcome, Worker
from nodrop.supervisor.output import WorkerOutput
from nodrop.supervisor.process import OsProcesses, Processes, signal_name
from nodrop.supervisor.readiness import wait_ready
from nodrop.supervisor.restarts import RestartPolicy
from nodrop.supervisor.status import (
    build_status,
    record_ledger,
    record_reload,
    record_start,
    summary_line,
)
from nodrop.supervisor.stopping import stop_gracefully
from nodrop.supervisor.switchover import Switchover
from nodrop.supervisor.takeover import Recovery
from nodrop.systemd.notify import notify as sd_notify
from nodrop.systemd.receiver import NotifyReceiver

HISTORY = 50


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
        resume: carry.Resume | None = None,
        restarts: RestartPolicy | None = None,
        clock: Callable[[], float] = time.monotonic,
        name: str = "nodrop",
        log_format: str = "text",
        metrics_server: MetricsServer | None = None,
        recovery: Recovery | None = None,
    ) -> None:
        self.config = config
        self.listeners = listeners
        self.control_path = control_path
        self.config_path = config_path
        self.cli_values = dict(cli_values or {})
        self.processes = processes or OsProcesses()
        self.tag_output = tag_output
        self.name = name
        self.metrics_server = metrics_server
        self.recovery = recovery
        self.events = EventLog(log or sys.stderr, log_format)
        self.service_notify = service_notify_socket
        self.broker = broker
        self.restarts = restarts or RestartPolicy()
        self.clock = clock
        self.output = WorkerOutput(enabled=tag_output)
        self.gens = GenerationSet(
            self.processes,
            listeners,
            self.restarts,
            self.output,
            self._worker_env,
            clock,
            self.log,
            self.warn,
        )
        self.gens.on_all_exited = self._all_exited
        self.metrics = Metrics()
        self.ledgers = Ledgers(
            lambda: {} if broker is None else broker.stats(),
            lost_is_known(listeners),
            functools.partial(record_ledger, self),
        )
        self.gens.on_exited = lambda gen: self.ledgers.exited(gen, self.clock())
        self.gens.on_kill = self.ledgers.killing
        self.switchover = Switchover(self.gens, listeners, self.ledgers, clock)
        self.history: collections.deque[ReloadOutcome] = collections.deque(maxlen=HISTORY)
        self.warnings_log: collections.deque[str] = collections.deque(maxlen=20)
        self._current: asyncio.Future[ReloadOutcome] | None = None
        self._reload_task: asyncio.Task[None] | None = None
        self._next: asyncio.Future[ReloadOutcome] | None = None
        self._stopping = False
        self._stopped: asyncio.Future[int] | None = None
        self._stop_task: asyncio.Task[None] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self.notify: NotifyReceiver | None = None
        self.notify_garbage = RateLimitedLog(self.log, "ignored notify messages")
        self.control: ControlServer | None = None
        self.started = clock()
        self.reexecs = 0
        self._resume = resume

    # -- logging and systemd ------------------------------------------------
    def log(self, message: str) -> None:
        self.events.event("log", message)

    def warn(self, message: str) -> None:
        self.warnings_log.append(message)
        self.events.event("warning", message, level="warning")

    def _tell_service_manager(self, **fields: str) -> None:
        if not self.service_notify:
            return
        try:
            # Never block the event loop on a service manager that does not
            # read: a full queue costs one status message, not the supervisor.
            sd_notify(fields, environ={"NOTIFY_SOCKET": self.service_notify}, timeout=0)
        except NodropError as exc:
            self.log(f"cannot notify the service manager: {exc}")

    @property
    def stopping(self) -> bool:
        return self._stopping

    @property
    def reload_in_progress(self) -> bool:
        return self._current is not None

    # -- start-up -----------------------------------------------------------
    async def run(self) -> int:
        """Start generation 1, serve until stopped; returns the exit status."""
        loop = asyncio.get_running_loop()
        self._loop = loop
        self._stopped = loop.create_future()
        resume, self._resume = self._resume, None
        if resume is not None:
            notify = resume.state["notify"]
            self.notify = NotifyReceiver.adopt(
                carry.adopt_socket(notify["fd"]), notify["path"], notify["dir"]
            )
            control_sock = carry.adopt_socket(resume.state["control"]["fd"])
            control_sock.setblocking(False)
        else:  # the control socket first: if it cannot be bound, nothing is left behind
            control_sock = bind_control(self.control_path)
            self.notify = NotifyReceiver()
        loop.add_reader(self.notify.fileno(), self._on_notify)
        self.processes.watch(loop, self.gens.reap)
        loop.add_signal_handler(signal.SIGHUP, self._on_sighup)
        loop.add_signal_handler(signal.SIGTERM, self._on_stop_signal, signal.SIGTERM)
        loop.add_signal_handler(signal.SIGINT, self._on_stop_signal, signal.SIGINT)
        loop.add_signal_handler(signal.SIGUSR1, self._forward, signal.SIGUSR1)
        # Signals held across a re-exec are delivered from here on.
        signal.pthread_sigmask(signal.SIG_UNBLOCK, carry.HELD_SIGNALS)
        try:
            self.control = ControlServer(control_sock, functools.partial(api.handle, self))
            await self.control.start()
            if self.metrics_server is not None:
                await self.metrics_server.start(self.status)
            if resume is not None:
                self._adopt(resume)  # before the broker: it maps peers to workers
            if self.broker is not None:
                await self.broker.start(self)
            if (recovery := self.recovery) is not None:
                recovery.start(self)  # before generation 1: its spawns are recorded
            if resume is not None:
                self.log(
                    f"re-executed (#{self.reexecs}): generation "
                    f"{self.active.number if self.active else '-'} still serving, "
                    f"{self.gens.running} worker(s) adopted"
                )
                self._tell_service_manager(STATUS=self.status_line())
                return await self._stopped
            outcome = await self._start_generation_and_wait(self.config, first=True)
            record_start(self, outcome)
            if not outcome.ok:
                self.log(f"could not start: {outcome.message}")
                await self._shutdown()
                return 1
            self.log(
                f"generation {outcome.generation} ready in {outcome.duration:.3f}s; control socket {self.control_path}"
            )
            if recovery is not None:
                recovery.serving(self.config)
            self._tell_service_manager(
                READY="1", MAINPID=str(os.getpid()), STATUS=self.status_line()
            )
            return await self._stopped
        finally:
            await self._shutdown()

    # -- generations ----------------------------------------------------------
    @property
    def active(self) -> Generation | None:
        return self.gens.active

    @property
    def generations(self) -> list[Generation]:
        return self.gens.all

    def _worker_env(self, gen: Generation, index: int) -> dict[str, str]:
        env = worker_env(gen.config)
        assert self.notify is not None
        env["NOTIFY_SOCKET"] = self.notify.path
        env["NODROP_GENERATION"] = str(gen.number)
        env["NODROP_WORKER"] = str(index)
        if self.broker is not None:
            env["NODROP_HANDOFF"] = self.broker.path
        return env

    def _all_exited(self) -> None:
        if self._stopped is not None and not self._stopped.done():
            self._stopped.set_result(0)

    async def _start_generation_and_wait(
        self, config: RunConfig, first: bool = False
    ) -> ReloadOutcome:
        started = self.clock()

        def failed(message: str, number: int | None = None) -> ReloadOutcome:
            return ReloadOutcome(False, number, message, started, self.clock())

        try:
            listeners = self.listeners.prepare(config)
        except NodropError as exc:
            return failed(f"{exc}; the old generation keeps serving" if not first else str(exc))
        gen = self.gens.start(config, listeners)
        why = await wait_ready(gen, config.ready_timeout, config.ready_grace, self.clock)
        if why is not None or self._stopping:
            if self._stopping:  # not a rollback: nothing keeps serving
                why = "abandoned: the supervisor is stopping"
            self.listeners.abort(listeners)
            self.gens.drain(gen, note=why or "", failed=True)
            # The verdict on the first line; a worker's captured stderr after it.
            head, _, rest = (why or "").partition("\n")
            suffix = (
                "" if first or self._stopping else "; rolled back, the old generation keeps serving"
            )
            return failed(f"{head}{suffix}" + (f"\n{rest}" if rest else ""), gen.number)
        grace_over = self.clock()
        old = self.gens.activate(gen)
        self.listeners.activate(listeners)
        self.config = config
        stop = await self.switchover.replace(gen, old)
        return stop.outcome(gen, old, started, self.clock(), grace_over)

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
                now = self.clock()
                outcome = ReloadOutcome(False, None, f"internal error: {exc!r}", now, now)
            record_reload(self, outcome)
            self._current.set_result(outcome)
            self._current, self._next = self._next, None

    async def _reload_once(self) -> ReloadOutcome:
        started = self.clock()
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
                False, None, f"{exc}; the old generation keeps serving", started, self.clock()
            )
        self._tell_service_manager(READY="1", STATUS=self.status_line())
        return outcome

    async def reload_and_wait(self, wait: api.Wait = "ready") -> ReloadOutcome:
        outcome = await self.request_reload()
        if outcome.ok and wait == "drained" and outcome.old_generations:
            old = [g for g in self.generations if g.number in outcome.old_generations]
            exited = [await g.wait_exited() for g in old]
            if exited:
                outcome = outcome.with_old_exited(max(exited))
        return outcome

    # -- events ---------------------------------------------------------------
    def _on_notify(self) -> None:
        assert self.notify is not None
        for _ in range(256):  # bounded per wake-up; the loop calls us again
            try:
                note = self.notify.receive()
            except NodropError as exc:
                self.notify_garbage.report(f"ignored a notify message: {exc}")
                continue
            if note is None:
                return
            if not self.gens.notified(note):
                self.notify_garbage.report(
                    f"ignored a notify message from pid {note.pid}: not a worker or a worker's descendant"
                )

    def _on_sighup(self) -> None:
        self.log("SIGHUP: reloading")
        self.request_reload()

    def _forward(self, sig: int) -> None:
        self.gens.signal_active(sig)

    def _on_stop_signal(self, sig: int) -> None:
        if self._stopping:
            self.log(f"{signal_name(sig)} again: killing every worker now")
            self.gens.kill_all()
            return
        self.log(f"{signal_name(sig)}: stopping gracefully (send it again to kill)")
        self.stop()

    def stop(self) -> None:
        if self._stopping:
            return
        self._stopping = True
        self.gens.stopping = True
        self._tell_service_manager(STOPPING="1", STATUS="stopping")
        # No new connection, the queue served, then the drain (see .stopping).
        self._stop_task = asyncio.ensure_future(stop_gracefully(self.gens, self.clock, self.log))

    async def stop_and_wait(self) -> None:
        self.stop()
        assert self._stopped is not None
        await asyncio.shield(self._stopped)

    async def _shutdown(self) -> None:
        loop = self._loop
        if loop is None:
            return
        self._loop = None
        self.gens.stopping = True
        self.gens.kill_all()
        for sig in (signal.SIGHUP, signal.SIGTERM, signal.SIGINT, signal.SIGUSR1):
            loop.remove_signal_handler(sig)
        # Reap what we killed so nothing is left a zombie behind us.
        deadline = self.clock() + 5
        while self.gens.running and self.clock() < deadline:
            self.gens.reap()
            if self.gens.running:
                await asyncio.sleep(0.01)
        self.processes.unwatch(loop)
        self.output.close()
        for fut in (self._current, self._next):
            if fut is not None and not fut.done():
                now, why = self.clock(), "abandoned: the supervisor stopped"
                fut.set_result(ReloadOutcome(False, None, why, now, now))
        if self.control is not None:
            await self.control.aclose()
            with contextlib.suppress(OSError):
                os.unlink(self.control_path)
        if self.broker is not None:
            self.broker.close()
        if self.recovery is not None:
            self.recovery.close()
        if self.metrics_server is not None:
            self.metrics_server.close()
        if self.notify is not None:
            loop.remove_reader(self.notify.fileno())
            self.notify.close()
        self.listeners.close()

    # -- queries --------------------------------------------------------------
    def worker_of(self, pid: int) -> tuple[Worker, Generation] | None:
        """The worker (and its generation) that ``pid`` is, or belongs to."""
        return self.gens.worker_of(pid)

    def status_line(self) -> str:
        return summary_line(self.active)

    def status(self) -> api.StatusReply:
        """Everything ``nodrop status`` shows."""
        return build_status(self)

    # -- nodrop reexec ---------------------------------------------------------
    def reexec_refusal(self) -> str | None:
        if self.reload_in_progress or self._stopping:
            return "a reload is in progress or the supervisor is stopping; try again"
        try:
            self.reexec_state()  # refuse now, with the reason, if it cannot work
        except NodropError as exc:
            return str(exc)
        return None

    def reexec(self) -> None:
        self.log("re-executing the supervisor's program (nodrop reexec)")
        try:
            carry.execute(*self.reexec_state())
        except NodropError as exc:
            self.warn(str(exc))

    def reexec_state(self) -> tuple[carry.ReexecState, list[int]]:
        """Everything the next program needs, and the fds it must inherit."""
        assert self.notify is not None and self.control is not None
        try:
            broker = None if self.broker is None else self.broker.export_state()
        except NodropError as exc:
            raise carry.ReexecError(str(exc)) from exc
        return carry.snapshot(
            carry.Carried(
                self.config,
                [o.to_dict() for o in self.history],
                list(self.warnings_log),
                self.started,
                self.reexecs,
                self.control_path,
                self.service_notify,
            ),
            self.listeners,
            self.gens,
            self.notify,
            self.control.sock.fileno(),
            broker,
        )

    def _adopt(self, resume: carry.Resume) -> None:
        """Take over what the previous program ran."""
        state = resume.state
        self.history.extend(carry.outcome_from(o) for o in state["history"])
        self.warnings_log.extend(state["warnings"])
        self.started = state["started"]
        self.reexecs = state["reexecs"]
        self.gens.adopt(resume.generations, state["next_number"])


def run_supervisor(supervisor: Supervisor, on_exit: Callable[[], None] | None = None) -> int:
    try:
        return asyncio.run(supervisor.run())
    finally:
        if on_exit is not None:
            on_exit()
