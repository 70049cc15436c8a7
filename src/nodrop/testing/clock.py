"""Virtual time: timeouts, backoffs and deadlines that pass in microseconds.

Two doubles for the ``clock`` seams of nodrop:

* :class:`VirtualTimeLoop`, an asyncio event loop whose :meth:`~VirtualTimeLoop.time`
  is virtual. Whenever nothing is ready to run and only timers wait, it
  jumps straight to the next timer, so ``asyncio.sleep(30)``, a 30 s drain
  timeout or a 10 s restart backoff passes at once, in order, and the same
  way on every run. Give the supervisor its clock:
  ``Supervisor(..., processes=fake, clock=loop.time)``.
* :class:`FakeClock`, a plain callable for synchronous code that takes a
  ``clock=`` (the holder): it moves only when the test calls
  :meth:`~FakeClock.advance`.

Real I/O still works on the virtual loop (sockets, pipes, signals): the
loop looks for ready I/O before every jump. What it cannot see is work
that finishes *later* outside the loop -- another process, or a thread of
``run_in_executor`` -- since time jumps before that work is done. Such a
test passes ``autojump_threshold``: the loop then jumps only after it was
idle that many real seconds (trio's ``MockClock`` has the same knob).
"""

from __future__ import annotations

import asyncio
import selectors
from collections.abc import Callable, Coroutine, Mapping
from typing import TYPE_CHECKING, Any, TypeVar

if TYPE_CHECKING:
    from _typeshed import FileDescriptorLike

__all__ = ["DEFAULT_START", "FakeClock", "VirtualTimeLoop", "run"]

T = TypeVar("T")

DEFAULT_START = 1000.0
"""Where virtual clocks start: not 0, so that a time of 0 never passes for
"not set" in the code under test."""


class FakeClock:
    """Monotonic seconds that move only when :meth:`advance` is called.

    Args:
        start: the first reading.
    """

    def __init__(self, start: float = DEFAULT_START) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> float:
        """Move the clock forward; returns the new reading.

        Raises:
            ValueError: ``seconds`` is negative (a monotonic clock never goes back).
        """
        if seconds < 0:
            raise ValueError(f"a monotonic clock cannot go back ({seconds}s)")
        self.now += seconds
        return self.now


class _JumpingSelector(selectors.BaseSelector):
    """The loop's selector: real I/O first; when none is ready, virtual time
    jumps over the wait instead of sleeping through it."""

    def __init__(self, jump: Callable[[float], None], threshold: float) -> None:
        self._real = selectors.DefaultSelector()
        self._jump = jump
        self._threshold = threshold

    def register(
        self, fileobj: FileDescriptorLike, events: int, data: Any = None
    ) -> selectors.SelectorKey:
        return self._real.register(fileobj, events, data)

    def unregister(self, fileobj: FileDescriptorLike) -> selectors.SelectorKey:
        return self._real.unregister(fileobj)

    def modify(
        self, fileobj: FileDescriptorLike, events: int, data: Any = None
    ) -> selectors.SelectorKey:
        return self._real.modify(fileobj, events, data)

    def select(self, timeout: float | None = None) -> list[tuple[selectors.SelectorKey, int]]:
        if timeout is None:
            # No timer at all: only I/O (or a signal) can wake the loop, as on a real one.
            return self._real.select(None)
        if timeout <= 0:
            return self._real.select(0)
        ready = self._real.select(min(timeout, self._threshold))
        if not ready:
            self._jump(timeout)
        return ready

    def close(self) -> None:
        self._real.close()

    def get_map(self) -> Mapping[FileDescriptorLike, selectors.SelectorKey]:
        return self._real.get_map()


class VirtualTimeLoop(asyncio.SelectorEventLoop):
    """An asyncio event loop on virtual time (see the module docstring).

    Args:
        start: the virtual time the loop starts at.
        autojump_threshold: real seconds the loop must have been idle before
            time jumps (0: jump as soon as nothing is ready).
    """

    def __init__(self, start: float = DEFAULT_START, *, autojump_threshold: float = 0.0) -> None:
        self._virtual_now = start
        self.jumped = 0.0
        """Virtual seconds skipped over so far (jumps and :meth:`advance`)."""
        super().__init__(_JumpingSelector(self.advance, max(autojump_threshold, 0.0)))
        if autojump_threshold < 0:
            self.close()  # a half-made loop would complain when collected
            raise ValueError("autojump_threshold must not be negative")

    def time(self) -> float:
        return self._virtual_now

    def advance(self, seconds: float) -> None:
        """Move virtual time forward; timers now due run on the next iteration.

        Raises:
            ValueError: ``seconds`` is negative.
        """
        if seconds < 0:
            raise ValueError(f"virtual time cannot go back ({seconds}s)")
        self._virtual_now += seconds
        self.jumped += seconds


def run(
    main: Coroutine[Any, Any, T],
    *,
    start: float = DEFAULT_START,
    autojump_threshold: float = 0.0,
    debug: bool | None = None,
) -> T:
    """Like :func:`asyncio.run`, on a :class:`VirtualTimeLoop`."""
    with asyncio.Runner(
        debug=debug,
        loop_factory=lambda: VirtualTimeLoop(start, autojump_threshold=autojump_threshold),
    ) as runner:
        return runner.run(main)
