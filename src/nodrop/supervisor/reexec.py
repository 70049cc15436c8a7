"""``nodrop reexec``: replace the supervisor's program in place.

To upgrade nodrop itself, the supervisor ``exec``s the (possibly new)
``python -m nodrop`` with its original arguments. Same pid, so its workers stay
its children and systemd keeps tracking it; the listening sockets, the notify
socket, the control socket and the workers' output pipes are kept open across
``exec`` (close-on-exec cleared for them only); the rest of its state travels
as JSON (:class:`ReexecState`) in a memfd named by ``$NODROP_REEXEC_STATE``.

Signals that would otherwise kill or confuse the process in the window
between ``exec`` and the new handlers (HUP, TERM, INT, USR1, CHLD) are blocked
before ``exec`` -- the mask survives it -- and unblocked by the new process
once its handlers are in place, so a signal sent meanwhile is delivered then,
not lost.

This module knows the state's shape and how to carry it; the supervisor
builds it (``Supervisor.reexec_state``) and adopts it (``Supervisor.run``
with a :class:`Resume`).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, NotRequired, TypedDict

from nodrop.errors import NodropError
from nodrop.listeners.held import HeldSocket
from nodrop.listeners.spec import parse_spec
from nodrop.supervisor.config import RunConfig, config_from_dict, config_to_dict
from nodrop.supervisor.generations import GenerationSet
from nodrop.supervisor.inherit_listeners import InheritListeners, ListenerProvider
from nodrop.supervisor.model import Generation, GenState, ReloadOutcome, Worker, WorkerState
from nodrop.systemd.receiver import NotifyReceiver

STATE_ENV = "NODROP_REEXEC_STATE"
STATE_VERSION = 1
HELD_SIGNALS = frozenset(
    {signal.SIGHUP, signal.SIGTERM, signal.SIGINT, signal.SIGUSR1, signal.SIGCHLD}
)


class ReexecError(NodropError):
    pass


class WorkerRecord(TypedDict):
    generation: int
    index: int
    pid: int
    state: str
    started: float
    ready_at: float | None
    exit_code: int | None
    restarts: int
    status: str
    stderr_tail: list[str]
    streams: list[int]
    output_fds: NotRequired[list[int]]


class GenerationRecord(TypedDict):
    number: int
    state: str
    config: dict[str, Any]
    listeners: list[int]
    workers: list[WorkerRecord]
    started: float
    ready_at: float | None
    drain_started: float | None
    exited_at: float | None
    note: str
    cwd: str | None


class HeldRecord(TypedDict):
    fd: int
    name: str
    spec: str | None


class SocketRecord(TypedDict):
    fd: int
    path: str


class NotifyRecord(SocketRecord):
    dir: str | None


class ReexecState(TypedDict):
    """Everything the next program needs (JSON in a memfd)."""

    version: int
    config: dict[str, Any]
    listeners: dict[str, Any]
    listeners_kind: str
    held: list[HeldRecord]
    generations: list[GenerationRecord]
    active: int | None
    next_number: int
    history: list[dict[str, Any]]
    warnings: list[str]
    started: float
    reexecs: int
    notify: NotifyRecord
    control: SocketRecord
    service_notify: str | None
    broker: dict[str, Any] | None


def worker_state(worker: Worker, streams: list[int]) -> WorkerRecord:
    return {
        "generation": worker.generation,
        "index": worker.index,
        "pid": worker.pid,
        "state": worker.state.value,
        "started": worker.started,
        "ready_at": worker.ready_at,
        "exit_code": worker.exit_code,
        "restarts": worker.restarts,
        "status": worker.status_text,
        "stderr_tail": list(worker.stderr_tail),
        "streams": streams,
        "output_fds": list(worker.output_fds),
    }


def _worker_from(data: WorkerRecord) -> Worker:
    worker = Worker(
        data["generation"],
        data["index"],
        data["pid"],
        WorkerState(data["state"]),
        data["started"],
        data["ready_at"],
        data["exit_code"],
        data["restarts"],
        data["status"],
    )
    worker.stderr_tail.extend(data["stderr_tail"])
    worker.output_fds = tuple(data.get("output_fds", ()))
    return worker


def generation_state(
    gen: Generation, listener_index: dict[int, int], workers: list[WorkerRecord]
) -> GenerationRecord:
    """``listener_index`` maps ``id(held socket)`` to its place in ``held``."""
    return {
        "number": gen.number,
        "state": gen.state.value,
        "config": config_to_dict(gen.config),
        "listeners": [listener_index[id(h)] for h in gen.listeners if id(h) in listener_index],
        "workers": workers,
        "started": gen.started,
        "ready_at": gen.ready_at,
        "drain_started": gen.drain_started,
        "exited_at": gen.exited_at,
        "note": gen.note,
        "cwd": gen.cwd,
    }


def held_state(held: Sequence[HeldSocket]) -> list[HeldRecord]:
    return [
        {"fd": h.fileno(), "name": h.name, "spec": None if h.spec is None else h.spec.text}
        for h in held
    ]


@dataclass(frozen=True)
class Carried:
    """What the supervisor carries besides its sockets and generations."""

    config: RunConfig
    history: list[dict[str, Any]]
    warnings: list[str]
    started: float
    reexecs: int
    control_path: str
    service_notify: str | None


def snapshot(
    carried: Carried,
    listeners: ListenerProvider,
    gens: GenerationSet,
    notify: NotifyReceiver,
    control_fd: int,
    broker: tuple[dict[str, Any], list[int]] | None,
) -> tuple[ReexecState, list[int]]:
    """The state for the next program, and the fds it must inherit."""
    fds: list[int] = []
    if broker is not None:
        fds.extend(broker[1])
    listeners_state, held, extra = listeners.export_state()
    fds.extend(extra)
    index = {id(h): i for i, h in enumerate(held)}
    fds.extend(h.fileno() for h in held)
    generations = []
    for gen in gens.all:
        workers = []
        for worker in gen.workers:
            streams = gens.output_fds(worker)
            fds.extend(streams)
            workers.append(worker_state(worker, streams))
        generations.append(generation_state(gen, index, workers))
    fds.extend([notify.fileno(), control_fd])
    state: ReexecState = {
        "version": STATE_VERSION,
        "config": config_to_dict(carried.config),
        "listeners": listeners_state,
        "listeners_kind": listeners.kind,
        "held": held_state(held),
        "generations": generations,
        "active": None if gens.active is None else gens.active.number,
        "next_number": gens.next_number,
        "history": carried.history,
        "warnings": carried.warnings,
        "started": carried.started,
        "reexecs": carried.reexecs + 1,
        "notify": {"fd": notify.fileno(), "path": notify.path, "dir": notify.private_dir},
        "control": {"fd": control_fd, "path": carried.control_path},
        "service_notify": carried.service_notify,
        "broker": None if broker is None else broker[0],
    }
    return state, fds


def execute(state: ReexecState, fds: Sequence[int]) -> None:
    """Exec the new program with ``state``, keeping ``fds`` open across it.
    Returns only by raising."""
    data = json.dumps(state).encode()
    memfd = os.memfd_create("nodrop-reexec-state", 0)  # no MFD_CLOEXEC: it must survive exec
    try:
        os.write(memfd, data)
        os.lseek(memfd, 0, os.SEEK_SET)
        for fd in fds:
            os.set_inheritable(fd, True)
        env = dict(os.environ, **{STATE_ENV: str(memfd)})
        if state["service_notify"]:
            env["NOTIFY_SOCKET"] = state["service_notify"]
        argv = [sys.executable, "-m", "nodrop", *sys.argv[1:]]
        signal.pthread_sigmask(signal.SIG_BLOCK, HELD_SIGNALS)
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(OSError, ValueError):  # a full disk must not stop it
                stream.flush()
        os.execve(sys.executable, argv, env)
    except OSError as exc:
        signal.pthread_sigmask(signal.SIG_UNBLOCK, HELD_SIGNALS)
        for fd in fds:
            os.set_inheritable(fd, False)
        raise ReexecError(f"cannot re-execute {sys.executable}: {exc.strerror}") from exc
    finally:
        os.close(memfd)


def load_state() -> ReexecState | None:
    """The state a previous program left us, if we are a re-execution."""
    value = os.environ.pop(STATE_ENV, None)
    if value is None:
        return None
    fd = int(value)
    try:
        with os.fdopen(fd, "rb") as f:
            state: ReexecState = json.loads(f.read())
    except (OSError, ValueError) as exc:
        raise ReexecError(f"cannot read the state of the previous program: {exc}") from exc
    if state.get("version") != STATE_VERSION:
        raise ReexecError(f"unsupported re-exec state version {state.get('version')!r}")
    return state


def adopt_socket(fd: int) -> socket.socket:
    os.set_inheritable(fd, False)
    return socket.socket(fileno=fd)


@dataclass
class Resume:
    """A previous program's state, with its sockets adopted."""

    state: ReexecState
    generations: list[tuple[Generation, list[tuple[Worker, list[int]]]]]


def restore(
    state: ReexecState, log: Callable[[str], None] = lambda _m: None
) -> tuple[ListenerProvider, Resume]:
    listeners, held = restore_listeners(state, log)
    return listeners, Resume(state, restore_generations(state, held))


def restore_listeners(
    state: ReexecState, log: Callable[[str], None] = lambda _m: None
) -> tuple[ListenerProvider, list[HeldSocket]]:
    held = [
        HeldSocket.adopt(
            adopt_socket(item["fd"]),
            item["name"],
            None if item["spec"] is None else parse_spec(item["spec"]),
        )
        for item in state["held"]
    ]
    if state.get("listeners_kind", "inherit") == "reuseport":
        from nodrop.supervisor.reuseport_listeners import ReuseportListeners

        for _key, map_fd, prog_fd in state["listeners"]["steering"]:
            os.set_inheritable(map_fd, False)
            os.set_inheritable(prog_fd, False)
        return ReuseportListeners.from_state(state["listeners"], held, log=log), held
    return InheritListeners.from_state(state["listeners"], held), held


def restore_generations(
    state: ReexecState, held: list[HeldSocket]
) -> list[tuple[Generation, list[tuple[Worker, list[int]]]]]:
    out = []
    for data in state["generations"]:
        gen = Generation(
            data["number"],
            config_from_dict(data["config"]),
            [held[i] for i in data["listeners"]],
            state=GenState(data["state"]),
            started=data["started"],
            ready_at=data["ready_at"],
            drain_started=data["drain_started"],
            exited_at=data["exited_at"],
            note=data["note"],
            cwd=data.get("cwd"),
        )
        workers = []
        for wdata in data["workers"]:
            worker = _worker_from(wdata)
            gen.workers.append(worker)
            for fd in wdata["streams"]:
                os.set_inheritable(fd, False)
            workers.append((worker, list(wdata["streams"])))
        out.append((gen, workers))
    return out


def outcome_from(data: dict[str, Any]) -> ReloadOutcome:
    return ReloadOutcome(
        data["ok"],
        data["generation"],
        data["message"],
        data["started"],
        data["finished"],
        data["ready"],
        tuple(data["old_generations"]),
        data["old_exited"],
        data.get("old_stopped_accepting"),
        data.get("timing"),
    )
