"""What a supervisor reports: its state as one JSON object (``nodrop
status``), and each reload and ledger as it happens (metrics, event log)."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

from nodrop._version import __version__
from nodrop.supervisor import api
from nodrop.supervisor.ledger import ReloadLedger
from nodrop.supervisor.model import ReloadOutcome
from nodrop.supervisor.timing import with_drain

if TYPE_CHECKING:
    from nodrop.supervisor.supervisor import Supervisor


def build_status(sup: Supervisor) -> api.StatusReply:
    """Everything ``nodrop status`` shows (the reply of the ``status`` request)."""
    now = sup.clock()
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
        "crash_loop": sup.restarts.crash_loop(now),
        "warnings": list(sup.listeners.warnings()) + list(sup.warnings_log),
        "summary": sup.status_line(),
        "handoff": None if sup.broker is None else sup.broker.stats(),
        "metrics": sup.metrics.to_dict(),
        "metrics_address": None if sup.metrics_server is None else sup.metrics_server.address,
    }


def record_reload(sup: Supervisor, outcome: ReloadOutcome) -> None:
    """A reload's outcome: into the history, the metrics and the event log."""
    sup.history.append(outcome)
    sup.metrics.reload(outcome)
    sup.events.event(
        "reload",
        ("reload: " if outcome.ok else "reload failed: ") + outcome.message,
        level="info" if outcome.ok else "warning",
        fields=outcome.to_dict(),
    )


def record_ledger(sup: Supervisor, ledger: ReloadLedger) -> None:
    """An old generation has exited: its ledger into the metrics and the log."""
    sup.metrics.ledger(ledger)
    sup.events.event("ledger", f"reload ledger: {ledger.summary()}", fields=ledger.to_dict())
