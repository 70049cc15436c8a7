"""The smallest WSGI app: what gunicorn serves in the reload matrix."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

BODY = b"ok\n"


def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
    start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", str(len(BODY)))])
    return [BODY]
