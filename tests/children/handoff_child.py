"""The receiving side of a handoff, in its own process.

usage: handoff_child.py PATH [SOFT_LIMIT HARD_LIMIT]

Connects to PATH, takes one transfer, prints one JSON line (count, inodes,
names, identities, meta, or the error), and exits.
"""

import json
import os
import resource
import sys

from nodrop.errors import NodropError
from nodrop.fdwire import connect

path = sys.argv[1]
if len(sys.argv) > 3:
    resource.setrlimit(resource.RLIMIT_NOFILE, (int(sys.argv[2]), int(sys.argv[3])))
channel = connect(path, timeout=60)
try:
    transfer = channel.take()
except NodropError as exc:
    print(json.dumps({"error": str(exc), "type": type(exc).__name__}), flush=True)
    sys.exit(3)
report = {
    "count": len(transfer.sockets),
    "inodes": sorted(os.fstat(s.fd).st_ino for s in transfer.sockets),
    "names": [s.name for s in transfer.sockets[:5]],
    "identities": [str(s.identity) for s in transfer.sockets[:5]],
    "meta": transfer.meta,
}
transfer.close()
channel.close()
print(json.dumps(report), flush=True)
