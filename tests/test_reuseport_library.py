"""nodrop.reuseport: SO_REUSEPORT listeners that join and take over a group's
eBPF steering, for servers without a supervisor."""

from __future__ import annotations

import socket
from typing import Any

import pytest

from conftest import CHILDREN
from nodrop.errors import BindError
from nodrop.kernel.bpf import probe_ebpf
from nodrop.kernel.bpf_pin import bpffs_mount_points
from nodrop.listeners.bind import resolve
from nodrop.listeners.spec import parse_spec
from nodrop.reuseport import listen, pin_dir_for
from nodrop.testing import netns

MOUNTS = """\
proc /proc proc rw,nosuid 0 0
bpf /sys/fs/bpf bpf rw,nosuid,nodev,noexec,relatime,mode=700 0 0
tmpfs /tmp tmpfs rw 0 0
none /run/with\\040space bpf rw 0 0
"""


def test_bpffs_mount_points() -> None:
    assert bpffs_mount_points(MOUNTS) == ["/sys/fs/bpf", "/run/with space"]
    assert bpffs_mount_points("") == []


@pytest.mark.parametrize(
    ("spec", "name"),
    [
        ("tcp://127.0.0.1:8000", "tcp_127-0-0-1_8000"),
        ("udp://127.0.0.1:53", "udp_127-0-0-1_53"),
        ("tcp://[::1]:8000", "tcp_--1_8000"),
    ],
)
def test_pin_dir_for_has_no_dots(spec: str, name: str) -> None:
    [target] = resolve(parse_spec(spec))
    assert pin_dir_for("/sys/fs/bpf/app", target).name == name


def test_listen_without_steering_is_a_plain_reuseport_bind() -> None:
    [a] = listen("tcp://127.0.0.1:0")
    try:
        port = a.sock.getsockname()[1]
        [b] = listen(f"tcp://127.0.0.1:{port}")  # a second one joins the group
        try:
            assert a.sock.getsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT) == 1
            assert b.steering is None
            assert not b.is_active()
            b.take_over()  # nothing to do without steering
        finally:
            b.close()
    finally:
        a.close()


def test_listen_refuses_unix() -> None:
    with pytest.raises(BindError, match="no SO_REUSEPORT"):
        listen("unix:@nodrop-test-reuseport-lib")


def test_join_and_take_over_through_pinned_steering() -> None:
    ok, why = netns.can_unshare_net()
    if not ok:
        pytest.skip(why)
    ok, why = probe_ebpf()
    if not ok:
        pytest.skip(f"eBPF steering unavailable: {why}")
    r: dict[str, Any] = netns.run_in_netns(
        f"{CHILDREN / 'reuseport_lib_scenarios.py'}:takeover", timeout=60
    )
    assert r["on_bpffs"]
    assert not r["tmp_on_bpffs"]
    assert r["a_active"]
    assert r["pinned"] == ["map", "prog"]
    # B opened the pinned objects (its own fds) and took over
    assert r["b_fds_differ"]
    assert r["b_active"]
    assert not r["a_still_active"]
    # every new connection went to B while A was still open...
    assert r["b_got_new"] == 12
    # ...and A's 8 queued connections migrated to B when A closed
    assert r["b_got_migrated"] == r["a_queue_before_close"] == 8
    # a listener joined with take_over=False is not active until it asks
    assert not r["c_active_before"]
    assert r["b_active_before_c"]
    assert r["c_active_after"]
    assert r["from_fds_cookie_ok"]
    assert r["not_bpffs"][0], r["not_bpffs"]
    assert "not on a bpf filesystem" in r["not_bpffs"][1]
    assert r["unpinned"]
