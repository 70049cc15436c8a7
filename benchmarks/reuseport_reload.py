"""Reloads under load, per migration method: what each one drops.

For each of ``reuseport`` with ebpf, sysctl and none (forced with
``NODROP_MIGRATION``) and the ``inherit`` strategy, start ``nodrop run`` in its
own private network namespace and reload it N times while a close-mode client
(a new connection per request) runs at concurrency C: once with nodrop's load
generator (``nodrop.load``, p99 split into steady and reload windows) and once
with ``wrk -H 'Connection: close'`` as an independent client (p99 overall).
Prints a markdown table.

Every namespace is made and destroyed by :func:`nodrop.testing.netns.run_in_netns`:
the sysctl the ``sysctl`` row sets never touches the host.

    .venv/bin/python benchmarks/reuseport_reload.py [--reloads 20]
        [--concurrency 256] [--duration 12] [--clients load,wrk]
        [--methods ebpf,sysctl,none,inherit] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

from nodrop.testing.netns import can_unshare_net, run_in_netns

SCENARIOS = Path(__file__).resolve().parents[1] / "tests" / "children" / "reuseport_scenarios.py"


def ms(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds * 1e3:.1f}"


def run_one(
    client: str, method: str, reloads: int, concurrency: int, duration: float
) -> dict[str, Any]:
    func = "under_load" if client == "load" else "under_wrk"
    with tempfile.TemporaryDirectory() as tmp:
        result: dict[str, Any] = run_in_netns(
            f"{SCENARIOS}:{func}",
            tmp,
            method,
            str(reloads),
            str(concurrency),
            str(duration),
            timeout=duration + 180,
        )
    return result


def row(client: str, r: dict[str, Any]) -> str:
    strategy = "inherit" if r["method"] == "inherit" else f"reuseport/{r['method']}"
    if client == "load":
        requests, failed = r["attempts"], r["failed"]
        detail = ", ".join(f"{k} {v}" for k, v in r["outcomes"].items() if k != "ok" and v)
        p99s, p99r = ms(r["p99_steady"]), ms(r["p99_reload"])
    else:
        requests, failed = r["requests"], r["failed"]
        detail = ", ".join(
            f"{k} {r[k]}" for k in ("connect", "read", "write", "timeout", "non2xx") if r[k]
        )
        p99s, p99r = f"{ms(r['p99'])} (all)", "-"
    per_m = 1e6 * failed / requests if requests else 0.0
    return (
        f"| {client} | {strategy} | {r['reloads_ok']}/{r['reloads']} | {requests} | {failed} "
        f"| {per_m:.0f} | {p99s} | {p99r} | {detail or '-'} |"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reloads", type=int, default=20)
    parser.add_argument("--concurrency", type=int, default=256)
    parser.add_argument("--duration", type=float, default=12.0)
    parser.add_argument("--clients", default="load,wrk")
    parser.add_argument("--methods", default="ebpf,sysctl,none,inherit")
    parser.add_argument("--json", metavar="FILE")
    args = parser.parse_args(argv)
    ok, why = can_unshare_net()
    if not ok:
        print(f"skipped: {why}", file=sys.stderr)
        return 2
    clients = args.clients.split(",")
    if "wrk" in clients and shutil.which("wrk") is None:
        print("wrk not installed: skipping the wrk rows", file=sys.stderr)
        clients.remove("wrk")
    rows, raw = [], []
    for method in args.methods.split(","):
        for client in clients:
            r = run_one(client, method, args.reloads, args.concurrency, args.duration)
            r.pop("log", None)
            raw.append({"client": client, **r})
            rows.append(row(client, r))
            print(rows[-1], file=sys.stderr, flush=True)
    print(
        f"\n{args.reloads} reloads in {args.duration:g}s under close-mode load at concurrency "
        f"{args.concurrency}, 2 workers per generation, one private netns per row\n"
    )
    print(
        "| client | strategy | reloads ok | requests | failed | failed per 10^6 "
        "| p99 steady (ms) | p99 reload windows (ms) | failures |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    print("\n".join(rows))
    if args.json:
        Path(args.json).write_text(json.dumps(raw, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
