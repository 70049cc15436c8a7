"""The load generator: proves (or disproves) that a reload drops nothing.

Run :func:`run_load` with a :class:`LoadConfig` and, optionally, a
:class:`Reloader`; print :func:`format_table` of the result or save
:func:`render_html`. See ``docs`` in each module for the exact semantics.
"""

from __future__ import annotations

from nodrop.load.config import (
    DEFAULT_CONCURRENCY,
    DEFAULT_DURATION,
    DEFAULT_MAX_REQUESTS,
    DEFAULT_TIMEOUT,
    LoadConfig,
    Mode,
)
from nodrop.load.histogram import Histogram
from nodrop.load.html import render_html
from nodrop.load.outcome import Outcome, classify
from nodrop.load.reload import CommandReloader, Reloader, ReloadRecord
from nodrop.load.report import format_table
from nodrop.load.result import LatencySummary, LoadResult, Second
from nodrop.load.runner import run_load

__all__ = [
    "DEFAULT_CONCURRENCY",
    "DEFAULT_DURATION",
    "DEFAULT_MAX_REQUESTS",
    "DEFAULT_TIMEOUT",
    "CommandReloader",
    "Histogram",
    "LatencySummary",
    "LoadConfig",
    "LoadResult",
    "Mode",
    "Outcome",
    "ReloadRecord",
    "Reloader",
    "Second",
    "classify",
    "format_table",
    "render_html",
    "run_load",
]
