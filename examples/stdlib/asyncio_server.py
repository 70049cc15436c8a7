"""``asyncio.start_server(sock=...)`` under `nodrop run`.

    nodrop run --listen tcp://0.0.0.0:8000 -- python asyncio_server.py

On SIGTERM, ``nodrop.adapters.drain`` stops accepting, lets connections the
loop already accepted finish setting up, closes the server and waits for the
handlers: a plain ``server.close()`` at that moment can reset accepted
connections on Python 3.11.
"""

import asyncio
import contextlib
import os
import signal

import nodrop
from nodrop.adapters.drain import drain

BODY = f"gen={os.environ.get('NODROP_GENERATION', '?')} pid={os.getpid()}\n".encode()
RESPONSE = b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\nConnection: close\r\n\r\n%s" % (
    len(BODY),
    BODY,
)


async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
        writer.write(RESPONSE)
        await writer.drain()
    except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, TimeoutError):
        pass
    finally:
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()


async def main() -> None:
    (listener,) = nodrop.listen_fds()
    server = await asyncio.start_server(handle, sock=listener.socket)
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    nodrop.ready()
    await stop.wait()
    await drain(server, timeout=30)


if __name__ == "__main__":
    asyncio.run(main())
