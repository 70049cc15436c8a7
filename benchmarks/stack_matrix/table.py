"""The results table of a matrix run (pure: dicts in, text out)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from stack_matrix.exercise import CLIENTS


def _cell_text(client: dict[str, Any] | None) -> str:
    if client is None:
        return "-"
    if client.get("error"):
        return "ERROR"
    text = f"{client['failed']}/{client['ok'] + client['failed']}"
    if client["reconnects"]:
        text += f" r{client['reconnects']}"
    return text


def render(results: Sequence[dict[str, Any]], clients: Sequence[str] = CLIENTS) -> str:
    """One row per cell: reloads that succeeded, then per client
    ``failed/attempts`` and ``rN`` reconnects the server asked for."""
    width = max([len(r["id"]) for r in results] + [4])
    header = f"{'cell':<{width}}  {'reloads':>7}  " + "  ".join(f"{c:>14}" for c in clients)
    lines = [header, "-" * len(header)]
    notes: list[str] = []
    for result in results:
        if result.get("skipped"):
            lines.append(f"{result['id']:<{width}}  skipped: {result['skipped']}")
            continue
        reloads = result.get("reloads", [])
        done = f"{sum(r['ok'] for r in reloads)}/{len(reloads)}"
        by_client = result.get("clients", {})
        row = f"{result['id']:<{width}}  {done:>7}  " + "  ".join(
            f"{_cell_text(by_client.get(c)):>14}" for c in clients
        )
        lines.append(row)
        if result.get("error"):
            notes.append(f"{result['id']}: {result['error']}")
        for name in clients:
            client = by_client.get(name)
            if client is None:
                continue
            if client.get("error"):
                notes.append(f"{result['id']} {name}: client error: {client['error']}")
            parts = [f"{k} {v}" for k, v in sorted(client["failures"].items())]
            parts += [
                f"[{k} {v}]" for k, v in sorted(client.get("extra", {}).items()) if k != "requests"
            ]
            if parts:
                notes.append(f"{result['id']} {name}: " + ", ".join(parts))
    lines.append("")
    lines.append(
        "failed/attempts per client; rN: reconnects the server asked for (Connection: close, WebSocket 1012)"
    )
    if notes:
        lines.append("")
        lines.append("by class ([...]: counted, not failures):")
        lines += [f"  {n}" for n in notes]
    return "\n".join(lines)
