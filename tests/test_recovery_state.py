"""The recovery state's pure parts: what is recorded, what is refused."""

from __future__ import annotations

import json
import os
import socket

import pytest

from nodrop.kernel.pidfd import open_process, start_time
from nodrop.listeners.held import HeldSocket
from nodrop.listeners.spec import parse_spec
from nodrop.supervisor.config import RunConfig
from nodrop.supervisor.model import Generation, Worker, WorkerState
from nodrop.supervisor.recovery import build_state, parse_state


def test_build_state_lists_live_workers_with_their_listeners_and_pipes() -> None:
    with socket.socket() as sock:
        held = HeldSocket.adopt(sock, "web", parse_spec("tcp://127.0.0.1:0"))
        gen = Generation(3, RunConfig(command=("x",)), [held])
        live = Worker(3, 1, 100, WorkerState.READY, output_fds=(4, 5))
        gone = Worker(3, 2, 101, WorkerState.EXITED)
        gen.workers = [live, gone]
        carried = [
            {"pid": 7, "started": 1, "generation": 2, "index": 1, "state": "ready",
             "listeners": [9], "output": []}
        ]  # fmt: skip
        state = build_state((50, 60), 4, [gen], {id(held): 9}, {100: 1234}, carried)  # type: ignore[arg-type]
    assert state["supervisor"] == 50
    assert state["supervisor_started"] == 60
    assert state["next_number"] == 4
    assert state["workers"][0]["pid"] == 7  # the predecessor's, still listed
    assert state["workers"][1] == {
        "pid": 100, "started": 1234, "generation": 3, "index": 1, "state": "ready",
        "listeners": [9], "output": [4, 5],
    }  # fmt: skip
    assert len(state["workers"]) == 2
    assert parse_state(json.dumps(state).encode()) == state


@pytest.mark.parametrize(
    "data",
    [
        b"not json",
        b"[]",
        b'{"version": 99}',
        b'{"version": 1, "supervisor": "1", "supervisor_started": 1, "next_number": 1, '
        b'"listeners": [], "workers": []}',
        b'{"version": 1, "supervisor": 1, "supervisor_started": 1, "next_number": 1, '
        b'"listeners": [], "workers": [{"pid": "x"}]}',
        b'{"version": 1, "supervisor": 1, "supervisor_started": 1, "next_number": 1, '
        b'"listeners": [], "workers": [{"pid": 1, "started": 1, "generation": 1, "index": 1, '
        b'"listeners": ["3"]}]}',
    ],
)
def test_parse_state_refuses_what_it_cannot_trust(data: bytes) -> None:
    with pytest.raises(ValueError, match=r"(?i)expecting|recovery state|known version"):
        parse_state(data)


def test_a_pid_with_another_start_time_is_not_the_recorded_process() -> None:
    me = start_time(os.getpid())
    assert me is not None
    pidfd = open_process(os.getpid(), me)
    assert pidfd is not None
    os.close(pidfd)
    assert open_process(os.getpid(), me + 1) is None
