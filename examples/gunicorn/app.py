"""A minimal WSGI app for the gunicorn recipe (no framework)."""

import os

BODY = f"gen={os.environ.get('NODROP_GENERATION', '?')} pid={os.getpid()}\n".encode()


def app(environ, start_response):  # type: ignore[no-untyped-def]
    start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", str(len(BODY)))])
    return [BODY]
