"""What a supervisor reports: its state as one JSON object (``nodrop
status``), and each reload and ledger as it happens (metrics, event log)."""

from __future__ import annotations

import collections
import os
from collections.abc import Callable
from typing import Any, Protocol

from nodrop._version import __version__
from nodrop.supervisor import api, logsink
from nodrop.supervisor.config import RunConfig
from nodrop.supervisor.eventlog import EventLog
from nodrop.supervisor.generations import GenerationSet
from nodrop.supervisor.handoff_check import note as handoff_note
from nodrop.supervisor.handoff_check import warning as handoff_warning
from nodrop.supervisor.inherit_listeners import ListenerProvider
from nodrop.supervisor.ledger import Ledgers, ReloadLedger
from nodrop.supervisor.metrics import Metrics
from nodrop.supervisor.metrics_http import MetricsServer
from nodrop.supervisor.model import Generation, ReloadOutcome, WorkerState
from nodrop.supervisor.restarts import RestartPolicy
from nodrop.supervisor.timing import with_drain


class _Counting(Protocol):
    def stats(self) -> dict[str, Any]: ...


class _StateFile(Protocol):
    @property
    def path(self) -> str: ...


class _Recovering(Protocol):
    @property
    def file(self) -> _StateFile: ...

    def status(self) -> list[dict[str, Any]]: ...


class Observed(Protocol):
    """What the report reads from a supervisor (the supervisor is one; this
    module does not import it, so the two form no cycle)."""

    clock: Callable[[], float]
    name: str
    started: float
    reexecs: int
    config: RunConfig
    control_path: str
    listeners: ListenerProvider
    restarts: RestartPolicy
    gens: GenerationSet
    history: collections.deque[ReloadOutcome]
    ledgers: Ledgers
    warnings_log: collections.deque[str]
    metrics: Metrics
    metrics_server: MetricsServer | None
    events: EventLog

    @property
    def recovery(self) -> _Recovering | None: ...

    @property
    def broker(self) -> _Counting | None: ...
    @property
    def active(self) -> Generation | None: ...
    @property
    def generations(self) -> list[Generation]: ...
    @property
    def reload_in_progress(self) -> bool: ...
    @property
    def stopping(self) -> bool: ...
    def status_line(self) -> str: ...


def short_of_workers(gen: Generation | None) -> tuple[int, int] | None:
    """(ready, asked) when the active generation serves with fewer ready
    workers than its config asks (a restart that failed, one still in its
    backoff or not ready yet)."""
    if gen is None:
        return None
    live = sum(w.state is WorkerState.READY for w in gen.workers)
    asked = gen.config.workers
    return (live, asked) if live < asked else None


def summary_line(gen: Generation | None) -> str:
    """One line: what the supervisor serves (``STATUS=``, ``nodrop status``)."""
    if gen is None:
        return "starting"
    short = short_of_workers(gen)
    if short is not None:
        return f"generation {gen.number} DEGRADED: serving with {short[0]} of {short[1]} worker(s)"
    return f"generation {gen.number} serving with {len(gen.live_workers())} worker(s)"


def build_status(sup: Observed) -> api.StatusReply:
    """Everything ``nodrop status`` shows (the reply of the ``status`` request)."""
    now = sup.clock()
    handoff = None if sup.broker is None else sup.broker.stats()
    reloads = []
    for outcome in sup.history:
        entry = outcome.to_dict()
        entry["ledger"] = sup.ledgers.for_reload(outcome.old_generations)
        entry["timing"] = with_drain(outcome.timing, entry["ledger"])
        reloads.append(entry)
    return {
        "pid": os.getpid(),
        "name": sup.name,
        "version": __version__,
        "uptime": round(now - sup.started, 3),
        "reexecs": sup.reexecs,
        "strategy": sup.config.strategy.value,
        "control": sup.control_path,
        "active_generation": None if sup.active is None else sup.active.number,
        "reload_in_progress": sup.reload_in_progress,
        "stopping": sup.stopping,
        "generations": [g.to_dict(now) for g in sup.generations],
        "listeners": sup.listeners.status(),
        "reloads": reloads,
        "restarts_last_minute": sup.restarts.recent(now),
        "restarts_total": sup.gens.restart_count,
        "restart_failures": sup.gens.restart_failures,
        "degraded": short_of_workers(sup.active) is not None,
        "crash_loop": sup.restarts.crash_loop(now),
        "warnings": list(sup.listeners.warnings())
        + list(sup.warnings_log)
        + _handoff_warnings(sup, handoff)
        + logsink.warnings(),
        "log_lines_lost": logsink.lost_lines(),
        "summary": sup.status_line(),
        "handoff": handoff,
        "metrics": sup.metrics.to_dict(),
        "metrics_address": None if sup.metrics_server is None else sup.metrics_server.address,
        "recovery": None
        if sup.recovery is None
        else {"state": sup.recovery.file.path, "orphans": sup.recovery.status()},
    }


def _handoff_warnings(sup: Observed, handoff: dict[str, Any] | None) -> list[str]:
    if handoff is None or not handoff.get("requested", True):
        return []
    text = handoff_warning(sup.active, handoff.get("registered_workers", ()))
    return [] if text is None else [text]


def check_handoff(sup: Observed, *, first: bool = False) -> None:
    """Once a generation serves: if some of its workers did not register
    with the broker, a warning when handoff was asked for (``--handoff``;
    ``nodrop status`` shows it for as long as it holds), or, handoff being
    on by default, one line at the first generation's start."""
    if sup.broker is None:
        return
    stats = sup.broker.stats()
    if stats.get("requested", True):
        for text in _handoff_warnings(sup, stats):
            sup.events.event(
                "warning", text, level="warning", fields={"warning": "handoff_unregistered"}
            )
    elif first:
        note = handoff_note(sup.active, stats.get("registered_workers", ()))
        if note is not None:
            sup.events.event("note", note, fields={"note": "handoff_unregistered"})


def record_start(sup: Observed, outcome: ReloadOutcome) -> None:
    """Generation 1's start: into the history and the metrics."""
    sup.history.append(outcome)
    sup.metrics.reload(outcome, first=True)
    if outcome.ok:
        check_handoff(sup, first=True)


def record_reload(sup: Observed, outcome: ReloadOutcome) -> None:
    """A reload's outcome: into the history, the metrics and the event log."""
    sup.history.append(outcome)
    sup.metrics.reload(outcome)
    sup.events.event(
        "reload",
        ("reload: " if outcome.ok else "reload failed: ") + outcome.message,
        level="info" if outcome.ok else "warning",
        fields=outcome.to_dict(),
    )
    if outcome.ok:
        check_handoff(sup)


def record_ledger(sup: Observed, ledger: ReloadLedger) -> None:
    """An old generation has exited: its ledger into the metrics and the log."""
    sup.metrics.ledger(ledger)
    sup.events.event("ledger", f"reload ledger: {ledger.summary()}", fields=ledger.to_dict())
