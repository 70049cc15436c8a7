"""The reload matrix's markdown: three tables and the details. Pure code.

Reads the JSON document that ``benchmarks/reload_matrix.py`` writes.
"""

from __future__ import annotations

from typing import Any

#: Goal from issue 4: p99 in reload windows within this factor of steady state.
GOAL_P99_RATIO = 1.1


def _ms(seconds: float | None) -> str:
    return (
        "-"
        if seconds is None
        else f"{seconds * 1e3:.1f} ms"
        if seconds < 10
        else f"{seconds:.1f} s"
    )


def _num(value: float | None, fmt: str = "{:,.0f}") -> str:
    return "-" if value is None else fmt.format(value)


def _cell(result: dict[str, Any], name: str) -> dict[str, Any] | None:
    cell = result.get("cells", {}).get(name)
    return cell if cell and "error" not in cell and "not_run" not in cell else None


def _get(cell: dict[str, Any] | None, key: str) -> Any:
    """``cell[key]``, or None for a cell that did not run."""
    return None if cell is None else cell[key]


def _reload_window(cell: dict[str, Any] | None) -> str:
    if cell is None or not cell["reloads"]["count"]:
        return "-"
    r = cell["reloads"]
    text = f"{_ms(r['median_s'])} / {_ms(r['max_s'])}"
    return text + (f" ({r['failed']} failed)" if r["failed"] else "")


def _ratio(cell: dict[str, Any] | None) -> str:
    if cell is None or cell["p99_ratio"] is None:
        return "-"
    text = f"{cell['p99_ratio']:.2f}x"
    return f"**{text}**" if cell["p99_ratio"] > GOAL_P99_RATIO else text


def _failed(cell: dict[str, Any] | None) -> tuple[str, str]:
    if cell is None:
        return "-", "-"
    failed = f"{cell['failed']:,}"
    fpm = f"{cell['failed_per_million']:,.0f}"
    return (f"**{failed}**", f"**{fpm}**") if cell["failed"] else (failed, fpm)


def _row_name(result: dict[str, Any]) -> str:
    return str(result["label"]) + (" *(not run)*" if "not_run" in result else "")


def close_table(results: list[dict[str, Any]]) -> list[str]:
    lines = [
        "| server | requests | failed | failed /10^6 | p99 steady | p99 in reloads | ratio "
        "| generator rate | wrk requests | wrk failed | wrk failed /10^6 | reload window median / max |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        lg, wrk = _cell(r, "close"), _cell(r, "close-wrk")
        failed, fpm = _failed(lg)
        wfailed, wfpm = _failed(wrk)
        lines.append(
            f"| {_row_name(r)} | {_num(_get(lg, 'requests'))} | {failed} | {fpm} "
            f"| {_ms(_get(lg, 'p99_steady_s'))} | {_ms(_get(lg, 'p99_reload_s'))} | {_ratio(lg)} "
            f"| {_num(_get(lg, 'rate'), '{:,.0f}/s')} | {_num(_get(wrk, 'requests'))} | {wfailed} "
            f"| {wfpm} | {_reload_window(lg)} |"
        )
    return lines


def keepalive_table(results: list[dict[str, Any]]) -> list[str]:
    lines = [
        "| server | requests | failed | failed /10^6 | reconnects (in reload windows) "
        "| p99 steady | p99 in reloads | ratio | generator rate | wrk requests | wrk failed "
        "| wrk failed /10^6 |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        lg, wrk = _cell(r, "keepalive"), _cell(r, "keepalive-wrk")
        failed, fpm = _failed(lg)
        wfailed, wfpm = _failed(wrk)
        reconnects = "-" if lg is None else f"{lg['reconnects']:,} ({lg['reconnects_in_reload']:,})"
        lines.append(
            f"| {_row_name(r)} | {_num(_get(lg, 'requests'))} | {failed} | {fpm} | {reconnects} "
            f"| {_ms(_get(lg, 'p99_steady_s'))} | {_ms(_get(lg, 'p99_reload_s'))} | {_ratio(lg)} "
            f"| {_num(_get(lg, 'rate'), '{:,.0f}/s')} | {_num(_get(wrk, 'requests'))} | {wfailed} | {wfpm} |"
        )
    return lines


def idle_table(results: list[dict[str, Any]], connections: int) -> list[str]:
    lines = [
        f"| server | of {connections} idle connections, still answering on the same connection "
        "| closed by the server | first / last close after the reload began | reload window |",
        "|---|---:|---:|---:|---:|",
    ]
    for r in results:
        c = _cell(r, "idle")
        if c is None:
            lines.append(f"| {_row_name(r)} | - | - | - | - |")
            continue
        closes = (
            f"{_ms(c['first_close_s'])} / {_ms(c['last_close_s'])}"
            if c["closed_by_server"]
            else "-"
        )
        lines.append(
            f"| {_row_name(r)} | {c['survived']} | {c['closed_by_server']} | {closes} "
            f"| {_reload_window(c)} |"
        )
    return lines


def notes(results: list[dict[str, Any]]) -> list[str]:
    lines = []
    for r in results:
        items = [f"not run: {r['not_run'].strip().splitlines()[-1]}"] if "not_run" in r else []
        items += [r["timed_out"]] if "timed_out" in r else []
        items += [n for n in r.get("notes", []) if n]
        for name, cell in r.get("cells", {}).items():
            if "error" in cell or "not_run" in cell:
                items.append(f"{name}: {cell.get('error') or 'not run: ' + cell['not_run']}")
                continue
            if cell.get("failures"):
                detail = ", ".join(f"{k} {v}" for k, v in sorted(cell["failures"].items()))
                items.append(f"{name}: failures by class: {detail}")
            if cell.get("client") == "wrk" and cell.get("failed"):
                errs = ", ".join(f"{k} {v}" for k, v in cell["errors"].items() if v)
                items.append(
                    f"{name}: wrk socket errors: {errs or 'none'}; non-2xx {cell['non_2xx']}"
                )
            if cell.get("answered_by"):
                who = ", ".join(f"{v} by '{k}'" for k, v in cell["answered_by"].items())
                items.append(f"{name}: second request answered {who}")
            if cell.get("reconnect_causes"):
                causes = ", ".join(f"{k} {v}" for k, v in sorted(cell["reconnect_causes"].items()))
                items.append(f"{name}: reconnect causes: {causes}")
            if cell.get("reloads", {}).get("messages"):
                items.append(f"{name}: failed reloads: {'; '.join(cell['reloads']['messages'])}")
            if "generator_cpu" in cell:
                items.append(
                    f"{name}: generator {cell['processes']} processes at "
                    f"{100 * cell['generator_cpu']:.0f}% CPU"
                )
        if items:
            lines.append(f"- **{r['label']}**: " + "; ".join(items))
    return lines


def render_markdown(doc: dict[str, Any]) -> str:
    m, o = doc["machine"], doc["options"]
    results = doc["rows"]
    load_before, load_after = doc["loadavg_before"], doc["loadavg_after"]
    lines = [
        "# Reload matrix",
        "",
        "Reproduce (as root, for the private network namespaces):",
        "",
        f"    {doc['command']}",
        "",
        f"- Date: {doc['date']}; whole run {doc['wall_s']:.0f} s.",
        f"- Machine: {m['cpus']} CPUs ({m['cpu_model'] or 'unknown model'}), {m['memory_gib']} GiB, "
        f"Linux {m['kernel']}, {m['os']}, Python {m['python']}. Load average before "
        f"{load_before[0]:.2f} / after {load_after[0]:.2f} (1 min): the cores were shared with "
        "other work, so rates and latencies are noisy; failure counts are not.",
        f"- Each cell: {o['duration']:g} s of load from {o['concurrency']} concurrent clients with "
        f"{o['reloads']} reloads (one every {o['duration'] / (o['reloads'] + 1):.2f} s); the same "
        "server instance serves every cell of its row. Clients, servers and reloads share the "
        "machine. "
        + (
            "Each row runs in its own private network namespace, over its loopback."
            if doc["netns"]
            else "Rows run on the host's loopback (no network namespaces)."
        ),
        "- Goals (issues 4 and 8): 0 failed per 10^6 in both modes; p99 in reload windows within "
        f"{GOAL_P99_RATIO}x of steady state; 0 reconnects caused by reloads; every idle connection "
        "still answers. **Bold** marks a miss.",
        "- Reload window: from the reload request until the old generation's processes have "
        "exited (nodrop: the supervisor's own report; others: their old worker pids watched in "
        "/proc). wrk only gives totals, with no attribution to reload windows.",
        "",
        "## Close mode: a new connection per request (`Connection: close`)",
        "",
        *close_table(results),
        "",
        "## Keep-alive mode: each client reuses one HTTP/1.1 connection",
        "",
        *keepalive_table(results),
        "",
        f"## Idle connections: {o['idle_connections']} idle keep-alive connections, one reload",
        "",
        *idle_table(results, o["idle_connections"]),
        "",
        "## Details",
        "",
        *notes(results),
        "",
        f"Tools: {'; '.join(doc['tools'])}.",
        "",
    ]
    return "\n".join(lines)
