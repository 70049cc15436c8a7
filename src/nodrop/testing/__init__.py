"""Test doubles and helpers shipped with nodrop.

* :mod:`nodrop.testing.processes`: :class:`FakeProcesses`, a fake of the
  supervisor's OS seam whose exits and signals the test controls.
* :mod:`nodrop.testing.clock`: :class:`VirtualTimeLoop`, an asyncio loop on
  virtual time (timeouts pass in microseconds), and :class:`FakeClock` for
  synchronous code with a ``clock=`` seam (the holder).
* :mod:`nodrop.testing.waiting`: :func:`wait_for`, the one poll helper.
* :mod:`nodrop.testing.netns`: private network namespaces for kernel tests
  (imported on its own: ``from nodrop.testing import netns``).
"""

from nodrop.testing.clock import FakeClock, VirtualTimeLoop
from nodrop.testing.processes import FakeProcess, FakeProcesses, exit_on
from nodrop.testing.waiting import wait_for

__all__ = [
    "FakeClock",
    "FakeProcess",
    "FakeProcesses",
    "VirtualTimeLoop",
    "exit_on",
    "wait_for",
]
