"""WSGI apps for the gunicorn adapter tests, chosen by $APP_VERSION.

good: answers "version=good"; broken-import: importing takes
$IMPORT_SECONDS and then fails (a new version with a bad dependency).
"""

import os
import time

VERSION = os.environ.get("APP_VERSION", "good")

if VERSION == "broken-import":
    time.sleep(float(os.environ.get("IMPORT_SECONDS", "1")))
    raise ImportError("this version needs a module that is not installed")


def app(environ, start_response):  # type: ignore[no-untyped-def]
    body = f"version={VERSION}".encode()
    start_response("200 OK", [("Content-Length", str(len(body)))])
    return [body]
