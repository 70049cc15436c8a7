"""A worker for the PID-1 tests: serves HTTP, leaves an orphan, logs its drain.

Systemd conventions only (LISTEN_FDS, READY=1). At start it double-forks a
process that outlives its parent (re-parented to PID 1: the supervisor),
sleeps ``--orphan-life`` seconds, writes ``orphan-<gen>`` into ``--dir`` and
exits -- a zombie unless PID 1 reaps it. On SIGTERM it writes
``drained-<gen>`` into ``--dir`` and exits 0.
"""

import argparse
import os
import signal
import socket
import sys
import time
from pathlib import Path

parser = argparse.ArgumentParser()
parser.add_argument("--dir", required=True)
parser.add_argument("--orphan-life", type=float, default=0.2)
args = parser.parse_args()
out = Path(args.dir)
gen = os.environ.get("NODROP_GENERATION", "?")


def report(name: str, text: str) -> None:
    """Write ``name`` whole or not at all: the test reads it once it exists."""
    (out / f".{name}").write_text(text)
    os.replace(out / f".{name}", out / name)


middle = os.fork()
if middle == 0:
    if os.fork() == 0:
        time.sleep(args.orphan_life)
        report(f"orphan-{gen}", str(os.getppid()))
        os._exit(0)
    os._exit(0)  # the orphan is now PID 1's
os.waitpid(middle, 0)

if os.environ.get("LISTEN_PID") != str(os.getpid()):
    sys.exit("LISTEN_PID is not mine")
listener = socket.socket(fileno=3)
stop = False


def on_term(signum: int, frame: object) -> None:
    global stop
    stop = True


signal.signal(signal.SIGTERM, on_term)
with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as notify:
    notify.connect(os.environ["NOTIFY_SOCKET"])
    notify.send(b"READY=1")
listener.settimeout(0.05)
body = f"gen={gen}".encode()
while not stop:
    try:
        conn, _ = listener.accept()
    except (TimeoutError, InterruptedError):
        continue
    with conn:
        conn.settimeout(5)
        conn.recv(4096)
        conn.sendall(
            b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\nConnection: close\r\n\r\n" % len(body) + body
        )
report(f"drained-{gen}", "SIGTERM")
sys.exit(0)
