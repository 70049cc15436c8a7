"""Workers' tagged output: nothing a worker wrote is lost when its pipe closes."""

from __future__ import annotations

import asyncio
import io
import os
from collections.abc import Iterator

import pytest

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
