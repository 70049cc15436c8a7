"""A receiving worker for the broker tests, driven by argv.

    keepalive_receiver.py PATH ROOM MODE

Registers with the broker at PATH, prints ``registered``; then per MODE:
``die`` — exit abruptly as soon as a batch arrives, before acknowledging it;
``take`` — adopt batches, print ``got N`` for each, keep them until stdin closes;
``keep-room`` — the same, announcing ROOM again with every acknowledgement;
``take-at-limit`` — as ``take``, with RLIMIT_NOFILE (soft and hard) lowered to
one fd more than are open: the kernel truncates any batch of two or more;
a batch ``receive`` refuses is reported as ``refused: REASON``.
"""

from __future__ import annotations

import os
import resource
import sys
import threading

from nodrop.connhandoff.client import Receiver
from nodrop.errors import ProtocolError


def main() -> None:
    path, room, mode = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    receiver = Receiver.register(path, room=room)
    print("registered", flush=True)
    if mode == "die":
        receiver.channel.recv(max_fds=253)
        os._exit(3)
    kept = []
    threading.Thread(target=lambda: (sys.stdin.read(), os._exit(0)), daemon=True).start()
    if mode == "take-at-limit":
        used = len(os.listdir("/proc/self/fd")) - 1  # not the listdir's own
        resource.setrlimit(resource.RLIMIT_NOFILE, (used + 1, used + 1))
        print(f"limit {used + 1}", flush=True)
    while True:
        try:
            batch = receiver.receive(room if mode == "keep-room" else 0)
        except ProtocolError as exc:
            print(f"refused: {exc}", flush=True)
            continue
        if batch is None:
            return
        kept.extend(batch)
        print(f"got {len(batch)}", flush=True)


if __name__ == "__main__":
    main()
