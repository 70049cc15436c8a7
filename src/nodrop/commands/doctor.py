"""``nodrop doctor``: what this machine supports for zero-drop reloads."""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from nodrop.kernel.migration import DoctorReport


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "doctor",
        help="show what this kernel and these privileges support",
        description=(
            "Probe this machine for what the reuseport strategy needs: kernel "
            "version (5.14+ for socket migration), capabilities (CAP_BPF / "
            "CAP_NET_ADMIN), net.ipv4.tcp_migrate_req in this network namespace, "
            "BTF, and whether nodrop's eBPF steering program really loads. "
            "Prints the migration method `nodrop run --strategy reuseport` would use."
        ),
    )
    parser.add_argument("--json", action="store_true", help="machine-readable output")
    parser.add_argument(
        "--allow-sysctl",
        action="store_true",
        help="assume nodrop may set net.ipv4.tcp_migrate_req=1 (as with `run --allow-sysctl`)",
    )
    parser.set_defaults(func=run)


def format_report(report: DoctorReport) -> str:
    """Human text, one line per check, then the migration method (pure)."""
    width = max(len(c.name) for c in report.checks)
    lines = ["nodrop doctor"]
    for c in report.checks:
        lines.append(f"  [{'ok' if c.ok else '--'}] {c.name:<{width}}  {c.detail}")
    lines.append(f"migration: {report.method.value} -- {report.method_reason}")
    return "\n".join(lines) + "\n"


def run(args: argparse.Namespace) -> int:
    from nodrop.kernel.migration import probe

    report = probe(allow_sysctl=args.allow_sysctl)
    if args.json:
        print(json.dumps(asdict(report), default=str, indent=2))
    else:
        print(format_report(report))
    return 0
