"""nodrop.kernel.migration: pure parsing and judgement table-driven; probing for real."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from nodrop.commands.doctor import format_report
from nodrop.kernel.migration import (
    CAP_BPF,
    CAP_NET_ADMIN,
    CAP_SYS_ADMIN,
    DoctorReport,
    Facts,
    Method,
    assess,
    parse_cap_eff,
    parse_kernel_release,
    probe,
)
from nodrop.testing import netns

ALL_CAPS = (1 << CAP_BPF) | (1 << CAP_NET_ADMIN) | (1 << CAP_SYS_ADMIN)
GOOD = Facts(
    kernel_release="6.18.44-fc-v669",
    cap_eff=ALL_CAPS,
    tcp_migrate_req=0,
    btf=True,
    ebpf_ok=True,
    ebpf_reason="loads",
)


@pytest.mark.parametrize(
    ("release", "expected"),
    [
        ("6.18.44-fc-v669", (6, 18, 44)),
        ("5.14.0-284.el9.x86_64", (5, 14, 0)),
        ("5.4", (5, 4)),
        ("4.19.0-27-amd64", (4, 19, 0)),
        ("weird", None),
        ("", None),
    ],
)
def test_parse_kernel_release(release: str, expected: tuple[int, ...] | None) -> None:
    assert parse_kernel_release(release) == expected


@pytest.mark.parametrize(
    ("status", "expected"),
    [
        ("Name:\tx\nCapInh:\t0\nCapEff:\t000001fffeffffff\nCapBnd:\t0\n", 0x1FFFEFFFFFF),
        ("CapEff:\t0000000000000000\n", 0),
        ("CapEff:\t0000008000001000", (1 << 39) | (1 << 12)),
        ("Name:\tx\n", None),
    ],
)
def test_parse_cap_eff(status: str, expected: int | None) -> None:
    assert parse_cap_eff(status) == expected


@pytest.mark.parametrize(
    ("changes", "allow_sysctl", "method", "reason_part"),
    [
        ({}, False, Method.EBPF, "SELECT_OR_MIGRATE"),
        ({"ebpf_ok": False}, False, Method.NONE, "--allow-sysctl"),
        ({"ebpf_ok": False}, True, Method.SYSCTL, "will set net.ipv4.tcp_migrate_req=1"),
        ({"ebpf_ok": False, "tcp_migrate_req": 1}, False, Method.SYSCTL, "already 1"),
        ({"ebpf_ok": False, "cap_eff": 0}, True, Method.NONE, "CAP_NET_ADMIN is missing"),
        ({"kernel_release": "5.10.0"}, True, Method.NONE, "needs Linux 5.14+"),
        ({"kernel_release": "5.13.19", "tcp_migrate_req": None}, True, Method.NONE, "5.14"),
        ({"kernel_release": "5.14.0"}, False, Method.EBPF, "no sysctl is changed"),
    ],
)
def test_method_chain(
    changes: dict[str, object], allow_sysctl: bool, method: Method, reason_part: str
) -> None:
    facts = dataclasses.replace(GOOD, **changes)  # type: ignore[arg-type]
    report = assess(facts, allow_sysctl=allow_sysctl)
    assert report.method is method
    assert reason_part in report.method_reason
    if method is Method.NONE:
        assert "queued connections may be reset" in report.method_reason


def test_checks_have_a_reason_each() -> None:
    report = assess(dataclasses.replace(GOOD, cap_eff=1 << CAP_NET_ADMIN))
    by_name = {c.name: c for c in report.checks}
    assert set(by_name) == {"kernel", "capabilities", "tcp_migrate_req", "BTF", "eBPF steering"}
    assert all(c.detail for c in report.checks)
    assert by_name["kernel"].ok
    assert not by_name["capabilities"].ok
    assert "CAP_BPF no" in by_name["capabilities"].detail
    assert not by_name["tcp_migrate_req"].ok
    assert report.kernel_version == (6, 18, 44)


def test_format_report() -> None:
    text = format_report(assess(dataclasses.replace(GOOD, ebpf_ok=False, ebpf_reason="EPERM")))
    lines = text.splitlines()
    assert lines[0] == "nodrop doctor"
    assert lines[1].startswith("  [ok] kernel ")
    assert "[--] eBPF steering" in text
    assert "EPERM" in text
    assert lines[-1].startswith("migration: none -- the old generation's queued connections")
    assert text.endswith("\n")


def test_report_is_frozen() -> None:
    report = assess(GOOD)
    with pytest.raises(dataclasses.FrozenInstanceError):
        report.method = Method.NONE  # type: ignore[misc]


def test_probe_this_machine() -> None:
    report = probe()
    assert isinstance(report, DoctorReport)
    assert report.facts.kernel_release
    assert report.method in Method
    assert format_report(report).count("\n") == len(report.checks) + 2


def child_probe_with_sysctl() -> dict[str, object]:
    netns.write_sysctl("net.ipv4.tcp_migrate_req", 1)
    report = probe()
    return {"migrate_req": report.facts.tcp_migrate_req, "text": format_report(report)}


@pytest.mark.netns
def test_probe_reads_the_sysctl_of_its_own_namespace() -> None:
    ok, why = netns.can_unshare_net()
    if not ok:
        pytest.skip(why)
    out = netns.run_in_netns(f"{Path(__file__).resolve()}:child_probe_with_sysctl", timeout=30)
    assert out["migrate_req"] == 1
    assert "[ok] tcp_migrate_req  1" in out["text"]
