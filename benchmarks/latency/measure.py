"""One measurement: a row under load with reloads, sampled from outside, and
its breakdown (:mod:`latency.phases`)."""

from __future__ import annotations

import os
import tempfile
import time
from dataclasses import dataclass, field
from typing import Any

from latency.phases import (
    PHASES,
    WARMUP,
    Latency,
    ReloadMoments,
    cpu_by_phase,
    parse_proc_stat_busy,
    split_requests,
)
from latency.rows import ROWS, RowError
from latency.sampler import Sampler
from nodrop.load import LoadConfig, Mode
from nodrop.load.outcome import Outcome
from nodrop.load.reload import ReloadRecord
from nodrop.load.runner import run_load_raw

HOST = "127.0.0.1"


def machine_busy() -> tuple[float, float]:
    with open("/proc/stat") as f:
        return parse_proc_stat_busy(f.read())


class _Reloader:
    def __init__(self, reload: Any) -> None:
        self._reload = reload
        self.moments: list[ReloadMoments] = []
        self.errors: list[str] = []

    def reload(self) -> ReloadRecord:
        started = time.monotonic()
        try:
            m: ReloadMoments = self._reload()
        except Exception as exc:
            self.errors.append(repr(exc)[:500])
            return ReloadRecord(started, None, None, False, repr(exc)[:200], time.monotonic())
        self.moments.append(m)
        return ReloadRecord(m.started, m.ready, m.old_exited, True, "", time.monotonic())


@dataclass
class RunResult:
    """One row, one round."""

    row: str
    variant: str
    error: str | None = None
    requests: int = 0
    failed: int = 0
    failures: dict[str, int] = field(default_factory=dict)
    steady: list[float] = field(default_factory=list)
    window: list[float] = field(default_factory=list)
    phases: dict[str, list[float]] = field(default_factory=dict)
    cpu: dict[str, dict[str, float]] = field(default_factory=dict)
    queue: dict[str, int | None] = field(default_factory=dict)
    moments: list[ReloadMoments] = field(default_factory=list)
    startup_cpu: list[float] = field(default_factory=list)
    loadgen_share: float = 0.0
    machine_busy: float = 0.0
    loadavg: tuple[float, float, float] = (0.0, 0.0, 0.0)
    wall: float = 0.0
    status_reloads: list[dict[str, Any]] = field(default_factory=list)

    def summary(self) -> dict[str, Any]:
        steady, window = Latency.of(self.steady), Latency.of(self.window)
        return {
            "row": self.row,
            "variant": self.variant,
            "error": self.error,
            "requests": self.requests,
            "failed": self.failed,
            "failures": self.failures,
            "steady": steady.to_dict(),
            "window": window.to_dict(),
            "phases": {k: Latency.of(v).to_dict() for k, v in self.phases.items()},
            "cpu_by_phase": self.cpu,
            "max_queue_by_phase": self.queue,
            "reloads": [m.to_dict() for m in self.moments],
            "startup_cpu_per_worker": self.startup_cpu,
            "loadgen_cpu_share": self.loadgen_share,
            "machine_busy": self.machine_busy,
            "loadavg": self.loadavg,
            "wall": self.wall,
            "status_reloads": self.status_reloads,
        }


def measure(
    row: str,
    variant: str,
    run_args: list[str],
    *,
    duration: float,
    reloads: int,
    concurrency: int,
    mode: Mode,
) -> RunResult:
    """Start ``row``, load it for ``duration`` s with ``reloads`` reloads, stop it."""
    out = RunResult(row, variant)
    _, start = ROWS[row]
    t0 = time.monotonic()
    busy0 = machine_busy()
    try:
        with (
            tempfile.TemporaryDirectory(prefix=f"reload-latency-{row}-") as workdir,
            start(workdir, run_args) as target,
        ):
            config = LoadConfig(
                host=HOST,
                port=target.port,
                mode=mode,
                concurrency=concurrency,
                duration=duration,
                timeout=5.0,
                path=target.path,
                reload_every=duration / (reloads + 1),
                reloads=reloads,
            )
            reloader = _Reloader(target.reload)
            with Sampler(target.port, target.root) as sampler:
                raw = run_load_raw(config, reloader)
            status = target.status()
            if status is not None:
                out.status_reloads = [
                    {k: r.get(k) for k in ("generation", "duration", "timing")}
                    for r in status.get("reloads", [])[1:]
                ]
            if reloader.errors:
                out.error = "; ".join(reloader.errors)[:500]
            _analyze(out, raw, reloader.moments, sampler)
    except RowError as exc:
        out.error = str(exc)[-800:]
    busy1 = machine_busy()
    out.wall = time.monotonic() - t0
    out.loadavg = os.getloadavg()
    if busy1[1] > busy0[1]:
        out.machine_busy = (busy1[0] - busy0[0]) / (busy1[1] - busy0[1])
    return out


def _analyze(out: RunResult, raw: Any, moments: list[ReloadMoments], sampler: Sampler) -> None:
    samples = raw.samples
    ok_code = Outcome.OK.value
    ok = [o == ok_code for o in samples.outcomes]
    out.requests = len(ok)
    out.failed = ok.count(False)
    labels = {o.value: o.label for o in Outcome}
    for code in samples.outcomes:
        if code != ok_code:
            out.failures[labels.get(code, str(code))] = (
                out.failures.get(labels.get(code, "?"), 0) + 1
            )
    out.moments = moments
    out.steady, out.window, out.phases = split_requests(
        samples.starts, samples.latencies, ok, moments, since=raw.started + WARMUP
    )
    cpus = len(os.sched_getaffinity(0))
    elapsed = max(raw.ended - raw.started, 1e-9)
    out.loadgen_share = samples.cpu_seconds / (elapsed * cpus)
    me = os.getpid()
    loadgen = frozenset(sampler.cpu.pids() - sampler.server_pids - {me})
    others = {"control": frozenset({sampler.server}), "loadgen": loadgen}
    totals: dict[str, dict[str, float]] = {p: {} for p in PHASES}
    queues: dict[str, list[int]] = {p: [] for p in PHASES}
    for m in moments:
        for phase, used in cpu_by_phase(sampler.cpu, m, others).items():
            for group, value in used.items():
                totals[phase][group] = totals[phase].get(group, 0.0) + value
        for phase, (a, b) in m.bounds().items():
            q = sampler.max_queue(a, b)
            if q is not None:
                queues[phase].append(q)
        begin = m.spawned if m.spawned is not None else m.started
        if m.new_pids:
            out.startup_cpu.append(
                sampler.cpu.used(m.new_pids, begin - 0.05, m.ready) / len(m.new_pids)
            )
    out.cpu = totals
    out.queue = {p: (max(v) if v else None) for p, v in queues.items()}
    steady_q = [
        d
        for t, d in sampler.queue
        if not any(m.started <= t <= m.old_exited + 0.5 for m in moments)
    ]
    out.queue["steady"] = max(steady_q) if steady_q else None
