"""aiohttp under `nodrop run`: the inherited socket in a ``web.SockSite``.

    nodrop run --listen tcp://0.0.0.0:8000 -- python server.py

``web.run_app(app, sock=listener.socket)`` also works, but on SIGTERM it
closes its server and then every connection with no request in progress,
including ones accepted an instant before: a few requests per reload fail in
new-connection mode (measured). Here the drain stops accepting first
(``nodrop.adapters.drain.stop_accepting``), lets those connections read
their request, and only then runs aiohttp's graceful cleanup.
"""

import asyncio
import os
import signal

from aiohttp import web

import nodrop
from nodrop.adapters.drain import DEFAULT_SETTLE, stop_accepting

BODY = f"gen={os.environ.get('NODROP_GENERATION', '?')} pid={os.getpid()}\n"


async def hello(request: web.Request) -> web.Response:
    return web.Response(text=BODY)


async def main() -> None:
    app = web.Application()
    app.router.add_get("/", hello)
    (listener,) = nodrop.listen_fds()
    runner = web.AppRunner(app, handle_signals=False, access_log=None)
    await runner.setup()
    await web.SockSite(runner, listener.socket).start()
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    nodrop.ready()
    await stop.wait()
    await stop_accepting([listener.socket], settle=DEFAULT_SETTLE)
    await runner.cleanup()  # finishes the requests in flight


if __name__ == "__main__":
    asyncio.run(main())
