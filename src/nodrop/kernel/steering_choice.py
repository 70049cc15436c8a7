"""Pick the reuseport strategy's migration method: ebpf, sysctl or none.

The decision is :func:`nodrop.kernel.migration.probe`'s, so ``nodrop doctor`` shows
exactly what ``nodrop run --strategy reuseport`` will do. The environment
variable ``NODROP_MIGRATION=ebpf|sysctl|none`` forces a method instead (for
tests and benchmarks that compare them, or to rule eBPF out on a machine):

* ``ebpf``: fails (ConfigError) if the program cannot be loaded here;
* ``sysctl``: uses ``net.ipv4.tcp_migrate_req``, which must already be 1 or
  may be set only with ``--allow-sysctl``; eBPF is not used;
* ``none``: no steering program and the sysctl is left as it is (if it is
  already 1 the kernel still migrates, and the reason says so).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Final

from nodrop.errors import ConfigError
from nodrop.kernel.migration import Strategy, probe

MIGRATE_SYSCTL: Final = Path("/proc/sys/net/ipv4/tcp_migrate_req")
#: Environment variable that forces the migration method.
FORCE_ENV: Final = "NODROP_MIGRATION"
METHODS: Final = tuple(s.value for s in Strategy)


def forced_method(environ: Mapping[str, str] = os.environ) -> str | None:
    """The method ``NODROP_MIGRATION`` asks for, or None if unset (pure).

    Raises:
        ConfigError: the value is not one of ebpf, sysctl, none.
    """
    value = environ.get(FORCE_ENV, "").strip().lower()
    if not value:
        return None
    if value not in METHODS:
        raise ConfigError(f"{FORCE_ENV}={value!r}: expected one of {', '.join(METHODS)}")
    return value


def _set_sysctl() -> None:
    try:
        MIGRATE_SYSCTL.write_text("1\n")
    except OSError as exc:
        raise ConfigError(f"cannot set net.ipv4.tcp_migrate_req=1: {exc.strerror}") from exc


def choose_method(allow_sysctl: bool, environ: Mapping[str, str] = os.environ) -> tuple[str, str]:
    """Returns (method, reason). With ``allow_sysctl`` and no eBPF, sets
    ``net.ipv4.tcp_migrate_req=1`` in this network namespace and says so.

    Raises:
        ConfigError: a forced method is not available, or the sysctl cannot
            be written.
    """
    forced = forced_method(environ)
    report = probe(allow_sysctl=allow_sysctl)
    sysctl_on = report.facts.tcp_migrate_req == 1
    if forced == "ebpf":
        if not report.facts.ebpf_ok:
            raise ConfigError(f"{FORCE_ENV}=ebpf: {report.facts.ebpf_reason}")
        return "ebpf", f"forced by {FORCE_ENV}=ebpf"
    if forced == "sysctl":
        if sysctl_on:
            return "sysctl", f"forced by {FORCE_ENV}=sysctl; net.ipv4.tcp_migrate_req is already 1"
        if not allow_sysctl:
            raise ConfigError(
                f"{FORCE_ENV}=sysctl: net.ipv4.tcp_migrate_req is not 1; pass --allow-sysctl"
            )
        _set_sysctl()
        return "sysctl", (
            f"forced by {FORCE_ENV}=sysctl; set net.ipv4.tcp_migrate_req=1 in this "
            "network namespace (--allow-sysctl)"
        )
    if forced == "none":
        if sysctl_on:
            return "none", (
                f"forced by {FORCE_ENV}=none, but net.ipv4.tcp_migrate_req is 1 here: "
                "the kernel still migrates by hash"
            )
        return "none", f"forced by {FORCE_ENV}=none"
    if report.strategy is Strategy.SYSCTL and not sysctl_on:
        _set_sysctl()
        return "sysctl", "set net.ipv4.tcp_migrate_req=1 in this network namespace (--allow-sysctl)"
    return report.strategy.value, report.strategy_reason
