"""``benchmarks/reload_latency.py``: its pure breakdown, its arguments, and a
``--quick`` run end to end (well-formed output, no failed request -- never a
timing threshold), plus :mod:`nodrop.supervisor.timing`."""

from __future__ import annotations

import json
import struct
import subprocess
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"
SCRIPT = BENCHMARKS / "reload_latency.py"
sys.path.insert(0, str(BENCHMARKS))

from latency.phases import (  # noqa: E402
    FIRST_WINDOW,
    CpuSeries,
    Latency,
    ReloadMoments,
    cpu_by_phase,
    parse_proc_stat_busy,
    parse_stat_cpu,
    percentile,
    split_requests,
)
from latency.sampler import parse_listen_queue  # noqa: E402
from nodrop.supervisor.config import RunConfig  # noqa: E402
from nodrop.supervisor.model import Generation, Worker  # noqa: E402
from nodrop.supervisor.timing import describe, reload_timing, with_drain  # noqa: E402
from reload_latency import parse_args, plan  # noqa: E402


@pytest.mark.parametrize(
    ("values", "q", "want"),
    [
        ([], 50, None),
        ([1.0], 99, 1.0),
        ([1.0, 2.0, 3.0, 4.0], 50, 2.0),
        ([float(i) for i in range(1, 101)], 99, 99.0),
        ([float(i) for i in range(1, 1001)], 99.9, 999.0),
        ([1.0, 2.0], 100, 2.0),
    ],
)
def test_percentile_is_nearest_rank(values: list[float], q: float, want: float | None) -> None:
    assert percentile(values, q) == want


def test_requests_split_by_window_and_phase() -> None:
    reload = ReloadMoments(started=10.0, ready=11.0, switched=11.5, old_exited=12.0)
    assert reload.bounds()["first"] == (11.5, 11.5 + FIRST_WINDOW)
    assert reload.bounds()["drain"] == (11.5 + FIRST_WINDOW, 12.0)
    starts = [1.0, 9.99, 10.5, 11.2, 11.6, 11.9, 12.1, 20.0, 10.6]
    latencies = [0.001, 0.02, 0.003, 0.004, 0.005, 0.006, 0.007, 0.008, 9.0]
    ok = [True] * 8 + [False]  # a failure counts nowhere
    steady, window, phases = split_requests(starts, latencies, ok, [reload])
    assert steady == [0.001, 0.007, 0.008]  # "after" is outside the window
    # 9.99 + 0.02 overlaps the window's start; 12.1 starts after its end.
    assert window == [0.02, 0.003, 0.004, 0.005, 0.006]
    assert phases == {
        "starting": [0.003],
        "switch": [0.004],
        "first": [0.005],
        "drain": [0.006],
        "after": [0.007],
    }
    assert Latency.of(window).max == 0.02
    steady, window, _ = split_requests(starts, latencies, ok, [reload], since=10.55)
    assert steady == [0.007, 0.008]  # the warm-up left out
    assert window == [0.004, 0.005, 0.006]


def test_cpu_is_counted_per_phase_and_group() -> None:
    series = CpuSeries()
    series.add(0.0, {1: 0.0, 100: 1.0})
    series.add(1.0, {1: 0.0, 2: 0.3, 100: 1.5})  # new worker 2 booting
    series.add(2.0, {1: 0.1, 2: 0.4, 100: 2.0})
    series.add(3.0, {2: 0.5, 100: 2.5})  # old worker 1 gone: its last sample stands
    reload = ReloadMoments(0.0, 1.0, 2.0, 3.0, new_pids=frozenset({2}), old_pids=frozenset({1}))
    used = cpu_by_phase(series, reload, {"loadgen": frozenset({100})})
    assert used["starting"] == {"new": 0.3, "old": 0.0, "loadgen": 0.5, "seconds": 1.0}
    assert used["switch"]["new"] == pytest.approx(0.1)
    assert used["switch"]["old"] == pytest.approx(0.1)
    assert used["drain"]["old"] == 0.0
    assert series.pids() == {1, 2, 100}


def test_proc_parsers() -> None:
    stat = "42 (a (weird) name) S 1 42 42 0 -1 4194304 100 0 0 0 250 50 0 0 20 0 1 0 99"
    assert parse_stat_cpu(stat, 100) == 3.0
    assert parse_proc_stat_busy("cpu  10 0 10 70 10 0 0 0 0 0\ncpu0 1 2 3\n") == (20.0, 100.0)
    with pytest.raises(ValueError, match="cpu line"):
        parse_proc_stat_busy("intr 1\n")


def _diag(port: int, rqueue: int) -> bytes:
    body = struct.pack("=BBBB", 2, 10, 0, 0) + struct.pack(">HH16s16s", port, 0, b"", b"")
    body += b"\0" * 12 + struct.pack("=IIIII", 0, rqueue, 0, 0, 7)
    return struct.pack("=IHHII", 16 + len(body), 20, 2, 1, 0) + body


def test_listen_queue_sums_the_port_s_listeners() -> None:
    done = struct.pack("=IHHII", 16, 3, 2, 1, 0)
    data = _diag(8080, 3) + _diag(9090, 50) + _diag(8080, 4) + done
    assert parse_listen_queue(data, 8080) == (7, True)
    assert parse_listen_queue(_diag(8080, 1), 8080) == (1, False)


def test_arguments_and_the_interleaved_plan() -> None:
    args = parse_args(["--rows", "demo,nginx", "--rounds", "2", "--variant", "idle=--x 1"])
    rounds = plan(args)
    assert [[(r, v) for r, v, _ in entries] for entries in rounds] == [
        [("demo", "default"), ("demo", "idle"), ("nginx", "-")],
        [("demo", "idle"), ("nginx", "-"), ("demo", "default")],
    ]
    assert rounds[0][1][2] == ["--x", "1"]
    for bad in (["--duration", "nan"], ["--rounds", "0"], ["--rows", "apache"], ["--variant", "x"]):
        with pytest.raises(SystemExit):
            parse_args(bad)


def _generation() -> Generation:
    gen = Generation(2, RunConfig(command=("app",)), [], started=10.1)
    gen.workers = [
        Worker(2, 1, 100, started=10.1, ready_at=10.9),
        Worker(2, 2, 101, started=10.102, ready_at=11.0),
    ]
    return gen


def test_reload_timing_parts() -> None:
    timing = reload_timing(10.0, _generation(), 11.2, 11.25, 11.4)
    assert timing == pytest.approx(
        {
            "control_plane": 0.1 + 0.002 + 0.05,
            "app_start": 0.9,
            "ready_grace": 0.2,
            "stop_accepting": 0.15,
        }
    )
    assert with_drain(timing, [{"drain_duration": 0.5}, {"drain_duration": 0.7}]) == {
        **timing,
        "drain": 0.7,
    }
    assert with_drain(timing, [{"drain_duration": 0.5}, {"drain_duration": None}]) == {
        **timing,
        "drain": None,
    }
    assert with_drain(timing, []) == timing  # the first start: nothing drains
    assert with_drain(None, []) is None
    line = describe({**timing, "drain": None})
    assert line.startswith("nodrop 152 ms, app start 900 ms, ready grace 200 ms")
    assert line.endswith("drain still draining")


@pytest.mark.slow
def test_quick_run_is_well_formed_and_fails_nothing(tmp_path: Path) -> None:
    out = tmp_path / "latency.json"
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--quick", "--json", str(out)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    doc = json.loads(out.read_text())
    rows = {(r["row"], r["variant"]): r for r in doc["pooled"]}
    assert set(rows) == {
        ("demo", "default"),
        ("fastapi", "default"),
        ("nginx", "-"),
        ("haproxy", "-"),
    }
    for key in (("demo", "default"), ("fastapi", "default")):
        row = rows[key]
        assert row["error"] is None, row["error"]
        assert row["requests"] > 0, row
        assert row["failed"] == 0, row
        assert row["steady"]["count"] > 0
        assert row["window"]["count"] > 0
        assert len(row["reloads"]) == 2
        assert row["reloads"][0]["new_pids"]
        assert row["reloads"][0]["old_pids"]
        assert set(row["cpu_by_phase"]) == {"starting", "switch", "first", "drain", "after"}
        assert all(t["timing"]["drain"] is not None for t in row["status_reloads"])
        assert 0 < row["loadgen_cpu_share"] <= 1
    for key in (("nginx", "-"), ("haproxy", "-")):
        row = rows[key]
        assert row["failed"] == 0, row
        assert row["requests"] > 0 or "not installed" in (row["error"] or ""), row
    for heading in ("## Reload windows against steady state", "### demo[default]", "load average"):
        assert heading in proc.stdout, proc.stdout
