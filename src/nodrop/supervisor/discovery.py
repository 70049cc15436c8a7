"""One supervisor per app, each with its own control socket, found again
without a flag.

``nodrop run`` names its control socket after ``--name``, or, without one,
after its listeners (:func:`derive_name`): two apps on one machine get two
sockets in the same control directory with no extra option. ``nodrop
reload``/``status``/``stop`` find the one that runs (:func:`resolve`), or ask
which one when there are several; ``nodrop status --all`` lists them
(:func:`discover`).
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from nodrop.errors import ConfigError, ControlError
from nodrop.listeners.spec import ListenerSpec
from nodrop.supervisor.control import default_control_path, request

NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
DISCOVERY_TIMEOUT = 2.0


def check_name(name: str) -> str:
    """``name`` if it can name a control socket file, else ConfigError (pure)."""
    if not NAME_RE.fullmatch(name):
        raise ConfigError(
            f"--name {name!r}: use letters, digits, '.', '_' and '-' (at most 64, "
            "starting with a letter or digit)"
        )
    return name


def derive_name(specs: Sequence[ListenerSpec], addresses: Sequence[str], pid: int) -> str:
    """A supervisor's name from what it listens on (pure).

    ``tcp://0.0.0.0:8000`` -> ``tcp-0.0.0.0-8000``; several listeners are
    joined with ``_``; sockets from a service manager (``addresses``) count
    by their address. A port-0 listener is not unique (every run gets
    another port), so the name ends with ``-pid<PID>`` then.
    """
    parts: list[str] = []
    unique = True
    for spec in specs:
        if spec.path is not None:
            parts.append("unix" + spec.path)
        elif spec.abstract is not None:
            parts.append("unix-@" + spec.abstract)
        else:
            host = (spec.host or "").replace(":", "_")  # [::1] -> __1
            parts.append(f"{spec.transport.value}-{host}-{spec.port}")
            unique = unique and spec.port != 0
    parts += list(addresses)
    text = "_".join(parts) or "nodrop"
    name = re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-._") or "nodrop"
    if len(name) > 48:
        name = name[:48].rstrip("-._")
    if not unique:
        name += f"-pid{pid}"
    return name


@dataclass(frozen=True)
class Found:
    """A supervisor that answered in the control directory."""

    name: str
    path: str
    status: dict[str, Any]


def control_dir() -> str:
    """The directory default control sockets live in."""
    return os.path.dirname(default_control_path("nodrop"))


def discover(directory: str | None = None) -> list[Found]:
    """Every supervisor that answers ``status`` on a ``*.sock`` in ``directory``
    (default: :func:`control_dir`), by name. Stale sockets are skipped."""
    directory = directory or control_dir()
    try:
        entries = sorted(os.listdir(directory))
    except OSError:
        return []
    found = []
    for entry in entries:
        if not entry.endswith(".sock"):
            continue
        path = os.path.join(directory, entry)
        try:
            status = request(path, "status", timeout=DISCOVERY_TIMEOUT)
        except ControlError:
            continue
        found.append(Found(entry[: -len(".sock")], path, status))
    return found


def resolve(control: str | None, name: str | None) -> str:
    """The control socket a command talks to.

    ``--control`` if given; else ``$NODROP_CONTROL``; else the one for
    ``--name``; else the only supervisor running in the control directory.

    Raises:
        ControlError: several supervisors run and nothing says which.
    """
    if control:
        return control
    if name or os.environ.get("NODROP_CONTROL"):
        return default_control_path(check_name(name) if name else "nodrop")
    running = discover()
    if len(running) == 1:
        return running[0].path
    if not running:
        return default_control_path("nodrop")  # its error says where it looked
    names = ", ".join(f.name for f in running)
    raise ControlError(
        f"{len(running)} supervisors run here ({names}): say which with --name NAME "
        "(`nodrop status --all` lists them)"
    )
