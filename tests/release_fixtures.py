"""The built release (sdist and wheel), shared by the release and recipe tests.

CI (.ci/run) builds ``dist/`` before the tests; run alone, the session
fixture builds it into a temporary directory (``python -m build`` fetches the
pinned setuptools from the package index).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

import nodrop
from conftest import HERE

ROOT = HERE.parent
VERSION = nodrop.__version__


_built: list[Path] = []


def built_dist(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A directory with this version's sdist and wheel (built once per session)."""
    built = ROOT / "dist"
    if (built / f"nodrop-{VERSION}-py3-none-any.whl").exists() and (
        built / f"nodrop-{VERSION}.tar.gz"
    ).exists():
        return built
    if not _built:
        out = tmp_path_factory.mktemp("dist")
        done = subprocess.run(
            [sys.executable, "-m", "build", "--outdir", str(out), str(ROOT)],
            capture_output=True,
            text=True,
            timeout=300,
            check=False,
        )
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
        _built.append(out)
    return _built[0]


def wheel_of(dist: Path) -> Path:
    return dist / f"nodrop-{VERSION}-py3-none-any.whl"
