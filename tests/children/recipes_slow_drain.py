"""A server that takes its time to stop accepting after the drain signal.

It speaks systemd's conventions only (LISTEN_FDS, READY=1 and STOPPING=1 on
NOTIFY_SOCKET). Each response body is ``gen=<NODROP_GENERATION>``. On SIGTERM
it goes on accepting for --linger seconds, then stops in the way --how says:

  stopping  stop calling accept(), keep the socket open, send STOPPING=1
  close     close the listening sockets (no notification)
  exit      exit at once
  never     never stop accepting (only SIGKILL ends it)

and exits --exit-after seconds later. Without a supervisor that waits for the
old generation to stop accepting, connections made right after a reload
reach this old one.
"""

import argparse
import os
import selectors
import signal
import socket
import sys
import time

parser = argparse.ArgumentParser()
parser.add_argument("--how", choices=["stopping", "close", "exit", "never"], required=True)
parser.add_argument("--linger", type=float, default=0.4)
parser.add_argument("--exit-after", type=float, default=1.0)
args = parser.parse_args()

if os.environ.get("LISTEN_PID") != str(os.getpid()):
    sys.exit("LISTEN_PID is not mine")
listeners = [socket.socket(fileno=3 + i) for i in range(int(os.environ["LISTEN_FDS"]))]
body = f"gen={os.environ.get('NODROP_GENERATION', '?')}".encode()
response = b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\nConnection: close\r\n\r\n%s" % (
    len(body),
    body,
)


def notify(message: bytes) -> None:
    path = os.environ.get("NOTIFY_SOCKET")
    if path:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
            s.connect("\0" + path[1:] if path.startswith("@") else path)
            s.send(message)


def serve(conn: socket.socket) -> None:
    try:
        conn.settimeout(5)
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = conn.recv(4096)
            if not chunk:
                break
            data += chunk
        conn.sendall(response)
    except OSError:
        pass
    finally:
        conn.close()


stop_r, stop_w = os.pipe()
os.set_blocking(stop_w, False)
signal.set_wakeup_fd(stop_w)
signal.signal(signal.SIGTERM, lambda *_: None)
sel = selectors.DefaultSelector()
for lst in listeners:
    lst.setblocking(False)
    sel.register(lst, selectors.EVENT_READ)
sel.register(stop_r, selectors.EVENT_READ)
notify(b"READY=1")

stop_at: float | None = None
exit_at: float | None = None
accepting = True
while True:
    now = time.monotonic()
    if stop_at is not None and accepting and now >= stop_at and args.how != "never":
        accepting = False
        exit_at = now + args.exit_after
        for lst in listeners:
            sel.unregister(lst)
        if args.how == "stopping":
            notify(b"STOPPING=1")
        elif args.how == "close":
            for lst in listeners:
                lst.close()
        else:
            sys.exit(0)
    if exit_at is not None and now >= exit_at:
        sys.exit(0)
    deadlines = [t for t in (stop_at if accepting else None, exit_at) if t is not None]
    timeout = max(0.0, min(deadlines) - now) if deadlines else None
    for key, _ in sel.select(timeout):
        if key.fileobj == stop_r:
            os.read(stop_r, 64)
            if stop_at is None:
                stop_at = time.monotonic() + args.linger
            continue
        try:
            conn, _ = key.fileobj.accept()  # type: ignore[union-attr]
        except BlockingIOError:
            continue
        serve(conn)
