"""Generations and workers: the supervisor's state.

A *generation* is the set of N workers started from one config; a reload
starts generation n+1 and, once every worker of it is ready, drains n.
Each :class:`Generation` owns its runtime state too: an event set on every
change (what readiness waits on), a future resolved when it has exited, and
its drain-timeout timer. The supervisor sends the signals; the generation
keeps the books.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import enum
import time
from dataclasses import dataclass, field
from typing import Any

from nodrop.listeners.held import HeldSocket
from nodrop.supervisor.config import RunConfig

STDERR_TAIL_LINES = 10


class WorkerState(enum.Enum):
    STARTING = "starting"
    READY = "ready"
    DRAINING = "draining"
    EXITED = "exited"


class GenState(enum.Enum):
    STARTING = "starting"
    ACTIVE = "active"
    DRAINING = "draining"
    EXITED = "exited"
    FAILED = "failed"


@dataclass(eq=False)
class Worker:
    generation: int
    index: int
    pid: int
    state: WorkerState = WorkerState.STARTING
    started: float = field(default_factory=time.monotonic)
    ready_at: float | None = None
    exit_code: int | None = None
    restarts: int = 0
    status_text: str = ""
    stopping_at: float | None = None
    """When it said STOPPING=1 (it has stopped accepting)."""
    output_fds: tuple[int, ...] = ()
    """Where the worker holds the read ends of its own output pipes (fd numbers in it)."""
    stderr_tail: collections.deque[str] = field(
        default_factory=lambda: collections.deque(maxlen=STDERR_TAIL_LINES)
    )

    @property
    def label(self) -> str:
        return f"g{self.generation}.w{self.index}"

    def describe_exit(self) -> str:
        code = self.exit_code
        if code is None:
            return "is running"
        if code < 0:
            return f"was killed by signal {-code}"
        return f"exited with status {code}"

    def to_dict(self, now: float) -> dict[str, Any]:
        return {
            "index": self.index,
            "pid": self.pid,
            "state": self.state.value,
            "age": round(now - self.started, 3),
            "ready_after": None
            if self.ready_at is None
            else round(self.ready_at - self.started, 6),
            "restarts": self.restarts,
            "exit_code": self.exit_code,
            "status": self.status_text,
            "said_stopping": self.stopping_at is not None,
        }


@dataclass(eq=False)
class Generation:
    number: int
    config: RunConfig
    listeners: list[HeldSocket]
    workers: list[Worker] = field(default_factory=list)
    state: GenState = GenState.STARTING
    started: float = field(default_factory=time.monotonic)
    ready_at: float | None = None
    drain_started: float | None = None
    exited_at: float | None = None
    note: str = ""
    cwd: str | None = None
    """The working directory its workers run in, resolved when it started."""
    changed: asyncio.Event = field(default_factory=asyncio.Event, repr=False)
    """Set on every change to the generation or its workers."""
    kill_timer: asyncio.TimerHandle | None = field(default=None, repr=False)
    _exited: asyncio.Future[float] | None = field(default=None, repr=False)

    def live_workers(self) -> list[Worker]:
        return [w for w in self.workers if w.state is not WorkerState.EXITED]

    def all_ready(self) -> bool:
        return bool(self.workers) and all(w.state is WorkerState.READY for w in self.workers)

    @property
    def finished(self) -> bool:
        """Exited or failed, and no worker left."""
        return self.state in (GenState.EXITED, GenState.FAILED) and not self.live_workers()

    def poke(self) -> None:
        self.changed.set()

    def mark_ready(self, worker: Worker, now: float) -> None:
        worker.state = WorkerState.READY
        worker.ready_at = now
        self.poke()

    def begin_drain(self, now: float, note: str = "", failed: bool = False) -> bool:
        """Enter DRAINING (or FAILED); False if it drains or exited already."""
        if self.drain_started is not None or self.state is GenState.EXITED:
            return False
        self.state = GenState.FAILED if failed else GenState.DRAINING
        self.drain_started = now
        if note:
            self.note = note
        for worker in self.live_workers():
            worker.state = WorkerState.DRAINING
        return True

    def finish(self, now: float) -> None:
        """Every worker has exited: record it, stop the timer, wake waiters."""
        if self.state is not GenState.FAILED:
            self.state = GenState.EXITED
        self.exited_at = now
        if self.kill_timer is not None:
            self.kill_timer.cancel()
            self.kill_timer = None
        if self._exited is not None and not self._exited.done():
            self._exited.set_result(now)

    async def wait_exited(self) -> float:
        """When every worker of this generation has exited (monotonic time)."""
        if self.exited_at is not None and not self.live_workers():
            return self.exited_at
        if self._exited is None:
            self._exited = asyncio.get_running_loop().create_future()
        return await asyncio.shield(self._exited)

    def to_dict(self, now: float) -> dict[str, Any]:
        return {
            "generation": self.number,
            "state": self.state.value,
            "age": round(now - self.started, 3),
            "ready_after": None
            if self.ready_at is None
            else round(self.ready_at - self.started, 3),
            "draining_for": None
            if self.drain_started is None or self.state is not GenState.DRAINING
            else round(now - self.drain_started, 3),
            "command": list(self.config.command),
            "cwd": self.cwd,
            "workers": [w.to_dict(now) for w in self.workers],
            "note": self.note,
        }


@dataclass(frozen=True)
class ReloadOutcome:
    """What became of one reload: the answer ``nodrop reload`` prints."""

    ok: bool
    generation: int | None
    message: str
    started: float
    finished: float
    ready: float | None = None
    old_generations: tuple[int, ...] = ()
    old_exited: float | None = None
    old_stopped_accepting: dict[str, Any] | None = None
    """How and when the old generation stopped accepting (:mod:`.switchover`)."""
    timing: dict[str, Any] | None = None
    """Where the reload's time went (:mod:`.timing`): the app's part and nodrop's."""

    @property
    def duration(self) -> float:
        return self.finished - self.started

    def with_old_exited(self, when: float) -> ReloadOutcome:
        return dataclasses.replace(self, old_exited=when)

    def to_dict(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "generation": self.generation,
            "message": self.message,
            "started": self.started,
            "finished": self.finished,
            "ready": self.ready,
            "duration": round(self.duration, 6),
            "old_generations": list(self.old_generations),
            "old_exited": self.old_exited,
            "old_stopped_accepting": self.old_stopped_accepting,
            "timing": self.timing,
        }
