"""Fail early, and clearly, where nodrop cannot work."""

from __future__ import annotations

import sys

from nodrop.errors import UnsupportedPlatformError


def require_linux(platform: str = sys.platform) -> None:
    """Raise UnsupportedPlatformError unless running on Linux."""
    if not platform.startswith("linux"):
        raise UnsupportedPlatformError(
            f"nodrop needs Linux (SO_REUSEPORT, SCM_RIGHTS, SO_PEERCRED); this is {platform!r}"
        )
