"""Pick the reuseport strategy's migration method: ebpf, sysctl or none.

The decision is :func:`nodrop.doctor.probe`'s, so ``nodrop doctor`` shows
exactly what ``nodrop run --strategy reuseport`` will do.
"""

from __future__ import annotations

from pathlib import Path

from nodrop.doctor import Strategy, probe
from nodrop.errors import ConfigError

MIGRATE_SYSCTL = Path("/proc/sys/net/ipv4/tcp_migrate_req")


def choose_method(allow_sysctl: bool) -> tuple[str, str]:
    """Returns (method, reason). With ``allow_sysctl`` and no eBPF, sets
    ``net.ipv4.tcp_migrate_req=1`` in this network namespace and says so."""
    report = probe(allow_sysctl=allow_sysctl)
    if report.strategy is Strategy.SYSCTL and report.facts.tcp_migrate_req != 1:
        try:
            MIGRATE_SYSCTL.write_text("1\n")
        except OSError as exc:
            raise ConfigError(f"cannot set net.ipv4.tcp_migrate_req=1: {exc.strerror}") from exc
        return "sysctl", "set net.ipv4.tcp_migrate_req=1 in this network namespace (--allow-sysctl)"
    return report.strategy.value, report.strategy_reason
