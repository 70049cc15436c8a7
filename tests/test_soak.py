"""The short soak in CI: ``benchmarks/soak.py`` with 50 reloads under
continuous load (the full run is 10,000; see README.md)."""

from __future__ import annotations

import sys
from pathlib import Path

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))

from soak import soak  # noqa: E402


def test_fifty_reloads_under_load_fail_nothing_and_grow_nothing() -> None:
    r = soak(50, workers=2, concurrency=8)
    assert r["reloads"] == 50, r
    assert not r["reloads_failed"], r
    assert r["requests"] > 1000, "the load generator barely ran"
    assert r["requests_failed"] == 0, r["outcomes"]
    assert r["after"]["fds"] <= r["before"]["fds"], r
    assert r["after"]["children"] <= r["before"]["children"] == 2, r
    assert r["after"]["zombies"] == 0, r
    assert r["supervisor_exit"] == 0
    assert r["ok"]
