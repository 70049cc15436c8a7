"""What ``nodrop.adapters.gunicorn_asgi_internals`` relies on, checked against
the installed gunicorn: an upgrade that changes it fails here, loudly.

The drain itself is tested end to end by the ``fastapi/gunicorn-asgi`` cell of
``tests/test_stacks.py`` (reloads under strict clients; a broken version
rolled back).
"""

from __future__ import annotations

import pytest

pytest.importorskip("gunicorn.workers.gasgi")

from nodrop.adapters.gunicorn_asgi_internals import (
    TESTED_VERSIONS,
    check_internals,
)


def test_the_installed_gunicorn_is_the_one_the_module_was_written_for() -> None:
    problems = check_internals()
    assert problems == [], (
        f"nodrop.adapters.gunicorn_asgi_internals relies on gunicorn {TESTED_VERSIONS}: "
        f"{problems}. Re-read gunicorn/workers/gasgi.py and gunicorn/asgi/protocol.py, "
        "adapt the module, re-run the fastapi/gunicorn-asgi cells of tests/test_stacks.py "
        "and tests/test_adapter_handoff.py -k gunicorn-asgi, then update TESTED_VERSIONS."
    )
