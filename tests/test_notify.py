"""sd_notify: message format, the client, the receiver, and systemd's tools."""

from __future__ import annotations

import os
import select
import shutil
import socket
import subprocess
from collections.abc import Iterator

import pytest

from conftest import Procs
from nodrop.errors import NotifyError, ProtocolError
from nodrop.kernel.fdpass import send_with_fds
from nodrop.systemd.message import MAX_MESSAGE, format_message, parse_message
from nodrop.systemd.notify import notify, notify_address, ready, reloading, status, stopping
from nodrop.systemd.receiver import Notification, NotifyReceiver


@pytest.fixture
def receiver() -> Iterator[NotifyReceiver]:
    with NotifyReceiver() as recv:
        yield recv


def next_notification(recv: NotifyReceiver, timeout: float = 5.0) -> Notification:
    assert select.select([recv], [], [], timeout)[0], "no notification arrived"
    got = recv.receive()
    assert got is not None
    return got


@pytest.fixture
def notify_env(receiver: NotifyReceiver, monkeypatch: pytest.MonkeyPatch) -> NotifyReceiver:
    monkeypatch.setenv("NOTIFY_SOCKET", receiver.path)
    return receiver


PARSE = [
    (b"READY=1", {"READY": "1"}),
    (b"READY=1\nSTATUS=serving 3 clients\n", {"READY": "1", "STATUS": "serving 3 clients"}),
    (b"STATUS=a=b", {"STATUS": "a=b"}),
    (b"\n\nREADY=1\n\n", {"READY": "1"}),
    (b"STATUS=1\nSTATUS=2", {"STATUS": "2"}),
    (b"", {}),
    ("STATUS=café".encode(), {"STATUS": "café"}),
]


@pytest.mark.parametrize(("data", "fields"), PARSE)
def test_parse(data: bytes, fields: dict[str, str]) -> None:
    assert parse_message(data) == fields


GARBAGE = [
    b"\xff\xfe",
    b"READY",
    b"ready=1",
    b"=1",
    b"READY=1\0",
    b"A-B=1",
    b"X" * (MAX_MESSAGE + 1),
]


@pytest.mark.parametrize("data", GARBAGE, ids=lambda d: repr(d[:12]))
def test_parse_rejects_garbage(data: bytes) -> None:
    with pytest.raises(ProtocolError):
        parse_message(data)


def test_format() -> None:
    assert format_message({"READY": "1", "STATUS": "ok"}) == b"READY=1\nSTATUS=ok"
    for bad in ({"lower": "1"}, {"STATUS": "two\nlines"}, {"STATUS": "x" * 5000}):
        with pytest.raises(NotifyError):
            format_message(bad)


def test_address_forms() -> None:
    assert notify_address("/run/x") == "/run/x"
    assert notify_address("@name") == "\0name"
    for bad in ("relative", "@", "", "vsock:2:123"):
        with pytest.raises(NotifyError):
            notify_address(bad)


def test_without_notify_socket_is_a_noop(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    assert notify("READY=1") is False
    assert ready() is False


def test_helpers_send_what_systemd_expects(notify_env: NotifyReceiver) -> None:
    assert ready("up")
    got = next_notification(notify_env)
    assert got.fields == {"READY": "1", "STATUS": "up"}
    assert got.pid == os.getpid()
    assert got.uid == os.getuid()
    assert reloading()
    fields = next_notification(notify_env).fields
    assert fields["RELOADING"] == "1"
    assert int(fields["MONOTONIC_USEC"]) > 0
    assert stopping()
    assert next_notification(notify_env).fields == {"STOPPING": "1"}
    assert status("half way")
    assert next_notification(notify_env).fields == {"STATUS": "half way"}


def test_abstract_notify_socket(monkeypatch: pytest.MonkeyPatch) -> None:
    name = f"@nodrop-test-notify-{os.getpid()}"
    with NotifyReceiver(name) as recv:
        monkeypatch.setenv("NOTIFY_SOCKET", name)
        assert notify({"READY": "1"})
        assert next_notification(recv).fields == {"READY": "1"}


def test_unset_environment(notify_env: NotifyReceiver) -> None:
    assert notify("READY=1", unset_environment=True)
    assert "NOTIFY_SOCKET" not in os.environ
    next_notification(notify_env)


def test_send_to_a_dead_socket_raises(tmp_path: object, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NOTIFY_SOCKET", "/nonexistent/nodrop/notify")
    with pytest.raises(NotifyError, match="cannot notify"):
        ready()


def test_fdstore_with_fds(notify_env: NotifyReceiver) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        assert notify({"FDSTORE": "1", "FDNAME": "web"}, fds=[sock.fileno()])
        got = next_notification(notify_env)
        assert got.fields == {"FDSTORE": "1", "FDNAME": "web"}
        assert len(got.fds) == 1
        assert os.fstat(got.fds[0]).st_ino == os.fstat(sock.fileno()).st_ino
        got.close_fds()


def test_garbage_is_rejected_and_the_receiver_keeps_working(receiver: NotifyReceiver) -> None:
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as peer, socket.socket() as carried:
        peer.connect(receiver.path)
        for data in (b"\xff garbage", b"X" * (MAX_MESSAGE + 100), b"no equals sign"):
            send_with_fds(peer, data, [carried.fileno()])
        peer.send(b"READY=1")
        before = len(os.listdir("/proc/self/fd"))
        for _ in range(3):
            assert select.select([receiver], [], [], 5)[0]
            with pytest.raises(ProtocolError):
                receiver.receive()
        # the fds that came with the garbage were closed, not kept
        assert len(os.listdir("/proc/self/fd")) == before
        assert next_notification(receiver).fields == {"READY": "1"}
        assert receiver.receive() is None


@pytest.mark.skipif(shutil.which("systemd-notify") is None, reason="systemd-notify not installed")
def test_interop_with_systemd_notify(receiver: NotifyReceiver, procs: Procs) -> None:
    env = dict(os.environ, NOTIFY_SOCKET=receiver.path)
    proc = procs.popen(
        ["systemd-notify", "--no-block", "--ready", "--status=warming up"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    _out, err = proc.communicate(timeout=10)
    assert proc.returncode == 0, err
    got = next_notification(receiver)
    assert got.fields == {"READY": "1", "STATUS": "warming up"}
    # systemd-notify speaks on behalf of its parent (the service's main
    # process); as root it can put that pid in SCM_CREDENTIALS, otherwise the
    # kernel stamps its own.
    assert got.pid == (os.getpid() if os.geteuid() == 0 else proc.pid)


def test_full_receiver_queue_does_not_block_with_a_timeout(notify_env: NotifyReceiver) -> None:
    """A service manager that stops reading must not wedge the sender
    (the supervisor sends with timeout=0)."""
    sent = 0

    def fill() -> None:
        nonlocal sent
        for _ in range(10_000):
            notify("STATUS=x", timeout=0)
            sent += 1

    with pytest.raises(NotifyError, match="cannot notify"):
        fill()
    assert sent >= 1
    while notify_env.receive() is not None:
        pass
