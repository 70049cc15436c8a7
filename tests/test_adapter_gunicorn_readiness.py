"""The gunicorn config module's readiness: READY=1 once every worker started.

The board is shared memory made before fork; real forked children mark
themselves here, as gunicorn's workers do.
"""

from __future__ import annotations

import os

import pytest

from nodrop.adapters.gunicorn import worker_kind
from nodrop.adapters.worker_readiness import ReadyBoard


def test_ready_once_every_worker_marked_itself_and_only_once() -> None:
    board = ReadyBoard(slots=8)
    assert not board.mark_ready(101, workers=3)
    assert not board.mark_ready(101, workers=3)  # the same worker twice counts once
    assert not board.mark_ready(102, workers=3)
    assert board.mark_ready(103, workers=3)
    assert not board.mark_ready(104, workers=3)  # announced already


def test_a_worker_that_exited_is_not_counted() -> None:
    board = ReadyBoard(slots=8)
    assert not board.mark_ready(101, workers=2)
    board.discard(101)  # died before its sibling started
    assert not board.mark_ready(102, workers=2)
    assert board.ready_count() == 1
    assert board.mark_ready(103, workers=2)


def test_forked_workers_share_the_board() -> None:
    board = ReadyBoard(slots=8)
    pids = []
    for _ in range(3):
        pid = os.fork()
        if pid == 0:  # the child: mark itself, report whether it completed the set
            os._exit(10 if board.mark_ready(os.getpid(), workers=3) else 11)
        pids.append(pid)
    codes = sorted(os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) for pid in pids)
    assert codes == [10, 11, 11]
    assert board.ready_count() == 3


class UvicornWorker:
    pass


UvicornWorker.__module__ = "uvicorn_worker._workers"


class MyUvicornWorker(UvicornWorker):
    pass


@pytest.mark.parametrize(
    ("cls", "kind"),
    [(UvicornWorker, "uvicorn"), (MyUvicornWorker, "uvicorn"), (object, "wsgi")],
)
def test_the_worker_kind_comes_from_its_class_or_a_base(cls: type, kind: str) -> None:
    assert worker_kind(cls()) == kind


def test_gunicorns_own_asgi_worker_is_recognised() -> None:
    gasgi = pytest.importorskip("gunicorn.workers.gasgi")
    worker = gasgi.ASGIWorker.__new__(gasgi.ASGIWorker)
    assert worker_kind(worker) == "asgi"
