"""Every generation and worker a supervisor runs: starting them, marking
them ready, draining, killing, restarting and reaping them.

The supervisor decides *when* (a reload, a stop, a signal); this module
does it, through the :class:`~.process.Processes` seam, and keeps the books
in :class:`~.model.Generation` and :class:`~.model.Worker`.
"""

from __future__ import annotations

import asyncio
import os
import signal
from collections.abc import Callable, Sequence

from nodrop.errors import ConfigError
from nodrop.listeners.held import HeldSocket
from nodrop.supervisor import priority
from nodrop.supervisor.config import ReadyMode, RunConfig
from nodrop.supervisor.inherit_listeners import ListenerProvider
from nodrop.supervisor.lineage import ancestry
from nodrop.supervisor.model import Generation, GenState, Worker, WorkerState
from nodrop.supervisor.output import WorkerOutput
from nodrop.supervisor.process import Processes
from nodrop.supervisor.restarts import RestartPolicy
from nodrop.supervisor.workdir import resolve_workdir
from nodrop.systemd.receiver import Notification

KEEP_EXITED_GENERATIONS = 5

WorkerEnv = Callable[[Generation, int], dict[str, str]]


class GenerationSet:
    """The generations of one supervisor, oldest first.

    Args:
        processes: the OS seam.
        listeners: the listener strategy (told when a generation drains and
            which sockets live generations still use).
        restarts: when to restart a worker of the active generation.
        output: the workers' tagged output streams.
        worker_env: the environment of worker ``index`` of a generation.
        clock: monotonic seconds.
        log, warn: one line each; ``warn`` also goes to ``status``.
    """

    def __init__(
        self,
        processes: Processes,
        listeners: ListenerProvider,
        restarts: RestartPolicy,
        output: WorkerOutput,
        worker_env: WorkerEnv,
        clock: Callable[[], float],
        log: Callable[[str], None],
        warn: Callable[[str], None],
    ) -> None:
        self.processes = processes
        self.listeners = listeners
        self.restarts = restarts
        self.output = output
        self.worker_env = worker_env
        self.clock = clock
        self.log = log
        self.warn = warn
        self.all: list[Generation] = []
        self.active: Generation | None = None
        self.next_number = 1
        self.stopping = False
        """Set by the supervisor: no more restarts, and :attr:`on_all_exited` fires."""
        self.on_all_exited: Callable[[], None] = lambda: None
        self.on_exited: Callable[[Generation], None] = lambda _gen: None
        """Called once each generation has no worker left."""
        self.on_kill: Callable[[Generation], None] = lambda _gen: None
        """Called right before a generation's workers get SIGKILL."""
        self.restart_count = 0
        """Worker restarts scheduled since the supervisor started."""
        self.on_change: Callable[[], None] = lambda: None
        """Called after every spawn, exit and change of state (the recovery
        state is written then: :mod:`.recovery`)."""
        self.restart_failures = 0
        """Restart attempts that could not spawn (each is tried again)."""
        self._workers: dict[int, tuple[Worker, Generation]] = {}

    # -- starting -------------------------------------------------------------
    def start(self, config: RunConfig, listeners: list[HeldSocket]) -> Generation:
        """Start a new generation's workers (a spawn error is in ``gen.note``)."""
        gen = Generation(self.next_number, config, listeners, started=self.clock())
        self.next_number += 1
        self.all.append(gen)
        try:
            gen.cwd = resolve_workdir(config.chdir)  # once: every worker runs the same release
        except ConfigError as exc:
            gen.note = f"cannot start: {exc}"
            return gen
        for index in range(1, config.workers + 1):
            try:
                gen.workers.append(self._spawn(gen, index))
            except OSError as exc:
                gen.note = f"cannot start worker {index}: {exc}"
                break
            self.on_change()  # recorded before anything else can happen
        return gen

    def _spawn(self, gen: Generation, index: int, restarts: int = 0) -> Worker:
        config = gen.config
        pipes = self.output.pipes()
        try:
            pid = self.processes.spawn(
                config.command,
                self.worker_env(gen, index),
                [h.fileno() for h in gen.listeners],
                [h.name for h in gen.listeners],
                pipes[0][1] if pipes else None,
                pipes[1][1] if pipes else None,
                gen.cwd,
                # The worker holds its own pipes' read ends (unannounced, after
                # its listeners): if we die, its writes neither fail nor kill
                # it, and our successor takes them (docs/recovery.md).
                keep=[r for r, _ in pipes],
            )
        except OSError:
            for r, w in pipes:
                os.close(r)
                os.close(w)
            raise
        for _, w in pipes:
            os.close(w)
        if (why := priority.lower(pid, config.startup_priority)) is not None:
            self.warn(why)
        worker = Worker(gen.number, index, pid, started=self.clock(), restarts=restarts)
        if pipes:
            first = len(gen.listeners) + 3
            worker.output_fds = (first, first + 1)
        self.output.attach(pid, worker.label, [r for r, _ in pipes], worker.stderr_tail.append)
        self._workers[pid] = (worker, gen)
        if config.ready.mode is ReadyMode.DELAY:
            asyncio.get_running_loop().call_later(
                config.ready.delay, self._delay_passed, gen, worker
            )
        return worker

    def _delay_passed(self, gen: Generation, worker: Worker) -> None:
        if worker.state is WorkerState.STARTING:
            gen.mark_ready(worker, self.clock())
            self._restore_priority(worker, gen)

    def _restore_priority(self, worker: Worker, gen: Generation) -> None:
        if (why := priority.restore(worker.pid, gen.config.startup_priority)) is not None:
            self.warn(why)

    def notified(self, note: Notification) -> bool:
        """A worker's message (``READY=1``, ``STATUS=``, ``STOPPING=1``); the kernel-stamped
        ``note.pid`` says which worker. False if ``note.pid`` is neither a worker nor one's
        descendant (ignored). Tests of fake workers call it directly."""
        note.close_fds()  # nodrop run keeps no fd store
        entry = self.worker_of(note.pid)
        if entry is None:
            return False
        worker, gen = entry
        if "STATUS" in note.fields:
            worker.status_text = note.fields["STATUS"]
        if note.fields.get("STOPPING") == "1" and worker.stopping_at is None:
            worker.stopping_at = self.clock()  # it stopped accepting (see .switchover)
        if note.fields.get("READY") == "1" and worker.state is WorkerState.STARTING:
            gen.mark_ready(worker, self.clock())
            self._restore_priority(worker, gen)
        return True

    def activate(self, gen: Generation) -> list[Generation]:
        """``gen`` is ready: make it the active one; returns the generations
        it replaces (the caller drains them)."""
        gen.state = GenState.ACTIVE
        gen.ready_at = max(w.ready_at or 0.0 for w in gen.workers)
        old = [g for g in self.all if g.state is GenState.ACTIVE and g is not gen]
        self.active = gen
        self.on_change()
        return old

    # -- stopping -------------------------------------------------------------
    def drain(self, gen: Generation, note: str = "", failed: bool = False) -> None:
        """Send the drain signal; SIGKILL what is left after the drain timeout.

        A failed (rolled back) generation is drained too rather than killed
        outright: sharing the listening socket, it may already have accepted
        connections, and those deserve their answers.
        """
        if not gen.begin_drain(self.clock(), note, failed):
            return
        self.listeners.draining(gen.listeners)
        self.on_change()
        for worker in gen.live_workers():
            self.processes.signal(worker.pid, gen.config.drain_signal)
        if not gen.live_workers():
            self._exited(gen)
            return
        gen.kill_timer = asyncio.get_running_loop().call_later(
            gen.config.drain_timeout, self._drain_timeout, gen
        )

    def drain_all(self) -> None:
        for gen in list(self.all):
            if gen.live_workers():
                self.drain(gen)
        self._check_all_exited()

    def _drain_timeout(self, gen: Generation) -> None:
        live = gen.live_workers()
        if live:
            self.warn(
                f"generation {gen.number} still had {len(live)} worker(s) after the "
                f"{gen.config.drain_timeout:g}s drain timeout: SIGKILL"
            )
            gen.note = "killed at the drain timeout"
            self.kill(gen)

    def kill(self, gen: Generation) -> None:
        if gen.live_workers():
            self.on_kill(gen)
        for worker in gen.live_workers():
            self.processes.signal_group(worker.pid, signal.SIGKILL)
            self.processes.signal(worker.pid, signal.SIGKILL)
        if not gen.live_workers():
            self._exited(gen)

    def kill_all(self) -> None:
        for gen in self.all:
            self.kill(gen)

    def enforce_drain_cap(self, cap: int) -> None:
        """Kill the oldest draining generations past ``cap`` (and say so)."""
        draining = [g for g in self.all if g.state is GenState.DRAINING]
        for gen in draining[: max(len(draining) - cap, 0)]:
            self.warn(
                f"generation {gen.number} killed: more than {cap} "
                "generations were draining (--max-draining)"
            )
            gen.note = "killed at the drain cap"
            self.kill(gen)

    def _exited(self, gen: Generation) -> None:
        gen.finish(self.clock())
        self.on_exited(gen)
        self.listeners.collect(g.listeners for g in self.all if not g.finished)
        done = [g for g in self.all if g.finished]
        for old in done[:-KEEP_EXITED_GENERATIONS]:
            self.all.remove(old)
        self._check_all_exited()

    def _check_all_exited(self) -> None:
        if self.stopping and all(not g.live_workers() for g in self.all):
            self.on_all_exited()

    # -- children exiting -------------------------------------------------------
    def reap(self) -> None:
        """Collect exited children: restart active workers, finish generations."""
        reaped = self.processes.reap()
        for pid, code in reaped:
            entry = self._workers.pop(pid, None)
            self.output.detach(pid)
            if entry is None:
                continue  # an orphan handed to us (we are PID 1 or a subreaper)
            worker, gen = entry
            was = worker.state
            worker.state = WorkerState.EXITED
            worker.exit_code = code
            gen.poke()
            if (
                gen.state is GenState.ACTIVE
                and not self.stopping
                and was is not WorkerState.DRAINING
            ):
                self._schedule_restart(gen, worker)
            elif not gen.live_workers() and gen.state in (GenState.DRAINING, GenState.FAILED):
                self._exited(gen)
        if reaped:
            self.on_change()

    @property
    def running(self) -> int:
        """Workers not reaped yet."""
        return len(self._workers)

    def _schedule_restart(self, gen: Generation, worker: Worker) -> None:
        now = self.clock()
        self.restart_count += 1
        restarts, delay = self.restarts.next_attempt(worker.restarts, now - worker.started, now)
        message = f"worker {worker.label} (pid {worker.pid}) {worker.describe_exit()}; restarting in {delay:.1f}s"
        if self.restarts.crash_loop(now):
            self.warn(
                f"crash loop: {self.restarts.recent(now)} restarts in the last "
                f"{self.restarts.window:g}s; {message}"
            )
        else:
            self.log(message)
        asyncio.get_running_loop().call_later(delay, self._restart, gen, worker.index, restarts)

    def _restart(self, gen: Generation, index: int, restarts: int) -> None:
        if gen.state is not GenState.ACTIVE or self.stopping:
            return
        try:
            new = self._spawn(gen, index, restarts)
        except OSError as exc:
            # Out of fds or processes now is not out of them for ever: try
            # again with the backoff, and say so each time (``status`` shows
            # the generation short of workers meanwhile).
            delay = self.restarts.delay(restarts + 1)
            self.warn(
                f"cannot restart worker {index} of generation {gen.number}: {exc}; "
                f"trying again in {delay:.1f}s"
            )
            self.restart_failures += 1
            asyncio.get_running_loop().call_later(delay, self._restart, gen, index, restarts + 1)
            return
        gen.workers = [new if w.index == index else w for w in gen.workers]
        self.on_change()

    # -- queries ----------------------------------------------------------------
    def worker_of(self, pid: int) -> tuple[Worker, Generation] | None:
        """The worker (and its generation) that ``pid`` is or descends from
        (a process group can be joined by anyone in the session; a parent cannot)."""
        for ancestor in ancestry(pid, self.processes.parent_of):
            entry = self._workers.get(ancestor)
            if entry is not None:
                return entry
        return None

    def signal_active(self, sig: int) -> None:
        if self.active is not None:
            for worker in self.active.live_workers():
                self.processes.signal(worker.pid, sig)

    # -- nodrop reexec ------------------------------------------------------------
    def adopt(
        self,
        generations: Sequence[tuple[Generation, Sequence[tuple[Worker, list[int]]]]],
        next_number: int,
    ) -> None:
        """Take over the generations a previous program ran (their workers
        are our children already; ``streams`` are their output pipes)."""
        self.next_number = next_number
        now = self.clock()
        loop = asyncio.get_running_loop()
        for gen, workers in generations:
            self.all.append(gen)
            if gen.state is GenState.ACTIVE:
                self.active = gen
            for worker, streams in workers:
                if worker.state is WorkerState.EXITED:
                    continue
                self._workers[worker.pid] = (worker, gen)
                self.output.attach(worker.pid, worker.label, streams, worker.stderr_tail.append)
            if gen.drain_started is not None and gen.live_workers():
                left = gen.drain_started + gen.config.drain_timeout - now
                gen.kill_timer = loop.call_later(max(0.0, left), self._drain_timeout, gen)
        # Children that exited while we were exec'ing are reaped now; restarts
        # that were pending are scheduled again.
        self.reap()
        if self.active is not None:
            for worker in self.active.workers:
                if worker.state is WorkerState.EXITED:
                    self._schedule_restart(self.active, worker)

    def output_fds(self, worker: Worker) -> list[int]:
        return [] if worker.state is WorkerState.EXITED else self.output.fds(worker.pid)
