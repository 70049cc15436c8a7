"""The standard library's ``http.server`` under `nodrop run`.

    nodrop run --listen tcp://0.0.0.0:8000 -- python socketserver_http.py

Any ``socketserver`` server works the same way: build it with
``bind_and_activate=False`` and give it the inherited socket; say READY=1;
on SIGTERM stop ``serve_forever()`` (from another thread: ``shutdown()``
waits for the loop) and join the request threads. Without nodrop installed,
``socket.socket(fileno=3)`` is the inherited socket (check LISTEN_PID first).
"""

import os
import signal
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import nodrop

BODY = f"gen={os.environ.get('NODROP_GENERATION', '?')} pid={os.getpid()}\n".encode()


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_GET(self) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Content-Length", str(len(BODY)))
        # Say so when we close after this response (the client asked to):
        # an HTTP/1.1 client would otherwise reuse the connection.
        self.send_header("Connection", "close" if self.close_connection else "keep-alive")
        self.end_headers()
        self.wfile.write(BODY)

    def log_message(self, format: str, *args: object) -> None:
        pass


class Server(ThreadingHTTPServer):
    # ThreadingHTTPServer's daemon threads are not joined at exit; the drain
    # must wait for every request in flight.
    daemon_threads = False
    block_on_close = True


def main() -> None:
    (listener,) = nodrop.listen_fds()
    server = Server(listener.socket.getsockname()[:2], Handler, bind_and_activate=False)
    server.socket.close()
    server.socket = listener.socket
    signal.signal(signal.SIGTERM, lambda *_: threading.Thread(target=server.shutdown).start())
    nodrop.ready()
    server.serve_forever(poll_interval=0.1)
    server.server_close()  # joins the request threads; our copy of the socket only


if __name__ == "__main__":
    main()
