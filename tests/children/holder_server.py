"""A tiny server whose listeners go through a holder.

usage: holder_server.py HOLDER SPEC [TTL]

Takes its listener with Upgrader(listen=[SPEC], holder=HOLDER) (claimed from
the holder, or bound), serves "ping\\n" -> "<pid>\\n", prints one JSON line
{"event": "ready", ...} with the socket's inode, and on a line "park" on
stdin parks the listener in the holder for TTL seconds, stops accepting and
exits (printing {"event": "parked"}).
"""

import json
import os
import selectors
import sys

from pid_reply import answer_one

from nodrop.upgrader import Upgrader

holder, spec = sys.argv[1], sys.argv[2]
ttl = float(sys.argv[3]) if len(sys.argv) > 3 else 30.0
up = Upgrader(listen=[spec], holder=holder)
(listener,) = up.listeners().values()
listener.listen(4096)  # room for every client waiting in the gap
listener.setblocking(False)
up.ready()
print(
    json.dumps(
        {
            "event": "ready",
            "pid": os.getpid(),
            "port": listener.getsockname()[1],
            "inode": os.fstat(listener.fileno()).st_ino,
        }
    ),
    flush=True,
)
sel = selectors.DefaultSelector()
sel.register(listener, selectors.EVENT_READ, "accept")
sel.register(sys.stdin.fileno(), selectors.EVENT_READ, "stdin")
while True:
    for key, _ in sel.select(30):
        if key.data == "accept":
            answer_one(listener)
        else:
            line = sys.stdin.readline().strip()
            if line == "park" or not line:
                result = up.park(ttl=ttl)
                print(json.dumps({"event": "parked", "ids": result.ids}), flush=True)
                sel.close()
                up.close()
                sys.exit(0)
