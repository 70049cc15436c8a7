"""Latency in reload windows against steady state, and where it goes.

Rows, interleaved in every round (A B C D, then B C D A, ...), so that
other load on the machine falls on all of them alike:

* ``demo``: ``nodrop demo``'s app, 2 workers under ``nodrop run``;
* ``fastapi``: the stack matrix's FastAPI/uvicorn cell (``python -m
  nodrop.adapters.uvicorn``), 2 workers under ``nodrop run``;
* ``nginx``, ``haproxy``: the peers of ``benchmarks/reload_matrix.py``
  (skipped, with the reason, when not installed).

For each row: p50/p99/p99.9 of requests overlapping a reload window against
those overlapping none, and the breakdown of the nodrop rows' reloads by
phase (``starting``, ``switch``, ``first``, ``drain``, ``after``; see
``benchmarks/latency/phases.py``): the latency of the requests that started
in each phase, the CPU the new workers, the old ones, the supervisor and the
load generator used in it (``/proc/PID/stat``), and the deepest accept
queue seen (``sock_diag``). ``--variant`` compares ``nodrop run`` options
in the same run (``--variant idle='--startup-priority idle'``).

    .venv/bin/python benchmarks/reload_latency.py [--rounds 3] [--duration 12]
    .venv/bin/python benchmarks/reload_latency.py --quick     # CI: a few seconds a row

Every result is printed with the load average and the load generator's CPU
share: on a shared 2-core machine, read ratios, not absolute figures.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))  # latency, baselines, stack_matrix

from latency.measure import RunResult, measure
from latency.phases import PHASES, Latency
from latency.rows import NODROP_ROWS, ROWS
from nodrop.load import Mode

ROW_IDS = tuple(ROWS)


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value * 1000:.2f}"


def _ratio(a: float | None, b: float | None) -> str:
    return "-" if not a or not b else f"{a / b:.2f}x"


def parse_variant(text: str) -> tuple[str, list[str]]:
    """``LABEL=ARGS`` (ARGS: extra ``nodrop run`` options, shell-quoted)."""
    label, sep, args = text.partition("=")
    if not sep or not label.strip():
        raise argparse.ArgumentTypeError(f"--variant {text!r}: expected LABEL=ARGS")
    return label.strip(), shlex.split(args)


def _positive(kind: type[float] | type[int], upper: float) -> Any:
    def parse(text: str) -> float | int:
        try:
            value = kind(text)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number") from exc
        if not (math.isfinite(value) and 0 < value <= upper):
            raise argparse.ArgumentTypeError(f"{text!r}: need 0 < value <= {upper:g}")
        return value

    return parse


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=(__doc__ or "").split("\n\n")[0],
        epilog=f"rows: {', '.join(ROW_IDS)}. Exit status 1 if any request failed or a row broke.",
    )
    parser.add_argument("--rows", default=",".join(ROW_IDS), help="comma-separated rows")
    parser.add_argument(
        "--rounds", type=_positive(int, 50), default=3, help="rounds of every row (default 3)"
    )
    parser.add_argument(
        "--duration", type=_positive(float, 300), default=12.0, help="seconds per row (default 12)"
    )
    parser.add_argument(
        "--reloads", type=_positive(int, 100), default=4, help="reloads per row (default 4)"
    )
    parser.add_argument(
        "--concurrency", type=_positive(int, 1000), default=32, help="clients (default 32)"
    )
    parser.add_argument(
        "--mode", choices=[Mode.CLOSE.value, Mode.KEEPALIVE.value], default=Mode.CLOSE.value,
        help="a connection per request (close, the default: what `nodrop demo` runs) or keep-alive",
    )  # fmt: skip
    parser.add_argument(
        "--variant", action="append", type=parse_variant, default=[], metavar="LABEL=ARGS",
        help="extra `nodrop run` options for the nodrop rows, as another row each "
        "(repeatable; the rows without options are labelled 'default')",
    )  # fmt: skip
    parser.add_argument(
        "--no-default", action="store_true", help="with --variant: no 'default' nodrop rows"
    )
    parser.add_argument(
        "--quick", action="store_true", help="CI: 1 round, 4 s a row, 2 reloads, 8 clients"
    )
    parser.add_argument("--json", type=Path, help="also write every figure here")
    args = parser.parse_args(argv)
    args.rows_list = [r.strip() for r in args.rows.split(",") if r.strip()]
    if bad := [r for r in args.rows_list if r not in ROWS]:
        parser.error(f"unknown row(s): {', '.join(bad)}")
    if args.quick:
        args.rounds, args.duration, args.reloads, args.concurrency = 1, 4.0, 2, 8
    return args


def plan(args: argparse.Namespace) -> list[list[tuple[str, str, list[str]]]]:
    """Each round's (row, variant, nodrop run args), rotated by one per round."""
    variants: list[tuple[str, list[str]]] = [] if args.no_default else [("default", [])]
    variants += args.variant
    entries: list[tuple[str, str, list[str]]] = []
    for row in args.rows_list:
        if row in NODROP_ROWS:
            entries += [(row, label, extra) for label, extra in variants]
        else:
            entries.append((row, "-", []))
    rounds = []
    for r in range(args.rounds):
        shift = r % len(entries) if entries else 0
        rounds.append(entries[shift:] + entries[:shift])
    return rounds


def print_run(r: RunResult) -> None:
    load = "/".join(f"{x:.2f}" for x in r.loadavg)
    head = f"  {r.row}[{r.variant}]"
    if r.error and not r.requests:
        print(f"{head}: not run: {r.error.strip().splitlines()[-1][:300]}", flush=True)
        return
    s, w = Latency.of(r.steady), Latency.of(r.window)
    print(
        f"{head}: {r.requests} requests, {r.failed} failed; p99 steady {_ms(s.p99)} ms, "
        f"in reload windows {_ms(w.p99)} ms ({_ratio(w.p99, s.p99)}); "
        f"loadgen CPU {r.loadgen_share:.0%} of the machine, machine busy {r.machine_busy:.0%}, "
        f"load average {load}" + (f"; error: {r.error[:200]}" if r.error else ""),
        flush=True,
    )


def pool(runs: list[RunResult]) -> RunResult:
    """Every round of one row and variant, as one run."""
    out = RunResult(runs[0].row, runs[0].variant)
    out.phases = {p: [] for p in PHASES}
    out.cpu = {p: {} for p in PHASES}
    for r in runs:
        out.requests += r.requests
        out.failed += r.failed
        out.steady += r.steady
        out.window += r.window
        out.moments += r.moments
        out.startup_cpu += r.startup_cpu
        out.status_reloads += r.status_reloads
        for p, values in r.phases.items():
            out.phases[p] += values
        for p, groups in r.cpu.items():
            for g, v in groups.items():
                out.cpu[p][g] = out.cpu[p].get(g, 0.0) + v
        for p, q in r.queue.items():
            if q is not None:
                out.queue[p] = max(q, out.queue.get(p) or 0)
        for k, v in r.failures.items():
            out.failures[k] = out.failures.get(k, 0) + v
        if r.error:
            out.error = r.error
    done = [r for r in runs if r.requests]
    if done:
        out.loadgen_share = sum(r.loadgen_share for r in done) / len(done)
        out.machine_busy = sum(r.machine_busy for r in done) / len(done)
    out.loadavg = runs[-1].loadavg
    return out


def print_summary(pooled: list[RunResult]) -> None:
    print("\n## Reload windows against steady state (all rounds pooled)\n")
    print(
        "| row | requests | failed | p50 steady / reload | p99 steady / reload | "
        "p99.9 steady / reload | reload window (median) | loadgen CPU |"
    )
    print("|---|---:|---:|---|---|---|---:|---:|")
    for r in pooled:
        if not r.requests:
            print(f"| {r.row}[{r.variant}] | not run: {(r.error or '').splitlines()[-1][:120]} |")
            continue
        s, w = Latency.of(r.steady), Latency.of(r.window)
        windows = sorted(m.old_exited - m.started for m in r.moments)
        median = windows[len(windows) // 2] if windows else None
        cells = [
            f"{_ms(getattr(s, k))} / {_ms(getattr(w, k))} ms ({_ratio(getattr(w, k), getattr(s, k))})"
            for k in ("p50", "p99", "p999")
        ]
        print(
            f"| {r.row}[{r.variant}] | {r.requests} | {r.failed} | {' | '.join(cells)} | "
            f"{_ms(median)} ms | {r.loadgen_share:.0%} |"
        )


def print_breakdown(r: RunResult) -> None:
    if not r.moments:
        return
    s = Latency.of(r.steady)
    n = len(r.moments)
    print(f"\n### {r.row}[{r.variant}]: {n} reloads, by phase (CPU in ms per reload)\n")
    print(
        "| phase | mean length | requests | p50 | p99 | p99 / steady p99 | new workers CPU | "
        "old workers CPU | supervisor CPU | loadgen CPU | max accept queue |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for p in PHASES:
        lat = Latency.of(r.phases.get(p, []))
        cpu = r.cpu.get(p, {})
        q = r.queue.get(p)
        print(
            f"| {p} | {cpu.get('seconds', 0) / n * 1000:.0f} ms | {lat.count} | {_ms(lat.p50)} | "
            f"{_ms(lat.p99)} | {_ratio(lat.p99, s.p99)} | {cpu.get('new', 0) / n * 1000:.0f} | "
            f"{cpu.get('old', 0) / n * 1000:.0f} | {cpu.get('control', 0) / n * 1000:.0f} | "
            f"{cpu.get('loadgen', 0) / n * 1000:.0f} | {'-' if q is None else q} |"
        )
    print(f"| steady | | {s.count} | {_ms(s.p50)} | {_ms(s.p99)} | 1.00x | | | | | "
          f"{r.queue.get('steady', '-')} |")  # fmt: skip
    if r.startup_cpu:
        mean = sum(r.startup_cpu) / len(r.startup_cpu)
        print(f"\nstart-up CPU per new worker (spawn to READY): {mean * 1000:.0f} ms on average")
    timings = [t["timing"] for t in r.status_reloads if t.get("timing")]
    if timings:
        keys = list(timings[0])
        means = {k: sum(float(t.get(k) or 0) for t in timings) / len(timings) for k in keys}
        print(
            "nodrop status, per reload (mean): "
            + ", ".join(f"{k} {v * 1000:.1f} ms" for k, v in means.items())
        )


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    print(f"# reload_latency: {' '.join(sys.argv[1:]) if argv is None else ' '.join(argv)}")
    print(
        f"machine: {len(os.sched_getaffinity(0))} CPUs; load average at start "
        + "/".join(f"{x:.2f}" for x in os.getloadavg())
        + f"; {args.mode} mode, {args.concurrency} clients, {args.duration:g} s and "
        f"{args.reloads} reloads per row, {args.rounds} round(s)",
        flush=True,
    )
    runs: list[RunResult] = []
    for index, entries in enumerate(plan(args), start=1):
        print(f"round {index}:", flush=True)
        for row, variant, extra in entries:
            result = measure(
                row,
                variant,
                extra,
                duration=args.duration,
                reloads=args.reloads,
                concurrency=args.concurrency,
                mode=Mode(args.mode),
            )
            print_run(result)
            runs.append(result)
    keys: list[tuple[str, str]] = []
    for r in runs:
        if (r.row, r.variant) not in keys:
            keys.append((r.row, r.variant))
    pooled = [pool([r for r in runs if (r.row, r.variant) == k]) for k in keys]
    print_summary(pooled)
    for r in pooled:
        print_breakdown(r)
    print("\nload average at the end: " + "/".join(f"{x:.2f}" for x in os.getloadavg()))
    if args.json:
        doc: dict[str, Any] = {
            "argv": sys.argv[1:] if argv is None else argv,
            "runs": [r.summary() for r in runs],
            "pooled": [r.summary() for r in pooled],
        }
        args.json.write_text(json.dumps(doc, indent=1) + "\n")
    broken = [r for r in runs if r.error and r.row in NODROP_ROWS]
    return 1 if any(r.failed for r in runs) or broken else 0


if __name__ == "__main__":
    sys.exit(main())
