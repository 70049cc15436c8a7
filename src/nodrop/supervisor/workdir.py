"""Each generation's working directory, resolved when the generation starts.

A release-directory deploy keeps ``/srv/app/releases/N`` side by side and a
``/srv/app/current`` symlink to the live one. A service manager resolves its
``WorkingDirectory=`` once, when the supervisor starts, so every later
generation would run the first release. ``nodrop run --chdir
/srv/app/current`` resolves the link at each generation's start instead:
flip the link, ``nodrop reload``, and the new generation runs the new
release, while the old one (and any restart of its workers) keeps the
directory it started in.
"""

from __future__ import annotations

import os

from nodrop.errors import ConfigError


def resolve_workdir(path: str | None) -> str | None:
    """The real directory ``path`` names now (symlinks resolved), or None.

    Raises:
        ConfigError: ``path`` does not name a directory.
    """
    if path is None:
        return None
    real = os.path.realpath(path)
    if not os.path.isdir(real):
        raise ConfigError(f"--chdir {path}: {real} is not a directory")
    return real
