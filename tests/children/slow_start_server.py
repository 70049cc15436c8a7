"""A server whose start-up is slow, for `nodrop exec --from-holder`.

usage: slow_start_server.py SECONDS

Takes its one listener from LISTEN_FDS, prints {"event": "started", ...} at
once (it holds the socket from here), stays busy SECONDS without accepting
(slow imports, cache warming), prints {"event": "ready", ...} with the
socket's inode, then serves "ping\\n" -> "<pid>\\n" until stdin closes.
"""

import json
import os
import selectors
import sys
import time

from pid_reply import answer_one

import nodrop

start_up = float(sys.argv[1])
(activated,) = nodrop.listen_fds()
listener = activated.socket
info = {"pid": os.getpid(), "inode": os.fstat(listener.fileno()).st_ino}
print(json.dumps({"event": "started", **info}), flush=True)
time.sleep(start_up)  # the slow start-up under test
print(json.dumps({"event": "ready", **info}), flush=True)
listener.setblocking(False)
sel = selectors.DefaultSelector()
sel.register(listener, selectors.EVENT_READ, "accept")
sel.register(sys.stdin.fileno(), selectors.EVENT_READ, "stdin")
while True:
    for key, _ in sel.select(30):
        if key.data == "stdin":
            sys.exit(0)
        answer_one(listener)
