"""The socket holder between real processes: round trips, expiry, hostile peers."""

from __future__ import annotations

import contextlib
import json
import os
import select
import shutil
import socket
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import CHILDREN, Procs
from nodrop.errors import HolderError, ProtocolError
from nodrop.fdwire import connect, decode, encode
from nodrop.holder import client, ops
from nodrop.kernel.fdpass import send_with_fds
from nodrop.listeners.held import HeldSocket
from nodrop.systemd.notify import notify
from nodrop.systemd.receiver import NotifyReceiver
from nodrop.testing.waiting import wait_for

READY_TIMEOUT = 15.0


@dataclass
class RunningHolder:
    path: str
    fdstore: str
    pid: int
    proc: subprocess.Popen[bytes]
    log: Path

    def fd_count(self) -> int:
        return len(os.listdir(f"/proc/{self.pid}/fd"))

    def log_text(self) -> str:
        return self.log.read_text()


def start_holder(
    procs: Procs, directory: Path, *extra: str, path: str | None = None
) -> RunningHolder:
    path = path or str(directory / "run" / "holder.sock")
    fdstore = str(directory / "run" / "fdstore.sock")
    log = directory / "holder.log"
    with NotifyReceiver() as receiver:
        env = dict(os.environ, NOTIFY_SOCKET=receiver.path)
        with open(log, "ab") as err:
            proc = procs.popen(
                [
                    sys.executable,
                    "-m",
                    "nodrop",
                    "hold",
                    "--path",
                    path,
                    "--fdstore",
                    fdstore,
                    *extra,
                ],
                env=env,
                stdin=subprocess.DEVNULL,
                stderr=err,
            )
        deadline = READY_TIMEOUT
        while True:
            if not select.select([receiver], [], [], deadline)[0]:
                raise TimeoutError(f"holder not ready: {log.read_text()}")
            note = receiver.receive()
            if note is None:
                continue
            note.close_fds()
            if note.fields.get("READY") == "1":
                break
            raise AssertionError(f"holder failed: {note.fields}")
    return RunningHolder(path, fdstore, proc.pid, proc, log)


@pytest.fixture
def holder(procs: Procs, tmp_path: Path) -> RunningHolder:
    return start_holder(procs, tmp_path, "--ttl-max", "120", "--max-held", "16")


def listener(name: str = "web") -> socket.socket:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(16)
    return sock


def inode(sock: socket.socket | int) -> int:
    return os.fstat(sock if isinstance(sock, int) else sock.fileno()).st_ino


# -- pure parsing ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("header", "expected"),
    [
        ({"op": "deposit"}, ops.Deposit(None)),
        ({"op": "deposit", "ttl": 5}, ops.Deposit(5.0)),
        ({"op": "list"}, ops.ListParked()),
        ({"op": "claim", "all": True}, ops.Claim(ops.Selector(everything=True))),
        (
            {"op": "release", "names": ["web"]},
            ops.Release(ops.Selector(names=frozenset({"web"}))),
        ),
        (
            {"op": "claim", "match": [[2, 1, 6, "inet", "127.0.0.1", 80]]},
            ops.Claim(ops.Selector(keys=frozenset({(2, 1, 6, ("inet", "127.0.0.1", 80))}))),
        ),
    ],
)
def test_parse_request_accepts(header: dict[str, Any], expected: ops.Request) -> None:
    assert ops.parse_request(header) == expected


@pytest.mark.parametrize(
    ("header", "why"),
    [
        ({"op": "steal"}, "unknown op"),
        ({"op": "deposit", "ttl": -1}, "positive"),
        ({"op": "deposit", "ttl": True}, "not a number"),
        ({"op": "deposit", "ttl": 1e9}, "exceeds"),
        ({"op": "deposit", "ttl": float("nan")}, "positive"),
        ({"op": "claim"}, "say which"),
        ({"op": "release", "all": "yes"}, "true or false"),
        ({"op": "claim", "names": "web"}, "must be a list"),
        ({"op": "claim", "names": ["a:b"]}, "valid fd names"),
        ({"op": "claim", "ids": [-1]}, "non-negative"),
        ({"op": "claim", "match": [[2, 1]]}, "match key"),
        ({"op": "claim", "match": [[2, 1, 6, "inet", "x"]]}, "bad match key"),
    ],
)
def test_parse_request_rejects(header: dict[str, Any], why: str) -> None:
    with pytest.raises(ProtocolError, match=why):
        ops.parse_request(header)


@pytest.mark.parametrize(
    ("fields", "expected"),
    [
        ({"FDSTORE": "1", "FDNAME": "web"}, ops.FdStore("web", None)),
        ({"FDSTORE": "1"}, ops.FdStore("stored", None)),
        ({"FDSTORE": "1", "FDNAME": "web", "FDSTORETTL": "2.5"}, ops.FdStore("web", 2.5)),
        ({"FDSTOREREMOVE": "1", "FDNAME": "web"}, ops.FdStoreRemove("web")),
        ({"READY": "1"}, None),
    ],
)
def test_parse_fdstore(fields: dict[str, str], expected: object) -> None:
    assert ops.parse_fdstore(fields) == expected


@pytest.mark.parametrize(
    "fields",
    [
        {"FDSTOREREMOVE": "1"},
        {"FDSTORE": "1", "FDNAME": "a:b"},
        {"FDSTORE": "1", "FDSTORETTL": "soon"},
        {"FDSTORE": "1", "FDSTORETTL": "-3"},
    ],
)
def test_parse_fdstore_rejects(fields: dict[str, str]) -> None:
    with pytest.raises(ProtocolError):
        ops.parse_fdstore(fields)


def test_holder_path_rules() -> None:
    ops.check_holder_path("/run/h.sock", allow_abstract=False)
    ops.check_holder_path("@h", allow_abstract=True)
    for bad, abstract in (("@h", False), ("rel.sock", False), ("/" + "x" * 200, False)):
        with pytest.raises(ProtocolError):
            ops.check_holder_path(bad, allow_abstract=abstract)


_json = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda children: (
        st.lists(children, max_size=5) | st.dictionaries(st.text(max_size=8), children, max_size=5)
    ),
    max_leaves=20,
)


@settings(max_examples=300, deadline=None)
@given(
    st.dictionaries(
        st.sampled_from(["op", "ttl", "all", "names", "ids", "match", "v", "x"]),
        _json | st.sampled_from(["deposit", "claim", "list", "release"]),
        max_size=6,
    )
)
def test_fuzz_parse_request_only_raises_protocol_error(header: dict[str, Any]) -> None:
    with contextlib.suppress(ProtocolError):
        ops.parse_request(header)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=300))
def test_fuzz_wire_bytes(data: bytes) -> None:
    with contextlib.suppress(ProtocolError):
        ops.parse_request(decode(data))


# -- round trips ----------------------------------------------------------------------


def test_deposit_list_claim_release_round_trip(holder: RunningHolder) -> None:
    web, admin, extra = listener(), listener(), listener()
    inodes = {"web": inode(web), "admin": inode(admin), "extra": inode(extra)}
    result = client.deposit(holder.path, {"web": web, "admin": admin, "extra": extra}, ttl=60)
    assert len(result.ids) == 3
    assert result.ttl == 60
    web_key = client.list_parked(holder.path)[0].identity.key
    for sock in (web, admin, extra):
        sock.close()  # the holder's copies keep them open
    held = client.list_parked(holder.path)
    assert {h.name: h.inode for h in held} == inodes
    assert all(0 < h.expires_in <= 60 and h.depositor_pid == os.getpid() for h in held)

    claimed = client.claim(holder.path, names=["admin", "nothere"])
    assert [h.name for h in claimed.sockets] == ["admin"]
    assert inode(claimed.sockets[0].sock) == inodes["admin"]
    assert claimed.missing == ["nothere"]
    assert claimed.sockets[0].identity.listening
    claimed.close()

    by_identity = client.claim(holder.path, match=[web_key])
    assert [inode(h.sock) for h in by_identity.sockets] == [inodes["web"]]
    by_identity.close()

    assert [h.name for h in client.list_parked(holder.path)] == ["extra"]
    assert client.release(holder.path, names=["extra"]) == 1
    assert client.list_parked(holder.path) == []
    log = holder.log_text()
    assert "deposited 3" in log
    assert "claimed 1" in log
    assert "released 1" in log


def test_same_socket_deposited_twice_is_held_once(holder: RunningHolder) -> None:
    web = listener()
    try:
        first = client.deposit(holder.path, {"web": web}, ttl=5)
        second = client.deposit(holder.path, {"web2": web}, ttl=50)
        assert first.ids == second.ids
        (held,) = client.list_parked(holder.path)
        assert held.name == "web2"
        assert held.expires_in > 5
    finally:
        web.close()
    assert client.release(holder.path, everything=True) == 1


def test_claim_is_kept_until_the_claimant_acknowledges(holder: RunningHolder) -> None:
    web = listener()
    client.deposit(holder.path, {"web": web}, ttl=60)
    with connect(holder.path) as channel:
        channel.send({"op": "claim", "all": True})
        header, fds = channel.recv(max_fds=253)
        assert header["op"] == "fds"
        assert len(fds) == 1
        for fd in fds:
            os.close(fd)
        # No ok: we hang up. The holder must still hold the socket.
    wait_for(lambda: client.list_parked(holder.path), what="claim returned")
    assert [h.inode for h in client.list_parked(holder.path)] == [inode(web)]
    web.close()
    client.release(holder.path, everything=True)


# -- hostile input --------------------------------------------------------------------


def _raw_request(path: str, data: bytes, fds: list[int] | None = None) -> dict[str, Any]:
    with connect(path) as channel:
        send_with_fds(channel.sock, data, fds or [])
        header, _ = channel.recv()
        return header


def _fds_msg(entries: list[list[Any]], total: int, offset: int = 0) -> bytes:
    return encode({"op": "fds", "total": total, "offset": offset, "fds": entries})


def test_bad_input_never_loses_a_held_socket(holder: RunningHolder) -> None:
    keep = listener()
    client.deposit(holder.path, {"keep": keep}, ttl=60)
    kept_inode = inode(keep)
    keep.close()
    extra1, extra2 = listener(), listener()
    wire = [*HeldSocket.adopt(extra1, "x").identity.to_wire()]
    cases: list[tuple[bytes, list[int], str]] = [
        (b"{not json", [], "not valid JSON"),
        (encode({"op": "steal"}), [], "unknown op"),
        (b'{"v":2,"op":"list"}', [], "version"),
        (b"x" * 70000, [], "truncated"),
        (encode({"op": "list"}), [extra1.fileno()], "unexpected fds"),
    ]
    for data, fds, why in cases:
        reply = _raw_request(holder.path, data, fds)
        assert reply["op"] == "error", (why, reply)
        assert why in reply["message"], (why, reply)

    # More fds than the manifest lists; then more than the transfer announced.
    for entries, total, why in (
        ([["a", *wire]], 2, "manifest lists 1"),
        ([["a", *wire], ["b", *wire]], 1, "more fds than"),
        ([["a", *wire], ["b", *wire]], 100, "not between 0 and"),
        ([["a:b", *wire], ["b", *wire]], 2, "not a valid fd name"),
    ):
        with connect(holder.path) as channel:
            channel.send({"op": "deposit", "ttl": 5})
            fds = [extra1.fileno(), extra2.fileno()]
            send_with_fds(channel.sock, _fds_msg(entries, total), fds)
            header, _ = channel.recv()
            assert header["op"] == "error", (why, header)
            assert why in header["message"], (why, header)
    extra1.close()
    extra2.close()

    held = client.list_parked(holder.path)
    assert [(h.name, h.inode) for h in held] == [("keep", kept_inode)]
    client.release(holder.path, everything=True)


def test_peer_dying_mid_deposit(holder: RunningHolder, procs: Procs) -> None:
    keep = listener()
    client.deposit(holder.path, {"keep": keep}, ttl=60)
    keep.close()
    code = f"""
import os, socket
from nodrop.fdwire import connect, encode
from nodrop.kernel.fdpass import send_with_fds
from nodrop.listeners.held import HeldSocket
from nodrop.listeners.identity import identify
socks = [socket.socket() for _ in range(3)]
for s in socks:
    s.bind(("127.0.0.1", 0)); s.listen(1)
ch = connect({holder.path!r})
ch.send({{"op": "deposit", "ttl": 30}})
wire = identify(socks[0]).to_wire()
send_with_fds(ch.sock, encode({{"op": "fds", "total": 3, "offset": 0,
    "fds": [["a", *wire], ["b", *wire]]}}), [socks[0].fileno(), socks[1].fileno()])
print("sent", flush=True)
os._exit(0)
"""
    proc = procs.python(code, stdout=subprocess.PIPE)
    assert proc.stdout is not None
    assert proc.stdout.readline() == b"sent\n"
    assert proc.wait(10) == 0
    wait_for(lambda: "left mid-receiving" in holder.log_text(), what="holder noticed")
    assert [h.name for h in client.list_parked(holder.path)] == ["keep"]
    client.release(holder.path, everything=True)


def test_too_many_sockets_for_the_holder(holder: RunningHolder) -> None:
    socks = [listener() for _ in range(17)]  # the fixture's --max-held is 16
    try:
        with pytest.raises(HolderError, match="not between 0 and 16"):
            client.deposit(holder.path, [(f"s{i}", s) for i, s in enumerate(socks)])
    finally:
        for s in socks:
            s.close()
    assert client.list_parked(holder.path) == []


@pytest.fixture
def shared_dir() -> Iterator[Path]:
    """A directory another uid can traverse (tmp_path's parents are 0700)."""
    directory = Path(tempfile.mkdtemp(prefix="nodrop-holder-", dir="/tmp"))
    directory.chmod(0o755)
    yield directory
    shutil.rmtree(directory, ignore_errors=True)


_NOBODY_CLIENT = """
import array, json, socket, sys
s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
s.settimeout(10)
s.connect(sys.argv[1])
# A denied peer is told at once, before it asks for anything.
data, anc, flags, _ = s.recvmsg(65536, socket.CMSG_SPACE(253 * 4))
fds = sum(len(p) // 4 for _, _, p in anc)
try:
    s.send(b'{"v":1,"op":"claim","all":true}')
    more, anc, flags, _ = s.recvmsg(65536, socket.CMSG_SPACE(253 * 4))
    fds += sum(len(p) // 4 for _, _, p in anc)
except OSError:
    pass
print(json.dumps({"reply": json.loads(data), "fds": fds}))
"""


def test_peer_of_another_uid_is_denied(procs: Procs, shared_dir: Path) -> None:
    if shutil.which("setpriv") is None or not os.access("/usr/bin/python3", os.X_OK):
        pytest.skip("needs setpriv and /usr/bin/python3")
    if os.geteuid() != 0:
        pytest.skip("needs root to run a peer as nobody")
    holder = start_holder(procs, shared_dir, "--mode", "0666", path=str(shared_dir / "h.sock"))
    web = listener()
    client.deposit(holder.path, {"web": web}, ttl=60)
    proc = procs.popen(
        [
            "setpriv",
            "--reuid=nobody",
            "--regid=nogroup",
            "--clear-groups",
            "/usr/bin/python3",
            "-c",
            _NOBODY_CLIENT,
            holder.path,
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    out, err = proc.communicate(timeout=20)
    assert proc.returncode == 0, err
    report = json.loads(out)
    assert report["fds"] == 0
    assert report["reply"]["op"] == "error"
    assert "only uids [0]" in report["reply"]["message"]
    assert [h.inode for h in client.list_parked(holder.path)] == [inode(web)]
    web.close()
    assert "denied" in holder.log_text()
    client.release(holder.path, everything=True)


def test_abstract_path_refused_unless_allowed(procs: Procs, tmp_path: Path) -> None:
    proc = procs.popen(
        [sys.executable, "-m", "nodrop", "hold", "--path", f"@nodrop-test-{os.getpid()}"],
        stderr=subprocess.PIPE,
    )
    _, err = proc.communicate(timeout=20)
    assert proc.returncode == 2
    assert b"--allow-abstract" in err


# -- systemd fd store -------------------------------------------------------------------


def test_fdstore_round_trip_with_nodrop_notify(holder: RunningHolder) -> None:
    web = listener()
    env = {"NOTIFY_SOCKET": holder.fdstore}
    assert notify(
        {"FDSTORE": "1", "FDNAME": "web", "FDSTORETTL": "60"}, fds=[web.fileno()], environ=env
    )
    wait_for(lambda: client.list_parked(holder.path), what="fd stored")
    (held,) = client.list_parked(holder.path)
    assert (held.name, held.inode, held.via) == ("web", inode(web), "fdstore")
    assert 55 < held.expires_in <= 60
    notify({"FDSTOREREMOVE": "1", "FDNAME": "web"}, environ=env)
    wait_for(lambda: not client.list_parked(holder.path), what="fd removed")
    assert notify({"FDSTORE": "1", "FDNAME": "web"}, fds=[web.fileno()], environ=env)
    wait_for(lambda: client.list_parked(holder.path), what="fd stored again")
    claimed = client.claim(holder.path, names=["web"])
    assert [inode(h.sock) for h in claimed.sockets] == [inode(web)]
    claimed.close()
    web.close()


def test_fdstore_with_systemd_notify(holder: RunningHolder, procs: Procs) -> None:
    tool = shutil.which("systemd-notify")
    if tool is None:
        pytest.skip("systemd-notify is not installed")
    helptext = subprocess.run([tool, "--help"], capture_output=True, text=True, timeout=10).stdout
    if "--fd" not in helptext:
        version = subprocess.run([tool, "--version"], capture_output=True, text=True, timeout=10)
        pytest.skip(
            f"{version.stdout.splitlines()[0]}: systemd-notify has no --fd (added in systemd 254)"
        )
    web = listener()
    os.set_inheritable(web.fileno(), True)
    proc = procs.popen(
        [tool, f"--fd={web.fileno()}", "--fdname=web", "--no-block", "FDSTORE=1"],
        env=dict(os.environ, NOTIFY_SOCKET=holder.fdstore),
        pass_fds=[web.fileno()],
    )
    assert proc.wait(10) == 0
    wait_for(lambda: client.list_parked(holder.path), what="fd stored")
    assert [h.inode for h in client.list_parked(holder.path)] == [inode(web)]
    web.close()
    client.release(holder.path, everything=True)


# -- nodrop exec and on-demand holders ----------------------------------------------------


def test_exec_claims_matching_and_binds_the_rest(holder: RunningHolder, procs: Procs) -> None:
    web, other = listener(), listener()
    port = web.getsockname()[1]
    client.deposit(holder.path, {"web": web, "other": other}, ttl=60)
    other_inode = inode(other)
    web.close()
    other.close()
    proc = procs.popen(
        [
            sys.executable,
            "-m",
            "nodrop",
            "exec",
            "--from-holder",
            holder.path,
            "--listen",
            f"tcp://127.0.0.1:{port}?name=web",
            "--listen",
            "tcp://127.0.0.1:0?name=fresh",
            "--",
            sys.executable,
            str(CHILDREN / "activation_child.py"),
        ],
        stdout=subprocess.PIPE,
    )
    out, _ = proc.communicate(timeout=30)
    assert proc.returncode == 0
    report = json.loads(out)
    assert report["pid"] == proc.pid  # exec: the same process became the server
    assert report["before"]["LISTEN_PID"] == str(proc.pid)
    assert report["fds"] == [3, 4]
    assert report["names"] == ["web", "fresh"]
    assert report["identities"][0] == f"tcp 127.0.0.1:{port} (listening)"
    # The one nobody wanted stays in the holder until its TTL.
    assert [(h.name, h.inode) for h in client.list_parked(holder.path)] == [("other", other_inode)]
    client.release(holder.path, everything=True)


def test_exec_by_names(holder: RunningHolder, procs: Procs) -> None:
    web = listener()
    client.deposit(holder.path, {"web": web}, ttl=60)
    web.close()
    proc = procs.popen(
        [
            sys.executable,
            "-m",
            "nodrop",
            "exec",
            "--from-holder",
            holder.path,
            "--names",
            "web",
            "--",
            sys.executable,
            str(CHILDREN / "activation_child.py"),
        ],
        stdout=subprocess.PIPE,
    )
    out, _ = proc.communicate(timeout=30)
    report = json.loads(out)
    assert report["names"] == ["web"]
    assert report["pid"] == proc.pid
    assert client.list_parked(holder.path) == []


def test_deposit_spawns_a_holder_on_demand(procs: Procs, tmp_path: Path) -> None:
    path = str(tmp_path / "od" / "holder.sock")
    web = listener()
    result = client.deposit(
        path, {"web": web}, ttl=60, spawn=True, log_path=str(tmp_path / "od.log")
    )
    assert result.spawned_pid
    procs.adopt(result.spawned_pid)
    assert (tmp_path / "od").stat().st_mode & 0o777 == 0o700
    assert os.stat(path).st_mode & 0o777 == 0o600
    claimed = client.claim(path)
    assert [inode(h.sock) for h in claimed.sockets] == [inode(web)]
    claimed.close()
    web.close()
    # Empty now: an on-demand holder exits and removes its socket.
    wait_for(lambda: not os.path.exists(path), what="on-demand holder exit")
    assert "nothing held; exiting" in (tmp_path / "od.log").read_text()
