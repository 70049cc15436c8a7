"""aiohttp under `nodrop run`, through ``nodrop.adapters.aiohttp``.

    nodrop run --listen tcp://0.0.0.0:8000 -- python server.py
    nodrop run --listen tcp://0.0.0.0:8000 -- python server.py

(or, with no ``__main__`` of your own: ``python -m nodrop.adapters.aiohttp
server:create_app``). ``run_app`` serves the inherited sockets, says
``READY=1`` once ``on_startup`` has run, and drains without failing a request:
see README.md.
"""

import os
import sys

from aiohttp import web

from nodrop.adapters.aiohttp import run_app

BODY = f"gen={os.environ.get('NODROP_GENERATION', '?')} pid={os.getpid()}\n"


async def hello(request: web.Request) -> web.Response:
    return web.Response(text=BODY)


def create_app() -> web.Application:
    app = web.Application()
    app.router.add_get("/", hello)
    return app


if __name__ == "__main__":
    # A keep-alive timeout shorter than the drain: idle connections are then
    # never closed earlier than steady state would close them.
    sys.exit(run_app(create_app, keepalive_timeout=15, access_log=None))
