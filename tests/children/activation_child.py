"""A server that takes its sockets with nodrop.listen_fds() and reports them.

Prints one JSON line: what it saw. Then, for each stream listener, accepts one
connection and writes the socket's name to it.
"""

import fcntl
import json
import os
import sys

import nodrop

before = {k: os.environ.get(k) for k in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES")}
socks = nodrop.listen_fds()
report = {
    "pid": os.getpid(),
    "before": before,
    "after": {k: os.environ.get(k) for k in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES")},
    "fds": [s.fd for s in socks],
    "names": [s.name for s in socks],
    "cloexec": [bool(fcntl.fcntl(s.fd, fcntl.F_GETFD) & fcntl.FD_CLOEXEC) for s in socks],
    "identities": [str(nodrop.identify(s.socket)) for s in socks],
    "open_fds": sorted(int(x) for x in os.listdir("/proc/self/fd")),
}
print(json.dumps(report), flush=True)
if "--serve" in sys.argv:
    for item in socks:
        if item.socket.type == 1:  # SOCK_STREAM
            conn, _ = item.socket.accept()
            conn.sendall(item.name.encode())
            conn.close()
for item in socks:
    item.socket.close()
