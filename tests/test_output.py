"""Workers' tagged output: nothing a worker wrote is lost when its pipe closes."""

from __future__ import annotations

import asyncio
import contextlib
import io
import os
from collections.abc import Iterator

import pytest

from nodrop.supervisor.logsink import STALLED, LogSink, gap_line
from nodrop.supervisor.output import TaggedStream


@pytest.fixture
def loop() -> Iterator[asyncio.AbstractEventLoop]:
    loop = asyncio.new_event_loop()
    yield loop
    loop.close()


def test_close_passes_on_what_is_still_in_the_pipe(loop: asyncio.AbstractEventLoop) -> None:
    r, w = os.pipe2(os.O_CLOEXEC)
    sink = io.BytesIO()
    lines: list[str] = []
    stream = TaggedStream(loop, r, "[g2.w1]", sink, lines.append)
    # The worker writes its last words and exits before the loop ever reads them.
    os.write(w, b"starting\n" + b"x" * 30000 + b"\nrollback reason: bad config\nno newline")
    os.close(w)
    stream.close()
    out = sink.getvalue().splitlines()
    assert out[0] == b"[g2.w1] starting"
    assert out[-2:] == [b"[g2.w1] rollback reason: bad config", b"[g2.w1] no newline"]
    assert lines[-2:] == ["rollback reason: bad config", "no newline"]
    assert stream.fileno() == -1


def test_close_does_not_wait_for_a_writer_that_keeps_the_pipe_open(
    loop: asyncio.AbstractEventLoop,
) -> None:
    r, w = os.pipe2(os.O_CLOEXEC)
    sink = io.BytesIO()
    stream = TaggedStream(loop, r, "[g1.w1]", sink)
    os.write(w, b"last line\n")
    stream.close()  # a grandchild still holds ``w``: EAGAIN ends the read
    os.close(w)
    assert sink.getvalue() == b"[g1.w1] last line\n"


def test_a_full_disk_drops_lines_and_never_raises() -> None:
    with open("/dev/full", "wb") as full:
        sink = LogSink(full)
        assert not sink.write(b"one\ntwo\n", 2)
        assert not sink.write(b"three\n")
    assert (sink.lost, sink.lost_total) == (3, 3)
    assert sink.error == "No space left on device"


def test_output_that_works_again_says_first_how_many_lines_were_lost() -> None:
    r, w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
    with open(r, "rb", buffering=0) as reader, open(w, "wb", buffering=0) as writer:
        sink = LogSink(writer)
        with contextlib.suppress(BlockingIOError):
            while True:  # a pipe whose reader stalled: full
                os.write(w, b"x" * 65536)
        assert not sink.write(b"a\nb\n", 2)
        while reader.read(1 << 20):
            pass
        assert sink.write(b"c\n")
        # The sink saw that the pipe took nothing more before writing.
        expected = gap_line(2, STALLED, os.getpid()) + b"c\n"
        assert reader.read(1 << 20) == expected
    assert (sink.lost, sink.lost_total) == (0, 2)


def test_a_worker_line_the_sink_drops_is_still_kept_for_the_rollback_message(
    loop: asyncio.AbstractEventLoop,
) -> None:
    r, w = os.pipe2(os.O_CLOEXEC)
    lines: list[str] = []
    with open("/dev/full", "wb") as full:
        stream = TaggedStream(loop, r, "[g2.w1]", full, lines.append)
        os.write(w, b"rollback reason: bad config\n")
        os.close(w)
        stream.close()
    assert lines == ["rollback reason: bad config"]


def test_a_blocking_pipe_whose_reader_stalled_drops_lines_instead_of_blocking() -> None:
    """The supervisor's own stdout is a blocking pipe (a log collector that
    stopped reading): the write must not wait for room, or the supervisor's
    loop stops with it."""
    r, w = os.pipe2(os.O_CLOEXEC)  # blocking, as stdout usually is
    with open(r, "rb", buffering=0) as reader, open(w, "wb", buffering=0) as writer:
        os.set_blocking(w, False)
        with contextlib.suppress(BlockingIOError):
            while True:  # fill it without blocking ourselves
                os.write(w, b"x" * 65536)
        os.set_blocking(w, True)
        sink = LogSink(writer)
        assert not sink.write(b"one line\n")  # returns at once: dropped
        assert (sink.lost, sink.error) == (1, STALLED)
        os.set_blocking(r, False)
        with contextlib.suppress(BlockingIOError):
            while reader.read(1 << 20):
                pass
        assert sink.write(b"next\n")
        assert reader.read(1 << 20) == gap_line(1, STALLED, os.getpid()) + b"next\n"
