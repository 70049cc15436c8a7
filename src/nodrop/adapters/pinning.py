"""The version pin every ``*_internals`` module starts its check with."""

from __future__ import annotations

import importlib.metadata
from collections.abc import Mapping


def version_problems(tested: Mapping[str, str]) -> list[str]:
    """One line per distribution whose installed version is not the tested one."""
    problems = []
    for name, version in tested.items():
        installed = importlib.metadata.version(name)
        if installed != version:
            problems.append(
                f"{name} {installed} is installed; this module was tested with {version}"
            )
    return problems
