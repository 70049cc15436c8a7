"""A tiny threaded server that upgrades itself on SIGHUP with nodrop.Upgrader.

usage: upgrader_server.py SPEC

Every generation prints JSON lines on stdout (shared by all generations):
{"event": "ready", "pid", "generation", "port"} once serving, and after a
SIGHUP {"event": "upgrade", "pid", "ok", "new_pid", "reason"}. On success it
stops accepting, finishes the connection in hand and exits. If the file
named by UPGRADER_FAIL_FILE exists at start, it exits with status 3 at once
(a broken new version).
"""

import json
import os
import selectors
import sys

fail_file = os.environ.get("UPGRADER_FAIL_FILE")
if fail_file and os.path.exists(fail_file):
    sys.exit(3)

from pid_reply import answer_one  # noqa: E402

from nodrop.upgrader import Upgrader  # noqa: E402

up = Upgrader(listen=[sys.argv[1]])
(listener,) = up.listeners().values()
listener.listen(4096)
listener.setblocking(False)
wake_r, wake_w = os.pipe()


def emit(**fields: object) -> None:
    os.write(1, (json.dumps(fields) + "\n").encode())


def on_result(result: object) -> None:
    emit(
        event="upgrade",
        pid=os.getpid(),
        ok=result.ok,  # type: ignore[attr-defined]
        new_pid=result.pid,  # type: ignore[attr-defined]
        reason=result.reason,  # type: ignore[attr-defined]
    )
    if result.ok:  # type: ignore[attr-defined]
        os.write(wake_w, b"x")


up.install_sighup(on_result, timeout=20)
up.ready()
emit(event="ready", pid=os.getpid(), generation=up.generation, port=listener.getsockname()[1])
sel = selectors.DefaultSelector()
sel.register(listener, selectors.EVENT_READ, "accept")
sel.register(wake_r, selectors.EVENT_READ, "wake")
while True:
    events = sel.select(30)
    if any(key.data == "wake" for key, _ in events):
        break
    for _key, _ in events:
        answer_one(listener)
sel.close()
up.close()  # our copies only: the new generation accepts on the same sockets
sys.exit(0)
