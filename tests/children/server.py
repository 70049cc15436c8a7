"""A small HTTP server that follows systemd's conventions, and nothing else.

It knows no nodrop API: it takes its listeners from LISTEN_FDS (checking
LISTEN_PID), says READY=1 on NOTIFY_SOCKET with a raw datagram, and on
SIGTERM stops accepting, finishes what it has, and exits. Any server that
does this works under `nodrop run`.

Each response body is "gen=<NODROP_GENERATION or ?> pid=<pid> tag=<--tag>".

Options (for the tests' broken versions):
  --tag TEXT            put TEXT in every response
  --exit-at-start CODE  print "boom" to stderr and exit CODE before ready
  --never-ready         serve but never send READY=1
  --crash-after-ready S send READY=1, then exit 3 after S seconds, before it
                        accepts anything (a crash in post-start-up initialisation)
  --ready-after S       send READY=1 only after S seconds
  --ignore-term         keep serving on SIGTERM (drain never ends)
  --tick S              print "tick N" to stdout every S seconds, dying of
                        SIGPIPE as a C program would if stdout has no reader
"""

import argparse
import os
import selectors
import signal
import socket
import sys
import threading
import time

parser = argparse.ArgumentParser()
parser.add_argument("--tag", default="")
parser.add_argument("--exit-at-start", type=int)
parser.add_argument("--never-ready", action="store_true")
parser.add_argument("--crash-after-ready", type=float)
parser.add_argument("--ready-after", type=float, default=0.0)
parser.add_argument("--ignore-term", action="store_true")
parser.add_argument("--tick", type=float)
args = parser.parse_args()

if args.exit_at_start is not None:
    print("boom: this version is broken", file=sys.stderr, flush=True)
    sys.exit(args.exit_at_start)

if os.environ.get("LISTEN_PID") != str(os.getpid()):
    sys.exit("LISTEN_PID is not mine")
listeners = [socket.socket(fileno=3 + i) for i in range(int(os.environ["LISTEN_FDS"]))]
body = f"gen={os.environ.get('NODROP_GENERATION', '?')} pid={os.getpid()} tag={args.tag}".encode()
response = b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\nConnection: close\r\n\r\n%s" % (
    len(body),
    body,
)

stop_r, stop_w = os.pipe()
os.set_blocking(stop_w, False)
signal.set_wakeup_fd(stop_w)
signal.signal(signal.SIGTERM, lambda *_: None)


def handle(conn: socket.socket) -> None:
    try:
        conn.settimeout(10)
        data = b""
        while b"\r\n\r\n" not in data and b"\n" not in data[-1:]:
            chunk = conn.recv(4096)
            if not chunk:
                break
            data += chunk
        conn.sendall(response)
    except OSError:
        pass
    finally:
        conn.close()


def notify(message: bytes) -> None:
    path = os.environ.get("NOTIFY_SOCKET")
    if path:
        # As sd_notify(3): an error is returned, not fatal (the supervisor
        # that started us may have been killed meanwhile).
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
            try:
                s.connect("\0" + path[1:] if path.startswith("@") else path)
                s.send(message)
            except OSError:
                pass


if args.tick is not None:
    signal.signal(signal.SIGPIPE, signal.SIG_DFL)

    def tick() -> None:
        n = 0
        while True:
            n += 1
            print(f"tick {n}", flush=True)
            time.sleep(args.tick)

    threading.Thread(target=tick, daemon=True).start()

sel = selectors.DefaultSelector()
for lst in listeners:
    lst.setblocking(False)
    sel.register(lst, selectors.EVENT_READ)
sel.register(stop_r, selectors.EVENT_READ)

ready_at = time.monotonic() + args.ready_after
ready_sent = False
threads = []
while True:
    if not ready_sent and not args.never_ready and time.monotonic() >= ready_at:
        notify(b"READY=1\nSTATUS=serving")
        ready_sent = True
        if args.crash_after_ready is not None:
            time.sleep(args.crash_after_ready)  # the scenario: initialisation, then a crash
            print("crashed after saying READY=1", file=sys.stderr, flush=True)
            os._exit(3)
    timeout = None if ready_sent or args.never_ready else max(0.0, ready_at - time.monotonic())
    events = sel.select(timeout)
    stop = False
    for key, _ in events:
        if key.fileobj == stop_r:
            os.read(stop_r, 64)
            stop = not args.ignore_term
            continue
        try:
            assert isinstance(key.fileobj, socket.socket)
            conn, _ = key.fileobj.accept()
        except BlockingIOError:
            continue
        conn.setblocking(True)
        t = threading.Thread(target=handle, args=(conn,))
        t.start()
        threads.append(t)
        threads = [t for t in threads if t.is_alive()]
    if stop:
        break
# Drain: stop accepting (queued connections stay in the shared kernel queue
# for the new generation), finish the requests we accepted, exit.
for t in threads:
    t.join()
sys.exit(0)
