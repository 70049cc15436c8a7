"""``nodrop reexec``: replace the supervisor's program in place.

To upgrade nodrop itself, the supervisor ``exec``s the (possibly new)
``python -m nodrop`` with its original arguments. Same pid, so its workers stay
its children and systemd keeps tracking it; the listening sockets, the notify
socket, the control socket and the workers' output pipes are kept open across
``exec`` (close-on-exec cleared for them only); the rest of its state travels
as JSON in a memfd named by ``$NODROP_REEXEC_STATE``.

Signals that would otherwise kill or confuse the process in the window
between ``exec`` and the new handlers (HUP, TERM, INT, USR1, CHLD) are blocked
before ``exec`` -- the mask survives it -- and unblocked by the new process
once its handlers are in place, so a signal sent meanwhile is delivered then,
not lost.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from nodrop.errors import NodropError
from nodrop.listeners.held import HeldSocket
from nodrop.supervisor.config import config_from_dict, config_to_dict
from nodrop.supervisor.inherit_listeners import InheritListeners, ListenerProvider
from nodrop.supervisor.model import Generation, GenState, ReloadOutcome, Worker, WorkerState

if TYPE_CHECKING:
    from nodrop.supervisor.supervisor import Supervisor

STATE_ENV = "NODROP_REEXEC_STATE"
STATE_VERSION = 1
HELD_SIGNALS = frozenset(
    {signal.SIGHUP, signal.SIGTERM, signal.SIGINT, signal.SIGUSR1, signal.SIGCHLD}
)


class ReexecError(NodropError):
    pass


def _worker_dict(worker: Worker, streams: list[int]) -> dict[str, Any]:
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
    }


def _worker_from(data: dict[str, Any]) -> Worker:
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
    return worker


def snapshot(sup: Supervisor) -> tuple[dict[str, Any], list[int]]:
    """Everything the next program needs, and the fds it must inherit."""
    from nodrop.supervisor.reuseport_listeners import ReuseportListeners

    assert sup.notify is not None and sup.control is not None
    fds: list[int] = []
    broker_state: dict[str, Any] | None = None
    if sup.broker is not None:
        export = getattr(sup.broker, "export_state", None)
        if export is None:
            raise ReexecError(f"nodrop reexec cannot carry {type(sup.broker).__name__}")
        try:
            broker_state, broker_fds = export()
        except NodropError as exc:
            raise ReexecError(str(exc)) from exc
        fds.extend(broker_fds)
    if isinstance(sup.listeners, InheritListeners):
        kind = "inherit"
        listeners_state, held = sup.listeners.export_state()
    elif isinstance(sup.listeners, ReuseportListeners):
        kind = "reuseport"
        listeners_state, held, extra = sup.listeners.export_state()
        fds.extend(extra)
    else:
        raise ReexecError(f"nodrop reexec cannot carry {type(sup.listeners).__name__}")
    index = {id(h): i for i, h in enumerate(held)}
    fds.extend(h.fileno() for h in held)
    generations = []
    for gen in sup.generations:
        workers = []
        for worker in gen.workers:
            streams = sup.output.fds(worker.pid) if sup.output is not None else []
            if worker.state is not WorkerState.EXITED:
                fds.extend(streams)
            else:
                streams = []
            workers.append(_worker_dict(worker, streams))
        generations.append(
            {
                "number": gen.number,
                "state": gen.state.value,
                "config": config_to_dict(gen.config),
                "listeners": [index[id(h)] for h in gen.listeners if id(h) in index],
                "workers": workers,
                "started": gen.started,
                "ready_at": gen.ready_at,
                "drain_started": gen.drain_started,
                "exited_at": gen.exited_at,
                "note": gen.note,
            }
        )
    fds.extend([sup.notify.fileno(), sup.control.sock.fileno()])
    state = {
        "version": STATE_VERSION,
        "config": config_to_dict(sup.config),
        "listeners": listeners_state,
        "listeners_kind": kind,
        "held": [
            {"fd": h.fileno(), "name": h.name, "spec": None if h.spec is None else h.spec.text}
            for h in held
        ],
        "generations": generations,
        "active": None if sup.active is None else sup.active.number,
        "next_number": sup._next_number,
        "history": [o.to_dict() for o in sup.history],
        "warnings": list(sup.warnings_log),
        "started": sup.started,
        "reexecs": sup.reexecs + 1,
        "notify": {
            "fd": sup.notify.fileno(),
            "path": sup.notify.path,
            "dir": sup.notify.private_dir,
        },
        "control": {"fd": sup.control.sock.fileno(), "path": sup.control_path},
        "service_notify": sup._service_notify,
        "broker": broker_state,
    }
    return state, fds


def execute(sup: Supervisor) -> None:
    """Exec the new program with our state. Returns only by raising."""
    state, fds = snapshot(sup)
    data = json.dumps(state).encode()
    memfd = os.memfd_create("nodrop-reexec-state", 0)  # no MFD_CLOEXEC: it must survive exec
    try:
        os.write(memfd, data)
        os.lseek(memfd, 0, os.SEEK_SET)
        for fd in fds:
            os.set_inheritable(fd, True)
        env = dict(os.environ, **{STATE_ENV: str(memfd)})
        if sup._service_notify:
            env["NOTIFY_SOCKET"] = sup._service_notify
        argv = [sys.executable, "-m", "nodrop", *sys.argv[1:]]
        signal.pthread_sigmask(signal.SIG_BLOCK, HELD_SIGNALS)
        sys.stdout.flush()
        sys.stderr.flush()
        os.execve(sys.executable, argv, env)
    except OSError as exc:
        signal.pthread_sigmask(signal.SIG_UNBLOCK, HELD_SIGNALS)
        for fd in fds:
            os.set_inheritable(fd, False)
        raise ReexecError(f"cannot re-execute {sys.executable}: {exc.strerror}") from exc
    finally:
        os.close(memfd)


def load_state() -> dict[str, Any] | None:
    """The state a previous program left us, if we are a re-execution."""
    value = os.environ.pop(STATE_ENV, None)
    if value is None:
        return None
    fd = int(value)
    try:
        with os.fdopen(fd, "rb") as f:
            state: dict[str, Any] = json.loads(f.read())
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

    state: dict[str, Any]
    generations: list[tuple[Generation, list[tuple[Worker, list[int]]]]]


def restore(
    state: dict[str, Any], log: Callable[[str], None] = lambda _m: None
) -> tuple[ListenerProvider, Resume]:
    listeners, held = restore_listeners(state, log)
    return listeners, Resume(state, restore_generations(state, held))


def restore_listeners(
    state: dict[str, Any], log: Callable[[str], None] = lambda _m: None
) -> tuple[ListenerProvider, list[HeldSocket]]:
    from nodrop.listeners.spec import parse_spec

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
    state: dict[str, Any], held: list[HeldSocket]
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
    )


def adopt(sup: Supervisor, resume: Resume) -> None:
    """Make ``sup`` take over what the previous program ran."""
    assert sup._loop is not None
    state = resume.state
    sup._next_number = state["next_number"]
    sup.history.extend(outcome_from(o) for o in state["history"])
    sup.warnings_log.extend(state["warnings"])
    sup.started = state["started"]
    sup.reexecs = state["reexecs"]
    now = time.monotonic()
    for gen, workers in resume.generations:
        sup.generations.append(gen)
        sup._changed[gen.number] = asyncio.Event()
        sup._drained[gen.number] = sup._loop.create_future()
        if gen.state is GenState.ACTIVE:
            sup.active = gen
        for worker, streams in workers:
            if worker.state is WorkerState.EXITED:
                continue
            sup._workers[worker.pid] = (worker, gen)
            if sup.output is not None:
                sup.output.attach(worker.pid, worker.label, streams, worker.stderr_tail.append)
        if gen.drain_started is not None and gen.live_workers():
            left = gen.drain_started + gen.config.drain_timeout - now
            sup._kill_timers[gen.number] = sup._loop.call_later(
                max(0.0, left), sup._drain_timeout, gen
            )
        elif gen.state in (GenState.EXITED, GenState.FAILED) and not gen.live_workers():
            sup._drained[gen.number].set_result(gen.exited_at or now)
    # Children that exited while we were exec'ing are reaped now; restarts
    # that were pending are scheduled again.
    sup._on_sigchld()
    if sup.active is not None:
        for worker in sup.active.workers:
            if worker.state is WorkerState.EXITED:
                sup._schedule_restart(sup.active, worker)
