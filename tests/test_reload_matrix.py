"""Smoke test of ``benchmarks/reload_matrix.py``: arguments, wrk parsing, one short cell.

The full matrix is a benchmark, not a test; this only checks that the script
runs end to end and writes its table.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"
SCRIPT = BENCHMARKS / "reload_matrix.py"
sys.path.insert(0, str(BENCHMARKS))

from baselines.cells import parse_wrk  # noqa: E402

WRK_CLOSE = """\
Running 10s test @ http://127.0.0.1:8080/
  2 threads and 32 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency     3.10ms    1.20ms  40.00ms   90.00%
    Req/Sec     5.00k   300.00     6.00k    70.00%
  Latency Distribution
     50%    2.90ms
     75%    3.40ms
     90%    4.10ms
     99%    7.25ms
  99551 requests in 10.01s, 9.40MB read
  Socket errors: connect 12, read 3, write 0, timeout 1
  Non-2xx or 3xx responses: 4
Requests/sec:   9945.05
Transfer/sec:      0.94MB
"""

WRK_CLEAN = """\
Running 2s test @ http://127.0.0.1:8080/
  1 threads and 4 connections
  Latency Distribution
     50%  150.00us
     99%    1.02s
  1200 requests in 2.00s, 100.00KB read
Requests/sec:    600.00
"""


def run_script(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(SCRIPT), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path)),
    )


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (
            WRK_CLOSE,
            {
                "requests": 99551,
                "errors": {"connect": 12, "read": 3, "write": 0, "timeout": 1},
                "non_2xx": 4,
                "failed": 20,
                "p99_s": pytest.approx(7.25e-3),
                "elapsed_s": pytest.approx(10.01),
            },
        ),
        (
            WRK_CLEAN,
            {
                "requests": 1200,
                "errors": {"connect": 0, "read": 0, "write": 0, "timeout": 0},
                "non_2xx": 0,
                "failed": 0,
                "p99_s": pytest.approx(1.02),
                "elapsed_s": pytest.approx(2.0),
            },
        ),
    ],
)
def test_parse_wrk(text: str, expected: dict[str, object]) -> None:
    assert parse_wrk(text) == expected


def test_parse_wrk_rejects_garbage() -> None:
    with pytest.raises(ValueError, match="no 'requests in' line"):
        parse_wrk("unable to connect to 127.0.0.1:1 Connection refused\n")


def test_help_and_bad_arguments() -> None:
    done = run_script("--help")
    assert done.returncode == 0
    assert "nodrop-inherit" in done.stdout
    assert "keepalive-wrk" in done.stdout
    bad = run_script("--rows", "nodrop-inherit,no-such-row")
    assert bad.returncode == 2
    assert "no-such-row" in bad.stderr


@pytest.mark.slow
def test_one_short_nodrop_cell(tmp_path: Path) -> None:
    done = run_script(
        "--rows", "nodrop-inherit", "--cells", "close", "--duration", "2", "--reloads", "1",
        "--no-netns", "--out", str(tmp_path), "--name", "smoke",
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    doc = json.loads((tmp_path / "smoke.json").read_text())
    (row,) = doc["rows"]
    assert "not_run" not in row, row.get("not_run")
    cell = row["cells"]["close"]
    assert cell["requests"] > 100, cell
    assert cell["reloads"]["count"] == 1, cell["reloads"]
    assert cell["reloads"]["failed"] == 0, cell["reloads"]
    assert cell["failed"] == 0, cell["failures"]
    table = (tmp_path / "smoke.md").read_text()
    assert "benchmarks/reload_matrix.py" in table
    assert "| nodrop run (inherit) |" in table
