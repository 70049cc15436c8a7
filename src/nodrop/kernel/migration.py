"""Socket migration: can this kernel hand a closing listener's queued
connections to the new generation, and how -- the probe ``nodrop doctor``
renders and the choice ``nodrop run --strategy reuseport`` makes.

When the old generation's listener closes, connections still in its accept
queue, and handshakes still half-open, are reset unless the kernel migrates
them to another listener of the same SO_REUSEPORT group (Linux 5.14+). It does
so if either

* an eBPF program of attach type ``SK_REUSEPORT_SELECT_OR_MIGRATE`` is attached
  to the group (nodrop's :class:`~nodrop.kernel.bpf.ReuseportSteering`), or
* ``net.ipv4.tcp_migrate_req`` is 1 in the listener's network namespace.

:func:`probe` gathers the facts (the only I/O here) and :func:`assess`, pure,
judges them. :func:`choose_method` is what ``nodrop run`` uses: the probe's
verdict, unless ``NODROP_MIGRATION=ebpf|sysctl|none`` forces a method (for
tests and benchmarks that compare them, or to rule eBPF out on a machine):

* ``ebpf``: fails (ConfigError) if the program cannot be loaded here;
* ``sysctl``: uses ``net.ipv4.tcp_migrate_req``, which must already be 1 or
  may be set only with ``--allow-sysctl``; eBPF is not used;
* ``none``: no steering program and the sysctl is left as it is (if it is
  already 1 the kernel still migrates, and the reason says so).
"""

from __future__ import annotations

import enum
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from nodrop.errors import ConfigError
from nodrop.kernel.bpf import probe_ebpf

__all__ = [
    "BTF_PATH",
    "FORCE_ENV",
    "MIGRATE_SYSCTL",
    "MIN_MIGRATION_KERNEL",
    "Check",
    "DoctorReport",
    "Facts",
    "Method",
    "assess",
    "choose_method",
    "forced_method",
    "parse_cap_eff",
    "parse_kernel_release",
    "probe",
]

#: First kernel with SO_REUSEPORT migration (tcp_migrate_req and
#: BPF_SK_REUSEPORT_SELECT_OR_MIGRATE).
MIN_MIGRATION_KERNEL: Final = (5, 14)
BTF_PATH: Final = Path("/sys/kernel/btf/vmlinux")
MIGRATE_SYSCTL: Final = Path("/proc/sys/net/ipv4/tcp_migrate_req")

CAP_NET_ADMIN: Final = 12
CAP_SYS_ADMIN: Final = 21
CAP_BPF: Final = 39


class Method(enum.Enum):
    """How the old generation's queued connections reach the new one."""

    EBPF = "ebpf"
    SYSCTL = "sysctl"
    NONE = "none"


@dataclass(frozen=True)
class Facts:
    """What :func:`probe` found, before any judgement."""

    kernel_release: str
    cap_eff: int | None
    tcp_migrate_req: int | None
    btf: bool
    ebpf_ok: bool
    ebpf_reason: str


@dataclass(frozen=True)
class Check:
    """One line of the report."""

    name: str
    ok: bool
    detail: str


@dataclass(frozen=True)
class DoctorReport:
    """The facts, one judged line per fact, and the migration method chosen."""

    facts: Facts
    allow_sysctl: bool
    kernel_version: tuple[int, ...] | None
    kernel_ok: bool
    cap_bpf: bool
    cap_net_admin: bool
    checks: tuple[Check, ...]
    method: Method
    method_reason: str


# --- pure --------------------------------------------------------------------


def parse_kernel_release(release: str) -> tuple[int, ...] | None:
    """``"6.18.44-fc-v669"`` -> ``(6, 18, 44)``; None if it does not start
    with a dotted version."""
    m = re.match(r"(\d+)\.(\d+)(?:\.(\d+))?", release)
    if not m:
        return None
    return tuple(int(g) for g in m.groups() if g is not None)


def parse_cap_eff(status: str) -> int | None:
    """The effective capability mask from the text of /proc/self/status."""
    m = re.search(r"^CapEff:\s*([0-9a-fA-F]+)\s*$", status, re.MULTILINE)
    return int(m.group(1), 16) if m else None


def _has(mask: int | None, cap: int) -> bool:
    return mask is not None and bool(mask >> cap & 1)


def _decide(
    facts: Facts, kernel_ok: bool, cap_net_admin: bool, allow_sysctl: bool
) -> tuple[Method, str]:
    lost = "the old generation's queued connections may be reset"
    if not kernel_ok:
        return Method.NONE, f"{lost}: migration needs Linux 5.14+"
    if facts.ebpf_ok:
        return Method.EBPF, (
            "eBPF SELECT_OR_MIGRATE steering: new connections go to the new generation "
            "and the old one's queue migrates at close; no sysctl is changed"
        )
    if facts.tcp_migrate_req == 1:
        return Method.SYSCTL, "net.ipv4.tcp_migrate_req is already 1 in this network namespace"
    if allow_sysctl and cap_net_admin:
        return Method.SYSCTL, (
            "eBPF unavailable; nodrop will set net.ipv4.tcp_migrate_req=1 (--allow-sysctl), "
            "which applies to every listener in this network namespace"
        )
    if allow_sysctl:
        return Method.NONE, f"{lost}: --allow-sysctl given but CAP_NET_ADMIN is missing"
    return Method.NONE, (
        f"{lost}: eBPF unavailable and net.ipv4.tcp_migrate_req is not 1 "
        "(pass --allow-sysctl to let nodrop set it, or grant CAP_BPF)"
    )


def assess(facts: Facts, *, allow_sysctl: bool = False) -> DoctorReport:
    """Judge ``facts``: one :class:`Check` per fact and the method chain's
    decision, ``ebpf`` before ``sysctl`` before ``none``."""
    version = parse_kernel_release(facts.kernel_release)
    kernel_ok = version is not None and version[:2] >= MIN_MIGRATION_KERNEL
    cap_bpf = _has(facts.cap_eff, CAP_BPF) or _has(facts.cap_eff, CAP_SYS_ADMIN)
    cap_net_admin = _has(facts.cap_eff, CAP_NET_ADMIN)
    need = ".".join(map(str, MIN_MIGRATION_KERNEL))
    if facts.cap_eff is None:
        caps = "unknown (no CapEff in /proc/self/status)"
    else:
        caps = (
            f"CAP_BPF {'yes' if _has(facts.cap_eff, CAP_BPF) else 'no'}, "
            f"CAP_SYS_ADMIN {'yes' if _has(facts.cap_eff, CAP_SYS_ADMIN) else 'no'}, "
            f"CAP_NET_ADMIN {'yes' if cap_net_admin else 'no'}"
        )
    if facts.tcp_migrate_req is None:
        sysctl = "absent (kernel without migration)"
    elif facts.tcp_migrate_req == 1:
        sysctl = "1: the kernel migrates by hash for every listener in this network namespace"
    else:
        sysctl = f"{facts.tcp_migrate_req}: off in this network namespace"
    checks = (
        Check(
            "kernel",
            kernel_ok,
            f"{facts.kernel_release} ({'>=' if kernel_ok else '<'} {need}: migration "
            f"{'supported' if kernel_ok else 'unsupported'})",
        ),
        Check("capabilities", cap_bpf and cap_net_admin, caps),
        Check("tcp_migrate_req", facts.tcp_migrate_req == 1, sysctl),
        Check(
            "BTF",
            facts.btf,
            f"{BTF_PATH} {'present' if facts.btf else 'absent'} "
            "(informational: nodrop's program needs no BTF)",
        ),
        Check("eBPF steering", facts.ebpf_ok, facts.ebpf_reason),
    )
    method, reason = _decide(facts, kernel_ok, cap_net_admin, allow_sysctl)
    return DoctorReport(
        facts=facts,
        allow_sysctl=allow_sysctl,
        kernel_version=version,
        kernel_ok=kernel_ok,
        cap_bpf=cap_bpf,
        cap_net_admin=cap_net_admin,
        checks=checks,
        method=method,
        method_reason=reason,
    )


# --- I/O ---------------------------------------------------------------------


def _read_int(path: Path) -> int | None:
    try:
        return int(path.read_text().strip())
    except (OSError, ValueError):
        return None


def _read_cap_eff() -> int | None:
    try:
        return parse_cap_eff(Path("/proc/self/status").read_text())
    except OSError:
        return None


def gather_facts() -> Facts:
    """Look at this machine: kernel, capabilities, the sysctl in this
    process's network namespace, BTF, and a real load of the eBPF program."""
    ebpf_ok, ebpf_reason = probe_ebpf()
    return Facts(
        kernel_release=os.uname().release,
        cap_eff=_read_cap_eff(),
        tcp_migrate_req=_read_int(MIGRATE_SYSCTL),
        btf=BTF_PATH.exists(),
        ebpf_ok=ebpf_ok,
        ebpf_reason=ebpf_reason,
    )


def probe(*, allow_sysctl: bool = False) -> DoctorReport:
    """Probe this machine and judge it. Changes nothing (the eBPF program is
    loaded and unloaded; no sysctl is written)."""
    return assess(gather_facts(), allow_sysctl=allow_sysctl)


# --- the choice nodrop run makes ------------------------------------------------

#: Environment variable that forces the migration method.
FORCE_ENV: Final = "NODROP_MIGRATION"
METHODS: Final = tuple(s.value for s in Method)


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
    if report.method is Method.SYSCTL and not sysctl_on:
        _set_sysctl()
        return "sysctl", "set net.ipv4.tcp_migrate_req=1 in this network namespace (--allow-sysctl)"
    return report.method.value, report.method_reason
