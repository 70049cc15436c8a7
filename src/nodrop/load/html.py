"""A self-contained HTML report: an inline-SVG timeline and the summary tables.

Pure code returning a string: no external assets, no scripts, no CDN. The
chart (``<svg id="timeline">``) has three panels sharing the time axis --
requests/s, p99 latency of successful requests, errors/s stacked by class
-- with each reload window shaded across all three.
"""

from __future__ import annotations

import html
import math
from collections.abc import Sequence

from nodrop.load.outcome import Outcome
from nodrop.load.report import format_ms, latency_rows
from nodrop.load.result import Bucket, LoadResult
from nodrop.load.runinfo import NEXT_STEP, RunInfo

#: Chart geometry (px).
WIDTH = 1100
PANEL_HEIGHT = 170
PANEL_GAP = 38
MARGIN_LEFT = 78
MARGIN_RIGHT = 24
MARGIN_TOP = 34
MARGIN_BOTTOM = 40

#: One colour per error class (ok is not drawn in the error panel).
ERROR_COLOURS = {
    Outcome.REFUSED: "#d62728",
    Outcome.RESET: "#9467bd",
    Outcome.EOF: "#8c564b",
    Outcome.BROKEN_PIPE: "#e377c2",
    Outcome.TIMEOUT: "#ff7f0e",
    Outcome.BAD_STATUS: "#bcbd22",
    Outcome.OTHER: "#7f7f7f",
}
RATE_COLOUR = "#1f77b4"
P99_COLOUR = "#2ca02c"
RELOAD_FILL = "#f4a582"


def nice_ticks(high: float, count: int = 4) -> list[float]:
    """Round tick values from 0 to at least ``high`` (pure; 1-2-5 steps)."""
    if high <= 0 or not math.isfinite(high):
        return [0.0, 1.0]
    raw = high / count
    magnitude = 10 ** math.floor(math.log10(raw))
    step = next(m * magnitude for m in (1, 2, 5, 10) if m * magnitude >= raw)
    return [i * step for i in range(math.ceil(high / step - 1e-9) + 1)]


def _fmt_tick(value: float) -> str:
    if value >= 1000:
        return f"{value / 1000:g}k"
    return f"{value:g}"


def _esc(text: object) -> str:
    return html.escape(str(text), quote=True)


class _Panel:
    """Maps data to pixels for one panel."""

    def __init__(self, top: float, x_max: float, y_max: float) -> None:
        self.top = top
        self.x_max = x_max
        self.y_max = y_max
        self.plot_w = WIDTH - MARGIN_LEFT - MARGIN_RIGHT

    def x(self, t: float) -> float:
        return MARGIN_LEFT + self.plot_w * min(max(t / self.x_max, 0.0), 1.0)

    def y(self, v: float) -> float:
        return self.top + PANEL_HEIGHT * (1 - min(max(v / self.y_max, 0.0), 1.0))


def _axes(panel: _Panel, title: str, ticks: Sequence[float], unit: str) -> list[str]:
    out = [f'<text x="{MARGIN_LEFT}" y="{panel.top - 10:.1f}" class="ptitle">{_esc(title)}</text>']
    for v in ticks:
        y = panel.y(v)
        out.append(
            f'<line x1="{MARGIN_LEFT}" x2="{WIDTH - MARGIN_RIGHT}" y1="{y:.1f}" y2="{y:.1f}" '
            'class="grid"/>'
        )
        out.append(
            f'<text x="{MARGIN_LEFT - 8}" y="{y + 4:.1f}" class="ytick">'
            f"{_esc(_fmt_tick(v))}{unit}</text>"
        )
    out.append(
        f'<rect x="{MARGIN_LEFT}" y="{panel.top}" width="{panel.plot_w}" '
        f'height="{PANEL_HEIGHT}" class="frame"/>'
    )
    return out


def _polyline(points: Sequence[tuple[float, float]], colour: str) -> list[str]:
    if not points:
        return []
    coords = " ".join(f"{x:.1f},{y:.1f}" for x, y in points)
    out = [f'<polyline points="{coords}" fill="none" stroke="{colour}" stroke-width="2"/>']
    if len(points) <= 30:
        out += [f'<circle cx="{x:.1f}" cy="{y:.1f}" r="3" fill="{colour}"/>' for x, y in points]
    return out


def render_svg(result: LoadResult) -> str:
    """The timeline chart as one ``<svg id="timeline">`` element."""
    timeline = result.timeline
    x_max = max(float(len(timeline)), result.elapsed, 1.0)
    height = MARGIN_TOP + 3 * PANEL_HEIGHT + 2 * PANEL_GAP + MARGIN_BOTTOM
    tops = [MARGIN_TOP + i * (PANEL_HEIGHT + PANEL_GAP) for i in range(3)]
    rate_ticks = nice_ticks(max((s.attempts for s in timeline), default=0) * 1.05)
    p99s = [s.p99 * 1e3 for s in timeline if s.p99 is not None]
    p99_ticks = nice_ticks(max(p99s, default=0.0) * 1.05)
    err_ticks = nice_ticks(max((s.errors for s in timeline), default=0) * 1.05)
    panels = [
        _Panel(tops[0], x_max, rate_ticks[-1]),
        _Panel(tops[1], x_max, p99_ticks[-1]),
        _Panel(tops[2], x_max, err_ticks[-1]),
    ]
    out = [
        f'<svg id="timeline" xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" '
        f'height="{height}" viewBox="0 0 {WIDTH} {height}" role="img" '
        'aria-label="requests per second, p99 latency and errors over time">'
    ]
    # Reload windows first, so the data draws over them.
    for i, rec in enumerate(result.reloads, 1):
        start, end = (w - result.started for w in rec.window)
        x0 = panels[0].x(start)
        x1 = max(panels[0].x(end), x0 + 2)  # a zero-length window still shows
        top, bottom = tops[0], tops[2] + PANEL_HEIGHT
        out.append(
            f'<rect x="{x0:.1f}" y="{top}" width="{x1 - x0:.1f}" height="{bottom - top}" '
            f'fill="{RELOAD_FILL}" fill-opacity="0.45" class="reload">'
            f"<title>reload {i}: {rec.duration * 1e3:.0f} ms, "
            f"{'ok' if rec.ok else 'FAILED'}</title></rect>"
        )
        out.append(
            f'<text x="{x0 + 3:.1f}" y="{top + 12}" class="rlabel">reload {i}'
            f"{'' if rec.ok else ' (failed)'}</text>"
        )
    out += _axes(panels[0], "requests/s (completed)", rate_ticks, "")
    out += _axes(panels[1], "p99 latency of ok requests", p99_ticks, "ms")
    out += _axes(panels[2], "errors/s by class", err_ticks, "")
    out += _polyline(
        [(panels[0].x(s.t + 0.5), panels[0].y(s.attempts)) for s in timeline], RATE_COLOUR
    )
    out += _polyline(
        [(panels[1].x(s.t + 0.5), panels[1].y(s.p99 * 1e3)) for s in timeline if s.p99 is not None],
        P99_COLOUR,
    )
    bar_w = max(panels[2].x(1) - panels[2].x(0) - 2, 1)
    for s in timeline:
        base = 0
        for outcome, colour in ERROR_COLOURS.items():
            n = s.outcomes.get(outcome.label, 0)
            if not n:
                continue
            y_top, y_base = panels[2].y(base + n), panels[2].y(base)
            out.append(
                f'<rect x="{panels[2].x(s.t) + 1:.1f}" y="{y_top:.1f}" width="{bar_w:.1f}" '
                f'height="{max(y_base - y_top, 1):.1f}" fill="{colour}">'
                f"<title>t={s.t}s {outcome.label}: {n}</title></rect>"
            )
            base += n
    # Time axis under the last panel.
    bottom = tops[2] + PANEL_HEIGHT
    for t in nice_ticks(x_max, 10):
        if t > x_max:
            break
        x = panels[2].x(t)
        out.append(
            f'<line x1="{x:.1f}" x2="{x:.1f}" y1="{bottom}" y2="{bottom + 5}" class="axis"/>'
        )
        out.append(f'<text x="{x:.1f}" y="{bottom + 18}" class="xtick">{_fmt_tick(t)}s</text>')
    out.append(
        f'<text x="{MARGIN_LEFT + panels[2].plot_w / 2:.1f}" y="{bottom + 34}" class="xtick">'
        "seconds since start (shaded: reload windows)</text>"
    )
    out.append("</svg>")
    return "\n".join(out)


def _legend(result: LoadResult) -> str:
    """Keys for what the chart draws: error classes only when they occurred."""
    items = [("reload window", RELOAD_FILL), ("requests/s", RATE_COLOUR), ("p99", P99_COLOUR)]
    present = [(o.label, c) for o, c in ERROR_COLOURS.items() if result.outcomes.get(o.label)]
    keys = " ".join(
        f'<span class="key"><span class="swatch" style="background:{c}"></span>{_esc(n)}</span>'
        for n, c in items + present
    )
    if not present:
        keys += ' <span class="key">errors: none in this run</span>'
    return keys


FINE_HEIGHT = 90
FINE_WIDTH = 330


def _fine_chart(result: LoadResult, index: int) -> str:
    """One reload window in 100 ms buckets: completed requests (bars) and
    failed ones (by class, drawn over them)."""
    rec = result.reloads[index]
    start, end = (w - result.started for w in rec.window)
    buckets = [b for b in result.fine if start - 0.5 <= b.t + b.width and b.t <= end + 0.5]
    if not buckets:
        return ""
    width = buckets[0].width
    first = min(b.t for b in buckets)
    count = round((max(b.t for b in buckets) - first) / width) + 1
    by_t = {round((b.t - first) / width): b for b in buckets}
    peak = max(b.attempts for b in buckets) or 1
    bar = max(FINE_WIDTH / count - 1, 1)
    out = [
        f'<svg class="fine" xmlns="http://www.w3.org/2000/svg" width="{FINE_WIDTH}" '
        f'height="{FINE_HEIGHT + 30}" role="img" aria-label="reload {index + 1} in 100 ms buckets">',
        f'<text x="0" y="12" class="ptitle">reload {index + 1}: {rec.duration * 1e3:.0f} ms, '
        f"{width * 1e3:.0f} ms buckets</text>",
    ]

    def x_of(t: float) -> float:
        return (t - first) / (count * width) * FINE_WIDTH

    out.append(
        f'<rect x="{x_of(start):.1f}" y="18" width="{max(x_of(end) - x_of(start), 2):.1f}" '
        f'height="{FINE_HEIGHT}" fill="{RELOAD_FILL}" fill-opacity="0.45"/>'
    )
    for i in range(count):
        b: Bucket | None = by_t.get(i)
        n = b.attempts if b is not None else 0
        h = FINE_HEIGHT * n / peak
        x = i * FINE_WIDTH / count
        out.append(
            f'<rect x="{x:.1f}" y="{18 + FINE_HEIGHT - h:.1f}" width="{bar:.1f}" '
            f'height="{h:.1f}" fill="{RATE_COLOUR}"><title>{first + i * width:.1f}s: '
            f"{n} completed</title></rect>"
        )
        base = 0.0
        for outcome, colour in ERROR_COLOURS.items():
            e = 0 if b is None else b.outcomes.get(outcome.label, 0)
            if e:
                eh = max(FINE_HEIGHT * e / peak, 2)
                out.append(
                    f'<rect x="{x:.1f}" y="{18 + FINE_HEIGHT - base - eh:.1f}" width="{bar:.1f}" '
                    f'height="{eh:.1f}" fill="{colour}"><title>{first + i * width:.1f}s: '
                    f"{e} {outcome.label}</title></rect>"
                )
                base += eh
    out.append(
        f'<text x="0" y="{FINE_HEIGHT + 30}" class="note">{first:.1f}s .. '
        f"{first + count * width:.1f}s; peak {peak} per bucket</text></svg>"
    )
    return "".join(out)


def _fine_charts(result: LoadResult, limit: int = 12) -> str:
    charts = [_fine_chart(result, i) for i in range(min(len(result.reloads), limit))]
    charts = [c for c in charts if c]
    if not charts:
        return ""
    more = (
        f'<p class="note">(the first {limit} of {len(result.reloads)} reloads)</p>'
        if len(result.reloads) > limit
        else ""
    )
    return (
        "<h2>Inside the reload windows</h2>"
        '<p class="note">Completed requests per 100 ms bucket, from half a second before each '
        "reload window to half a second after it; failed ones drawn in their class's colour. "
        "One-second bins (the chart above) average these away.</p>"
        f'<div class="finegrid">{"".join(charts)}</div>{more}'
    )


def _run_table(info: RunInfo) -> str:
    rows = [("command", f"<code>{_esc(info.command)}</code>"), ("server", _esc(info.server))]
    if info.strategy is not None:
        rows.append(("strategy", _esc(info.strategy)))
    if info.handoff is not None:
        rows.append(("keep-alive handoff", "on (--handoff)" if info.handoff else "off"))
    rows.append(("versions", _esc(", ".join(f"{k} {v}" for k, v in info.versions.items()))))
    body = "".join(f"<tr><th>{k}</th><td class=left>{v}</td></tr>" for k, v in rows)
    return f'<table id="run"><tbody>{body}</tbody></table>'


def _failures(result: LoadResult) -> str:
    parts = [
        f"{o.label} {result.outcomes[o.label]}"
        for o in Outcome
        if o is not Outcome.OK and result.outcomes.get(o.label)
    ]
    return ", ".join(parts) or "none"


def _baseline_table(result: LoadResult, info: RunInfo) -> str:
    rows = [("nodrop (this run)", result)]
    if info.baseline is not None:
        rows.append((info.baseline_label or "baseline", info.baseline))
    body = "".join(
        f'<tr class="{"bad" if r.failed else ""}"><th>{_esc(name)}</th><td>{r.attempts}</td>'
        f"<td>{r.failed}</td><td class=left>{_esc(_failures(r))}</td>"
        f"<td>{len(r.reloads)}</td><td>{r.failed_per_million:.1f}</td></tr>"
        for name, r in rows
    )
    return (
        '<table id="baseline"><thead><tr><th>run</th><th>attempts</th><th>failed</th>'
        "<th>by class</th><th>reloads</th><th>failed per 10<sup>6</sup></th></tr></thead>"
        f"<tbody>{body}</tbody></table>"
    )


def _summary_table(result: LoadResult) -> str:
    rows = [("attempts", result.attempts, sum(result.outcomes_in_reload.values()))]
    rows += [
        (o.label, result.outcomes.get(o.label, 0), result.outcomes_in_reload.get(o.label, 0))
        for o in Outcome
    ]
    body = "".join(
        f'<tr class="{"bad" if name not in ("attempts", "ok") and total else ""}">'
        f"<th>{_esc(name)}</th><td>{total}</td><td>{in_reload}</td></tr>"
        for name, total, in_reload in rows
    )
    extra = [
        ("failed per 10<sup>6</sup>", f"{result.failed_per_million:.1f}"),
        ("achieved rate", f"{result.achieved_rate:,.0f} requests/s"),
        ("generator CPU", f"{100 * result.generator_cpu:.0f}% of {result.processes} processes"),
    ]
    if result.config.mode.value == "keepalive":
        causes = ", ".join(f"{k} {v}" for k, v in sorted(result.reconnect_causes.items()))
        extra.append(
            (
                "reconnects",
                f"{result.reconnects} ({result.reconnects_in_reload} in reload "
                f"windows){'; ' + _esc(causes) if causes else ''}",
            )
        )
    body += "".join(f"<tr><th>{k}</th><td colspan=2>{v}</td></tr>" for k, v in extra)
    return (
        '<table id="summary"><thead><tr><th>outcome</th><th>all</th><th>in reload windows</th>'
        f"</tr></thead><tbody>{body}</tbody></table>"
    )


def _latency_table(result: LoadResult) -> str:
    body = "".join(
        f"<tr><th>{n}</th><td>{s}</td><td>{r}</td><td>{q}</td></tr>"
        for n, s, r, q in latency_rows(result.steady, result.reload)
    )
    return (
        '<table id="latency"><thead><tr><th>latency of ok</th><th>steady</th>'
        f"<th>reload windows</th><th>ratio</th></tr></thead><tbody>{body}</tbody></table>"
        f'<p class="note">overall p50 {format_ms(result.overall.p50)}, '
        f"p99 {format_ms(result.overall.p99)}, p99.9 {format_ms(result.overall.p999)}, "
        f"max {format_ms(result.overall.max)}; percentiles within "
        f"{100 * result.overall.relative_error:.1f}% (log-bucketed histogram).</p>"
    )


def _reload_table(result: LoadResult) -> str:
    if not result.reloads:
        return "<p>No reloads during this run.</p>"
    body = "".join(
        f'<tr class="{"" if r.ok else "bad"}"><td>{i}</td>'
        f"<td>{r.started - result.started:.2f}s</td><td>{r.duration * 1e3:.0f} ms</td>"
        f"<td>{'ok' if r.ok else 'FAILED'}</td><td>{_esc(r.message)}</td></tr>"
        for i, r in enumerate(result.reloads, 1)
    )
    return (
        '<table id="reloads"><thead><tr><th>#</th><th>at</th><th>window</th><th>result</th>'
        f"<th>message</th></tr></thead><tbody>{body}</tbody></table>"
    )


_CSS = """
body{font-family:system-ui,-apple-system,'Segoe UI',Roboto,sans-serif;margin:24px;color:#222;
background:#fff}
h1{font-size:22px;margin:0 0 4px}h2{font-size:17px;margin:22px 0 8px}
.sub{color:#555;margin:0 0 14px}.verdict{font-size:18px;font-weight:600;margin:8px 0 14px}
.good{color:#1a7f37}.badv{color:#c62828}
svg text{font-size:12px;fill:#333}.ptitle{font-weight:600;font-size:13px}
.ytick{text-anchor:end}.xtick{text-anchor:middle}.rlabel{font-size:11px;fill:#8a3b12}
.grid{stroke:#e4e4e4}.frame{fill:none;stroke:#999}.axis{stroke:#999}
.legend{margin:6px 0 4px;font-size:13px}.key{margin-right:14px;white-space:nowrap}
.swatch{display:inline-block;width:12px;height:12px;margin-right:5px;vertical-align:-1px;
border-radius:2px}
.tables{display:flex;gap:32px;flex-wrap:wrap;align-items:flex-start}
table{border-collapse:collapse;font-size:14px}th,td{padding:4px 10px;border-bottom:1px solid #ddd}
td{text-align:right;font-variant-numeric:tabular-nums}th{text-align:left}
thead th{background:#f3f3f3}tr.bad td,tr.bad th{color:#c62828;font-weight:600}
#reloads td:last-child{text-align:left}.note{color:#555;font-size:13px}
td.left{text-align:left}.finegrid{display:flex;flex-wrap:wrap;gap:18px}
code{background:#f3f3f3;padding:1px 4px;border-radius:3px;font-size:13px}
.next{margin-top:26px;padding:10px 12px;background:#eef6ee;border-radius:4px}
"""


def render_html(result: LoadResult, info: RunInfo | None = None) -> str:
    """A complete, self-contained HTML page for one run (``info``: its context)."""
    cfg = result.config
    verdict = (
        '<p class="verdict good">No failed requests.</p>'
        if result.failed == 0
        else f'<p class="verdict badv">{result.failed} failed requests '
        f"({result.failed_per_million:.1f} per million).</p>"
    )
    context = ""
    if info is not None:
        context = f"<h2>Run</h2>{_run_table(info)}"
        if info.baseline is not None:
            base = info.baseline
            verdict += (
                f'<p class="sub">Measured against a baseline in the same run, same load: '
                f"{_esc(info.baseline_label)}: {base.failed} failed of {base.attempts} "
                f"({_esc(_failures(base))}) across {len(base.reloads)} restarts.</p>"
            )
            context += f"<h2>Against a naive restart</h2>{_baseline_table(result, info)}"
    next_step = info.next_step if info is not None and info.next_step else NEXT_STEP
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        f"<title>nodrop load report: {_esc(cfg.host)}:{cfg.port}</title>"
        f"<style>{_CSS}</style></head><body>"
        f"<h1>nodrop load report</h1>"
        f'<p class="sub">{_esc(cfg.mode.value)} mode against {_esc(cfg.host)}:{cfg.port}, '
        f"concurrency {cfg.concurrency}, {result.processes} worker processes, "
        f"{result.elapsed:.2f}s, {len(result.reloads)} reloads</p>"
        f"{verdict}{context}"
        f'<div class="legend">{_legend(result)}</div>'
        f"{render_svg(result)}"
        f"{_fine_charts(result)}"
        '<div class="tables"><div><h2>Outcomes</h2>'
        f"{_summary_table(result)}</div><div><h2>Latency</h2>{_latency_table(result)}</div></div>"
        f"<h2>Reloads</h2>{_reload_table(result)}"
        f'<p class="next">Now run this against your app: <code>{_esc(next_step)}</code></p>'
        "</body></html>\n"
    )
