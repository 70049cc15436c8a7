"""A systemd-convention server for the reuseport tests: TCP and UDP.

Listeners come from LISTEN_FDS (LISTEN_PID checked); READY=1 goes to
NOTIFY_SOCKET. A TCP connection gets an HTTP response and is closed; a UDP
datagram gets one datagram back. Both carry
"gen=<NODROP_GENERATION> pid=<pid> tag=<--tag>".

On SIGTERM it stops accepting, reads its UDP sockets until empty (answering
each datagram: nothing migrates for UDP), finishes its connections, exits.

Options: --tag TEXT, --exit-at-start CODE, --ignore-term (keep serving on
SIGTERM until killed).
"""

import argparse
import contextlib
import os
import selectors
import signal
import socket
import sys
import threading

parser = argparse.ArgumentParser()
parser.add_argument("--tag", default="")
parser.add_argument("--exit-at-start", type=int)
parser.add_argument("--ignore-term", action="store_true")
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


def answer_datagrams(sock: socket.socket) -> None:
    for _ in range(10_000):  # bounded: one wake-up never starves the others
        try:
            _, peer = sock.recvfrom(2048)
        except BlockingIOError:
            return
        with contextlib.suppress(OSError):
            sock.sendto(body, peer)


def notify(message: bytes) -> None:
    path = os.environ.get("NOTIFY_SOCKET")
    if path:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
            s.connect("\0" + path[1:] if path.startswith("@") else path)
            s.send(message)


sel = selectors.DefaultSelector()
for lst in listeners:
    lst.setblocking(False)
    sel.register(lst, selectors.EVENT_READ)
sel.register(stop_r, selectors.EVENT_READ)
notify(b"READY=1\nSTATUS=serving")

threads: list[threading.Thread] = []
stop = False
while not stop:
    for key, _ in sel.select():
        if key.fileobj == stop_r:
            os.read(stop_r, 64)
            stop = not args.ignore_term
            continue
        sock = key.fileobj
        assert isinstance(sock, socket.socket)
        if sock.type == socket.SOCK_DGRAM:
            answer_datagrams(sock)
            continue
        try:
            conn, _ = sock.accept()
        except BlockingIOError:
            continue
        conn.setblocking(True)
        t = threading.Thread(target=handle, args=(conn,))
        t.start()
        threads.append(t)
        threads = [t for t in threads if t.is_alive()]
for lst in listeners:
    if lst.type == socket.SOCK_DGRAM:
        answer_datagrams(lst)
for t in threads:
    t.join()
sys.exit(0)
