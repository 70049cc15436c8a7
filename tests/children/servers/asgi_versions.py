"""ASGI apps for the adapter tests, chosen by $APP_VERSION.

good: answers "version=good"; slow-start: its lifespan start-up takes
$STARTUP_SECONDS; broken-start: its lifespan start-up fails.
"""

import asyncio
import os

VERSION = os.environ.get("APP_VERSION", "good")
STARTUP_SECONDS = float(os.environ.get("STARTUP_SECONDS", "0"))


async def app(scope, receive, send):  # type: ignore[no-untyped-def]
    if scope["type"] == "lifespan":
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await asyncio.sleep(STARTUP_SECONDS)
                if VERSION == "broken-start":
                    await send({"type": "lifespan.startup.failed", "message": "no database"})
                    return
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await send({"type": "lifespan.shutdown.complete"})
                return
    body = f"version={VERSION}".encode()
    await send(
        {
            "type": "http.response.start",
            "status": 200,
            "headers": [(b"content-length", b"%d" % len(body))],
        }
    )
    await send({"type": "http.response.body", "body": body})
