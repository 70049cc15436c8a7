"""Where a reload's time goes: the application's part and nodrop's (pure).

A successful reload, in the supervisor's monotonic clock::

    requested -> spawned -> every READY=1 -> grace over -> drain sent -> old stopped accepting
      nodrop       app start       ready grace     nodrop       stop accepting (app)
                                                   old drain sent -> old exited: drain (app)

* ``app_start``: from the first worker's spawn until the last one said
  ``READY=1`` (imports, the app's start-up) -- the application's time;
* ``ready_grace``: ``--ready-grace``, the time nodrop waits on purpose
  after ``READY=1`` before it trusts a generation;
* ``control_plane``: nodrop's own work: reading the config and preparing the
  listeners before the spawn, spawning, and activating the new generation
  and signalling the old one (with the ledger's first look) after the grace;
* ``stop_accepting``: from the drain signal until every old worker had
  stopped accepting (exited, closed the sockets or said ``STOPPING=1``) --
  the application's time, plus nodrop's 10 ms polling;
* ``drain``: from the drain signal until the old generation exited (added
  once it has, from the reload's ledger) -- the application's time.
"""

from __future__ import annotations

from typing import Any

from nodrop.supervisor.model import Generation

TIMING_KEYS = ("control_plane", "app_start", "ready_grace", "stop_accepting", "drain")


def reload_timing(
    requested: float,
    new: Generation,
    grace_over: float,
    drain_sent: float,
    stopped_accepting: float,
) -> dict[str, float]:
    """The parts of one successful reload, in seconds (``drain`` comes later)."""
    spawned = new.started
    ready = max([w.ready_at for w in new.workers if w.ready_at is not None], default=grace_over)
    last_spawn = max([w.started for w in new.workers], default=spawned)
    before = max(0.0, spawned - requested)
    spawning = max(0.0, last_spawn - spawned)
    after = max(0.0, drain_sent - grace_over)
    return {
        "control_plane": round(before + spawning + after, 6),
        "app_start": round(max(0.0, ready - spawned), 6),
        "ready_grace": round(max(0.0, grace_over - ready), 6),
        "stop_accepting": round(max(0.0, stopped_accepting - drain_sent), 6),
    }


def with_drain(
    timing: dict[str, Any] | None, ledgers: list[dict[str, Any]]
) -> dict[str, Any] | None:
    """``timing`` plus ``drain``: the longest drain of the replaced generations
    (None while one still drains; no ``drain`` when nothing was replaced)."""
    if timing is None or not ledgers:
        return timing
    drains = [entry.get("drain_duration") for entry in ledgers]
    done = [d for d in drains if d is not None]
    drain = max(done) if done and len(done) == len(drains) else None
    return {**timing, "drain": drain}


def describe(timing: dict[str, Any]) -> str:
    """One line for people: ``app start 812 ms, ready grace 200 ms, ...``."""

    def ms(value: Any) -> str:
        return "still draining" if value is None else f"{float(value) * 1000:.0f} ms"

    names = {
        "app_start": "app start",
        "ready_grace": "ready grace",
        "control_plane": "nodrop",
        "stop_accepting": "old stopped accepting",
        "drain": "drain",
    }
    return ", ".join(f"{names[k]} {ms(timing.get(k))}" for k in TIMING_KEYS if k in timing)
