"""Counters a supervisor keeps, and their Prometheus text exposition.

:class:`Metrics` records what happens (reload outcomes and durations, time
to ready, how long the old generation took to stop accepting and to drain,
completed ledgers); ``nodrop status --json`` carries it as ``metrics``.
:func:`render_prometheus` turns a whole status reply into the text format
(version 0.0.4) that Prometheus scrapes -- pure, so ``nodrop status --format
prometheus``, the ``--metrics`` listener and the tests all share it. No
client library: nodrop has no runtime dependency.

Counters start at zero when the supervisor starts (and after ``nodrop
reexec``); Prometheus' ``rate()`` and ``increase()`` handle such resets.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import Any

from nodrop._version import __version__
from nodrop.supervisor.ledger import ReloadLedger
from nodrop.supervisor.model import ReloadOutcome

DURATION_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
DRAIN_BUCKETS = (0.1, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)
FATES = ("finished", "handed_over", "returned", "closed_by_broker", "closed_by_signal", "lost")
OUTCOMES = ("ok", "rolled_back", "failed")


class Histogram:
    """Cumulative buckets, a sum and a count."""

    def __init__(self, buckets: Sequence[float]) -> None:
        self.bounds = tuple(buckets)
        self.counts = [0] * len(self.bounds)
        self.sum = 0.0
        self.count = 0

    def observe(self, value: float) -> None:
        self.sum += value
        self.count += 1
        for i, bound in enumerate(self.bounds):
            if value <= bound:
                self.counts[i] += 1

    def to_dict(self) -> dict[str, Any]:
        return {
            "buckets": [[b, c] for b, c in zip(self.bounds, self.counts, strict=True)],
            "sum": round(self.sum, 6),
            "count": self.count,
        }


def outcome_kind(outcome: ReloadOutcome) -> str:
    """ok; rolled_back (a new generation started and failed); failed (none
    could start: bad config, bind error, stopping)."""
    if outcome.ok:
        return "ok"
    return "rolled_back" if outcome.generation is not None else "failed"


class Metrics:
    """What a supervisor counts between its start and now."""

    def __init__(self) -> None:
        self.reloads = dict.fromkeys(OUTCOMES, 0)
        self.reload_duration = Histogram(DURATION_BUCKETS)
        self.time_to_ready = Histogram(DURATION_BUCKETS)
        self.accept_stop = Histogram(DURATION_BUCKETS)
        self.accept_stop_unconfirmed = 0
        self.drain_duration = Histogram(DRAIN_BUCKETS)
        self.connections = dict.fromkeys(FATES, 0)
        self.connections_unknown = 0

    def reload(self, outcome: ReloadOutcome, first: bool = False) -> None:
        """A reload's outcome (``first``: generation 1's start, not a reload)."""
        if not first:
            self.reloads[outcome_kind(outcome)] += 1
            self.reload_duration.observe(outcome.duration)
        if outcome.ok and outcome.ready is not None:
            self.time_to_ready.observe(max(0.0, outcome.ready - outcome.started))
        stop = outcome.old_stopped_accepting
        if stop is not None and stop.get("how") != "nothing":
            if stop.get("confirmed"):
                self.accept_stop.observe(float(stop.get("seconds", 0.0)))
            else:
                self.accept_stop_unconfirmed += 1

    def ledger(self, ledger: ReloadLedger) -> None:
        if ledger.exited is not None:
            self.drain_duration.observe(ledger.exited - ledger.drain_started)
        finished = ledger.finished
        if finished is None:
            self.connections_unknown += 1
        else:
            self.connections["finished"] += finished
        self.connections["handed_over"] += ledger.handed_over
        self.connections["returned"] += ledger.returned
        self.connections["closed_by_broker"] += ledger.closed_by_broker
        self.connections["closed_by_signal"] += ledger.closed_by_signal
        if ledger.lost is None:
            self.connections_unknown += 1
        else:
            self.connections["lost"] += ledger.lost

    def to_dict(self) -> dict[str, Any]:
        return {
            "reloads": dict(self.reloads),
            "reload_duration_seconds": self.reload_duration.to_dict(),
            "time_to_ready_seconds": self.time_to_ready.to_dict(),
            "accept_stop_seconds": self.accept_stop.to_dict(),
            "accept_stop_unconfirmed": self.accept_stop_unconfirmed,
            "drain_duration_seconds": self.drain_duration.to_dict(),
            "connections": dict(self.connections),
            "ledgers_with_unknowns": self.connections_unknown,
        }


# -- the text format ------------------------------------------------------------


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _number(value: float) -> str:
    if isinstance(value, bool):
        return "1" if value else "0"
    if isinstance(value, int):
        return str(value)
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    return repr(float(value))


class _Writer:
    def __init__(self, base: dict[str, str]) -> None:
        self.lines: list[str] = []
        self.base = base

    def labels(self, extra: dict[str, str]) -> str:
        merged = {**self.base, **extra}
        if not merged:
            return ""
        return "{" + ",".join(f'{k}="{_escape(v)}"' for k, v in merged.items()) + "}"

    def family(
        self,
        name: str,
        kind: str,
        help_text: str,
        samples: Iterable[tuple[dict[str, str], float]],
    ) -> None:
        # The text format names a counter by its sample name, ``_total`` included.
        full = f"{name}_total" if kind == "counter" else name
        self.lines.append(f"# HELP {full} {help_text}")
        self.lines.append(f"# TYPE {full} {kind}")
        for labels, value in samples:
            self.lines.append(f"{full}{self.labels(labels)} {_number(value)}")

    def histogram(self, name: str, help_text: str, data: dict[str, Any]) -> None:
        self.lines.append(f"# HELP {name} {help_text}")
        self.lines.append(f"# TYPE {name} histogram")
        for bound, count in data["buckets"]:
            self.lines.append(f"{name}_bucket{self.labels({'le': _number(float(bound))})} {count}")
        self.lines.append(f"{name}_bucket{self.labels({'le': '+Inf'})} {data['count']}")
        self.lines.append(f"{name}_sum{self.labels({})} {_number(float(data['sum']))}")
        self.lines.append(f"{name}_count{self.labels({})} {data['count']}")


def render_prometheus(status: dict[str, Any]) -> str:
    """A status reply (``nodrop status --json``) in Prometheus' text format (pure)."""
    base = {"name": str(status.get("name", ""))} if status.get("name") else {}
    out = _Writer(base)
    metrics = status.get("metrics") or {}
    out.family(
        "nodrop_info",
        "gauge",
        "Version and strategy of this supervisor (always 1).",
        [
            (
                {
                    "version": str(status.get("version", __version__)),
                    "strategy": str(status.get("strategy", "")),
                },
                1,
            )
        ],
    )
    out.family("nodrop_up", "gauge", "1 while a generation is active and not stopping.",
               [({}, 1 if status.get("active_generation") is not None and not status.get("stopping") else 0)])  # fmt: skip
    out.family(
        "nodrop_active_generation",
        "gauge",
        "Number of the generation that serves.",
        [({}, status.get("active_generation") or 0)],
    )
    out.family(
        "nodrop_uptime_seconds", "gauge", "Seconds since the supervisor started.",
        [({}, float(status.get("uptime", 0.0)))],
    )  # fmt: skip
    reloads = metrics.get("reloads", {})
    out.family(
        "nodrop_reloads",
        "counter",
        "Reloads by outcome: ok, rolled_back (the new generation failed; the old one "
        "serves), failed (no new generation could start).",
        [({"outcome": kind}, reloads.get(kind, 0)) for kind in OUTCOMES],
    )
    for key, name, text in (
        ("reload_duration_seconds", "nodrop_reload_duration_seconds",
         "From the reload request to its outcome (ready and the old generation stopped accepting, or rolled back)."),
        ("time_to_ready_seconds", "nodrop_time_to_ready_seconds",
         "From a generation's start until its last worker was ready."),
        ("accept_stop_seconds", "nodrop_accept_stop_seconds",
         "From the drain signal until the old generation stopped accepting."),
        ("drain_duration_seconds", "nodrop_drain_duration_seconds",
         "From the drain signal until the old generation's last worker exited."),
    ):  # fmt: skip
        if key in metrics:
            out.histogram(name, text, metrics[key])
    out.family(
        "nodrop_accept_stop_unconfirmed",
        "counter",
        "Reloads whose old generation was not confirmed to stop accepting in time.",
        [({}, metrics.get("accept_stop_unconfirmed", 0))],
    )
    states: dict[str, int] = {"starting": 0, "ready": 0, "draining": 0}
    for gen in status.get("generations", []):
        for worker in gen.get("workers", []):
            if worker["state"] in states:
                states[worker["state"]] += 1
    out.family(
        "nodrop_workers",
        "gauge",
        "Live workers by state.",
        [({"state": state}, count) for state, count in states.items()],
    )
    out.family(
        "nodrop_worker_restarts",
        "counter",
        "Workers of the active generation restarted after they exited.",
        [({}, status.get("restarts_total", 0))],
    )
    out.family(
        "nodrop_crash_loop",
        "gauge",
        "1 while workers restart faster than the restart policy allows.",
        [({}, 1 if status.get("crash_loop") else 0)],
    )
    queue: list[tuple[dict[str, str], float]] = []
    backlog: list[tuple[dict[str, str], float]] = []
    for lst in status.get("listeners", []):
        labels = {"listener": str(lst.get("name") or ""), "address": str(lst.get("address") or "")}
        if lst.get("accept_queue") is not None:
            queue.append((labels, lst["accept_queue"]))
            backlog.append((labels, lst["backlog"]))
    out.family(
        "nodrop_accept_queue", "gauge",
        "Connections waiting in a listening socket's accept queue.", queue,
    )  # fmt: skip
    out.family("nodrop_accept_backlog", "gauge", "A listening socket's backlog.", backlog)
    connections = metrics.get("connections", {})
    out.family(
        "nodrop_drained_connections",
        "counter",
        "Old generations' connections by fate, from completed reload ledgers: finished by "
        "the old generation, handed over to the new one, returned by the connection broker "
        "(then closed by the old generation with a signal), closed by the broker, closed by "
        "SIGKILL, lost.",
        [({"fate": fate}, connections.get(fate, 0)) for fate in FATES],
    )
    handoff = status.get("handoff")
    if handoff:
        out.family(
            "nodrop_handoff_connections",
            "counter",
            "Connection broker (--handoff): connections given by draining workers, placed in "
            "the new generation, returned to the giver, closed by the broker.",
            [({"event": e}, handoff.get(e, 0)) for e in ("given", "placed", "returned", "closed")],
        )
        out.family(
            "nodrop_handoff_receivers", "gauge",
            "Workers registered to receive handed-over connections.",
            [({}, handoff.get("receivers", 0))],
        )  # fmt: skip
        registered = set(handoff.get("registered_workers", ()))
        unregistered = sum(
            1
            for gen in status.get("generations", [])
            if gen.get("generation") == status.get("active_generation")
            for worker in gen.get("workers", [])
            if worker["state"] == "ready" and worker["pid"] not in registered
        )
        out.family(
            "nodrop_handoff_unregistered_workers", "gauge",
            "Ready workers of the active generation that did not register with the connection "
            "broker: their server does not support handoff, so their idle connections are "
            "closed at each reload.",
            [({}, unregistered)],
        )  # fmt: skip
    return "\n".join(out.lines) + "\n"
