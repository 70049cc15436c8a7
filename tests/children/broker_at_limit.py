"""A connection broker at its fd limit, in its own process.

usage: broker_at_limit.py PATH

Starts a ConnectionBroker at PATH whose every peer is a ready worker of the
active generation, lowers RLIMIT_NOFILE (soft and hard) to two fds more than
are open -- room to accept a giver, and for one of its connections -- and
prints ``limit N``. Each line the broker logs is printed as ``log: LINE``.
Exits when stdin closes.
"""

from __future__ import annotations

import asyncio
import os
import resource
import sys
from types import SimpleNamespace
from typing import Any

from nodrop.connhandoff.broker import ConnectionBroker
from nodrop.supervisor.model import GenState, WorkerState


class Host:
    active: Any = SimpleNamespace(number=2, state=GenState.ACTIVE)

    def worker_of(self, pid: int) -> Any:
        return SimpleNamespace(pid=pid, state=WorkerState.READY), self.active

    def log(self, message: str) -> None:
        print(f"log: {message}", flush=True)


async def main() -> None:
    broker = ConnectionBroker(sys.argv[1])
    await broker.start(Host())
    loop = asyncio.get_running_loop()
    done: asyncio.Future[None] = loop.create_future()

    def stdin_closed() -> None:
        if not done.done():
            done.set_result(None)

    loop.add_reader(0, stdin_closed)
    used = len(os.listdir("/proc/self/fd")) - 1  # not the listdir's own
    resource.setrlimit(resource.RLIMIT_NOFILE, (used + 2, used + 2))
    print(f"limit {used + 2}", flush=True)
    try:
        await done
    finally:
        loop.remove_reader(0)
        broker.close()


asyncio.run(main())
