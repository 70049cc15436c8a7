"""The human-readable table of a :class:`LoadResult`. Pure code."""

from __future__ import annotations

from nodrop.load.outcome import Outcome
from nodrop.load.result import LatencySummary, LoadResult


def format_ms(seconds: float | None) -> str:
    """Seconds as milliseconds with 3 significant-ish digits; ``-`` for ``None``."""
    if seconds is None:
        return "-"
    ms = seconds * 1e3
    if ms >= 100:
        return f"{ms:.0f}ms"
    if ms >= 10:
        return f"{ms:.1f}ms"
    return f"{ms:.2f}ms"


def ratio(reload: float | None, steady: float | None) -> str:
    """``reload / steady`` formatted, or ``-`` when either is missing."""
    if reload is None or steady is None or steady <= 0:
        return "-"
    return f"{reload / steady:.2f}x"


def latency_rows(steady: LatencySummary, reload: LatencySummary) -> list[tuple[str, str, str, str]]:
    """Rows (name, steady, reload windows, ratio) for p50, p99, p99.9, max."""
    rows: list[tuple[str, str, str, str]] = []
    for name, attr in (("p50", "p50"), ("p99", "p99"), ("p99.9", "p999"), ("max", "max")):
        s, r = getattr(steady, attr), getattr(reload, attr)
        rows.append((name, format_ms(s), format_ms(r), ratio(r, s)))
    rows.append(("count", str(steady.count), str(reload.count), ""))
    return rows


def format_table(result: LoadResult) -> str:
    """A plain-text summary: counts, failures, reconnects, latency, rate, reloads."""
    cfg = result.config
    lines = [
        f"nodrop load: {cfg.mode.value} to {cfg.host}:{cfg.port}, concurrency "
        f"{cfg.concurrency}, {result.processes} processes, {result.elapsed:.2f}s",
        "",
        f"{'outcome':<22}{'all':>12}{'in reloads':>12}",
        f"{'attempts':<22}{result.attempts:>12}{sum(result.outcomes_in_reload.values()):>12}",
    ]
    for outcome in Outcome:
        label = outcome.label
        lines.append(
            f"{label:<22}{result.outcomes.get(label, 0):>12}"
            f"{result.outcomes_in_reload.get(label, 0):>12}"
        )
    lines.append(f"{'failed per 10^6':<22}{result.failed_per_million:>12.1f}")
    if cfg.mode.value == "keepalive":
        causes = ", ".join(f"{k} {v}" for k, v in sorted(result.reconnect_causes.items()))
        lines.append(
            f"{'reconnects':<22}{result.reconnects:>12}{result.reconnects_in_reload:>12}"
            + (f"   ({causes})" if causes else "")
        )
    lines += [
        f"{'achieved rate':<22}{result.achieved_rate:>10.0f}/s"
        f"   (generator CPU {100 * result.generator_cpu:.0f}% of {result.processes} cores)",
        "",
        f"{'latency of ok':<22}{'steady':>12}{'reloads':>12}{'ratio':>10}",
    ]
    for name, steady, reload, r in latency_rows(result.steady, result.reload):
        lines.append(f"{name:<22}{steady:>12}{reload:>12}{r:>10}")
    lines.append(
        f"(overall p50 {format_ms(result.overall.p50)}, p99 {format_ms(result.overall.p99)}, "
        f"p99.9 {format_ms(result.overall.p999)}, max {format_ms(result.overall.max)}; "
        f"percentiles within {100 * result.overall.relative_error:.1f}%)"
    )
    if result.reloads:
        lines += ["", f"{'reload':<8}{'at':>9}{'window':>10}  {'ok':<4}message"]
        for i, rec in enumerate(result.reloads, 1):
            lines.append(
                f"{i:<8}{rec.started - result.started:>8.2f}s{rec.duration:>9.3f}s  "
                f"{'yes' if rec.ok else 'NO':<4}{rec.message}"
            )
    return "\n".join(lines) + "\n"


def format_baseline(result: LoadResult, baseline: LoadResult, label: str) -> str:
    """Two lines: this run and the baseline, failures by class (plain text)."""

    def line(name: str, r: LoadResult) -> str:
        classes = ", ".join(
            f"{o.label} {r.outcomes[o.label]}"
            for o in Outcome
            if o is not Outcome.OK and r.outcomes.get(o.label)
        )
        return (
            f"{name:<22}{r.attempts:>12} attempts{r.failed:>9} failed"
            f"  over {len(r.reloads)} reloads" + (f"  ({classes})" if classes else "")
        )

    return "\n".join(
        [f"baseline, same load: {label}", line("nodrop", result), line("naive restart", baseline)]
    )
