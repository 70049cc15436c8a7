"""The report tells the whole story: how the run was made (command, versions,
strategy, handoff), what it is measured against (a naive restart in the same
run), what one-second bins hide (100 ms buckets in reload windows), a legend
of what is drawn, and what to run next; `--json` is one document."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from nodrop.load import LoadConfig, LoadResult, Mode, Outcome, ReloadRecord, render_html
from nodrop.load.runinfo import NEXT_STEP, RunInfo, versions
from nodrop.load.samples import Samples
from nodrop.load.stats import FINE_BUCKET, summarize


def synthetic(failures: bool) -> LoadResult:
    """4 s at 1000 requests/s, one reload window at 2.0-2.3 s."""
    config = LoadConfig(host="127.0.0.1", port=8080, mode=Mode.CLOSE, duration=4.0)
    t0 = 100.0
    s = Samples(cpu_seconds=1.0, wall_seconds=4.0)
    for i in range(4000):
        start = t0 + i / 1000
        refused = failures and 2.1 <= i / 1000 < 2.2
        s.starts.append(start)
        s.latencies.append(0.002)
        s.outcomes.append(Outcome.REFUSED if refused else Outcome.OK)
    reloads = [ReloadRecord(t0 + 2.0, t0 + 2.2, t0 + 2.3, True, "generation 2 ready")]
    return summarize(config, s, reloads, started=t0, ended=t0 + 4.0, processes=1)


def test_fine_buckets_cover_reload_windows_only() -> None:
    result = synthetic(failures=True)
    assert result.fine, "no fine buckets"
    times = [b.t for b in result.fine]
    # 2.0 - 0.5 .. 2.3 + 0.5, in 100 ms steps (a sample lands by its end).
    assert min(times) >= 1.4, times
    assert max(times) <= 2.8 + 1e-9, times
    assert all(b.width == FINE_BUCKET for b in result.fine)
    refused = {round(b.t, 1): b.outcomes.get("refused", 0) for b in result.fine}
    # Binned by end time (start + 2 ms latency): the last ones land in the next bucket.
    assert refused[2.1] >= 97
    assert refused[2.1] + refused[2.2] == 100
    assert refused[1.5] == 0
    # The one-second bin averages them: 100 of 1000 in second 2.
    assert result.timeline[2].errors == 100


def test_report_states_command_versions_strategy_and_baseline() -> None:
    result, baseline = synthetic(failures=False), synthetic(failures=True)
    info = RunInfo(
        command="nodrop demo --duration 4",
        server="nodrop's demo app",
        strategy="inherit",
        handoff=False,
        versions=versions(server="demo 1.0"),
        baseline=baseline,
        baseline_label="naive restart",
    )
    page = render_html(result, info)
    assert "<code>nodrop demo --duration 4</code>" in page
    for key in ("nodrop ", "python ", "kernel ", "server demo 1.0"):
        assert key in page
    assert "<th>strategy</th><td class=left>inherit</td>" in page
    assert "keep-alive handoff</th><td class=left>off" in page
    assert 'id="baseline"' in page
    assert "naive restart" in page
    assert "refused 100" in page  # the baseline's failures, by class
    assert "Inside the reload windows" in page
    assert 'class="fine"' in page
    assert f"Now run this against your app: <code>{NEXT_STEP}" in page.replace("&quot;", '"')


def test_legend_has_no_class_that_did_not_occur() -> None:
    clean = render_html(synthetic(failures=False))
    legend = clean.split('<div class="legend">')[1].split("</div>")[0]
    assert "refused" not in legend
    assert "reset" not in legend
    assert "errors: none in this run" in legend
    failed = render_html(synthetic(failures=True))
    legend = failed.split('<div class="legend">')[1].split("</div>")[0]
    assert "refused" in legend
    assert "reset" not in legend
    assert "timeout" not in legend


@pytest.mark.slow
def test_demo_json_is_one_document_with_a_baseline_that_fails(tmp_path: Path) -> None:
    report = tmp_path / "demo.html"
    done = subprocess.run(
        [sys.executable, "-m", "nodrop", "demo", "--duration", "4", "--reloads", "2",
         "--report", str(report), "--json"],
        capture_output=True, text=True, timeout=300, cwd=tmp_path,
        env=dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path)),
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    document = json.loads(done.stdout)  # nothing before or after it
    assert document["failed"] == 0
    run = document["run"]
    assert run["command"].startswith("nodrop demo --duration 4")
    assert set(run["versions"]) == {"nodrop", "python", "kernel", "server"}
    assert run["strategy"] == "inherit"
    assert run["handoff"] is False
    # The same load against a naive restart fails requests: the generator sees failures.
    assert run["baseline"]["failed"] > 0, run["baseline"]["outcomes"]
    assert len(run["baseline"]["reloads"]) == 1
    assert "now run this against your app" in done.stderr
    page = report.read_text()
    assert 'id="baseline"' in page
    assert "Inside the reload windows" in page
