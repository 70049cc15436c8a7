"""How many queued connections does closing the old generation's listener lose?

Runs the kernel migration cases of ``tests/test_migration_kernel.py`` with N
clients, each case in its own fresh private network namespace (needs root),
for migration off, on via ``net.ipv4.tcp_migrate_req=1``, and on via eBPF
steering (and, for contrast, the same program loaded for plain SELECT, which
steers but never migrates), and prints a markdown table of resets.

    .venv/bin/python benchmarks/migration.py [--clients 200] [--half-open 200]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from nodrop.kernel.bpf import probe_ebpf
from nodrop.testing import netns

SCENARIO = Path(__file__).resolve().parent.parent / "tests" / "test_migration_kernel.py"
CASES = {
    "accept_queue": "queued children, migrated at close()",
    "half_open_ack": "half-open, migrated at the client's next ACK",
    "half_open_timer": "half-open, migrated at the SYN-ACK retransmit timer",
}
MODES = ("off", "sysctl", "ebpf", "ebpf_select")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=200, help="queued (accepted-queue) clients")
    parser.add_argument("--half-open", type=int, default=200, help="half-open handshakes")
    args = parser.parse_args(argv)

    ok, why = netns.can_unshare_net()
    if not ok:
        print(f"skipped: {why}", file=sys.stderr)
        return 2
    ebpf_ok, ebpf_why = probe_ebpf()

    header = ["case", "N", "migration off", "tcp_migrate_req=1", "eBPF SELECT_OR_MIGRATE"]
    print("| " + " | ".join([*header, "eBPF SELECT only"]) + " |")
    print("|---|---:|---:|---:|---:|---:|")
    for case, title in CASES.items():
        n = args.clients if case == "accept_queue" else args.half_open
        cells = []
        for mode in MODES:
            if mode.startswith("ebpf") and not ebpf_ok:
                cells.append(f"n/a ({ebpf_why})")
                continue
            start = time.monotonic()
            r = netns.run_in_netns(f"{SCENARIO}:run_case", case, mode, str(n), timeout=120)
            took = time.monotonic() - start
            lost = r["reset"] + r["timeout"]
            cells.append(f"{lost} reset ({r['served']} served, {took:.1f}s)")
        print(f"| {title} | {n} | " + " | ".join(cells) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
