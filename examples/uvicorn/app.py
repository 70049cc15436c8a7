"""A minimal ASGI app (no framework) for the uvicorn and hypercorn recipes.

Every response says which generation and process answered, so a reload is
visible from the outside: ``curl localhost:8000`` before and after
``nodrop reload``.
"""

import os

BODY = f"gen={os.environ.get('NODROP_GENERATION', '?')} pid={os.getpid()}\n".encode()


async def app(scope, receive, send):  # type: ignore[no-untyped-def]
    if scope["type"] == "lifespan":
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await send({"type": "lifespan.shutdown.complete"})
                return
    if scope["type"] != "http":
        return
    await send(
        {
            "type": "http.response.start",
            "status": 200,
            "headers": [(b"content-type", b"text/plain"), (b"content-length", b"%d" % len(BODY))],
        }
    )
    await send({"type": "http.response.body", "body": BODY})
