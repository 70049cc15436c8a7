"""The HTML report: self-contained, and it renders in a real (headless) browser."""

from __future__ import annotations

import os
import re
import struct
import subprocess
import zlib
from pathlib import Path

import pytest

from nodrop.load import LoadConfig, LoadResult, Mode, Outcome, ReloadRecord, render_html
from nodrop.load.html import nice_ticks
from nodrop.load.samples import CLEAN_CLOSE, Samples
from nodrop.load.stats import summarize

CHROMIUM = Path("/usr/bin/chromium")
BROWSER_TIMEOUT = 90
CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


def _result() -> LoadResult:
    """A synthetic 8 s keepalive run: steady traffic, two reloads, errors in the second."""
    config = LoadConfig(host="127.0.0.1", port=8080, mode=Mode.KEEPALIVE, duration=8.0)
    t0 = 1000.0
    s = Samples(cpu_seconds=4.0, wall_seconds=8.0)
    for i in range(8000):
        start = t0 + i / 1000
        in_reload = 5.0 <= i / 1000 < 5.4
        outcome = Outcome.OK
        if in_reload and i % 40 == 0:
            outcome = Outcome.RESET if i % 80 else Outcome.REFUSED
        s.starts.append(start)
        s.latencies.append(0.004 if in_reload else 0.001 + (i % 7) * 0.0001)
        s.outcomes.append(outcome)
    s.reconnect_times.extend([t0 + 2.1, t0 + 5.1])
    s.reconnect_causes.extend([CLEAN_CLOSE, int(Outcome.RESET)])
    reloads = [
        ReloadRecord(t0 + 2.0, t0 + 2.1, t0 + 2.3, True, "generation 2 ready"),
        ReloadRecord(t0 + 5.0, t0 + 5.2, t0 + 5.4, False, "old generation <killed>"),
    ]
    return summarize(config, s, reloads, started=t0, ended=t0 + 8.0, processes=2)


def test_html_is_self_contained() -> None:
    page = render_html(_result())
    assert page.startswith("<!DOCTYPE html>")
    assert 'id="timeline"' in page
    assert "<svg" in page
    assert page.count('class="reload"') == 2
    assert "&lt;killed&gt;" in page  # messages are escaped
    assert not re.search(r"(src|href)\s*=", page)  # no external assets
    assert "http://" not in page.replace('xmlns="http://www.w3.org/2000/svg"', "")
    assert "<script" not in page


@pytest.mark.parametrize(
    ("high", "ticks"),
    [
        (0, [0.0, 1.0]),
        (10, [0, 5, 10]),
        (37, [0, 10, 20, 30, 40]),
        (0.9, [0, 0.5, 1.0]),
        (0.7, [0, 0.2, 0.4, 0.6, 0.8]),
    ],
)
def test_nice_ticks(high: float, ticks: list[float]) -> None:
    assert nice_ticks(high, 4) == pytest.approx(ticks)


def _png_pixels(data: bytes) -> tuple[int, int, int, list[bytes]]:
    """Decode an 8-bit RGB/RGBA non-interlaced PNG (stdlib only): width, height, bpp, rows."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    pos, idat, header = 8, bytearray(), b""
    while pos < len(data):
        (length,) = struct.unpack(">I", data[pos : pos + 4])
        kind = data[pos + 4 : pos + 8]
        body = data[pos + 8 : pos + 8 + length]
        pos += 12 + length
        if kind == b"IHDR":
            header = body
        elif kind == b"IDAT":
            idat += body
        elif kind == b"IEND":
            break
    width, height, depth, colour, _, _, interlace = struct.unpack(">IIBBBBB", header)
    assert (depth, interlace) == (8, 0), (depth, colour, interlace)
    assert colour in (2, 6), (depth, colour, interlace)
    bpp = 3 if colour == 2 else 4
    raw = zlib.decompress(bytes(idat))
    stride = width * bpp
    rows: list[bytes] = []
    prev = bytearray(stride)
    for y in range(height):
        kind = raw[y * (stride + 1)]
        line = bytearray(raw[y * (stride + 1) + 1 : (y + 1) * (stride + 1)])
        for i in range(stride):
            left = line[i - bpp] if i >= bpp else 0
            up = prev[i]
            upleft = prev[i - bpp] if i >= bpp else 0
            if kind == 1:
                line[i] = (line[i] + left) & 0xFF
            elif kind == 2:
                line[i] = (line[i] + up) & 0xFF
            elif kind == 3:
                line[i] = (line[i] + (left + up) // 2) & 0xFF
            elif kind == 4:
                p = left + up - upleft
                pa, pb, pc = abs(p - left), abs(p - up), abs(p - upleft)
                pred = left if pa <= pb and pa <= pc else (up if pb <= pc else upleft)
                line[i] = (line[i] + pred) & 0xFF
        rows.append(bytes(line))
        prev = line
    return width, height, bpp, rows


@pytest.mark.skipif(not CHROMIUM.exists(), reason="/usr/bin/chromium is not installed")
def test_report_renders_in_headless_chromium(tmp_path: Path) -> None:
    page = tmp_path / "report.html"
    page.write_text(render_html(_result()))
    shot = tmp_path / "shot.png"
    base = [str(CHROMIUM), *CHROMIUM_FLAGS, f"--user-data-dir={tmp_path / 'profile'}"]
    env = os.environ | {"HOME": str(tmp_path)}
    subprocess.run(
        [*base, f"--screenshot={shot}", "--window-size=1200,900", page.as_uri()],
        capture_output=True,
        timeout=BROWSER_TIMEOUT,
        check=True,
        env=env,
    )
    dom = subprocess.run(
        [*base, "--dump-dom", page.as_uri()],
        capture_output=True,
        text=True,
        timeout=BROWSER_TIMEOUT,
        check=True,
        env=env,
    ).stdout
    assert 'id="timeline"' in dom
    assert "<polyline" in dom
    assert 'id="summary"' in dom

    width, height, bpp, rows = _png_pixels(shot.read_bytes())
    assert (width, height) == (1200, 900)
    pixels = [row[i : i + 3] for row in rows[::4] for i in range(0, len(row), bpp * 4)]
    colours = set(pixels)
    white = sum(1 for p in pixels if p == b"\xff\xff\xff")
    assert len(colours) > 20, "the screenshot is (nearly) one colour"
    assert white < 0.97 * len(pixels), "the screenshot is blank"

    # The reload band's salmon (#f4a582 at 45% on white) and the rate line's blue are drawn.
    def near(p: bytes, rgb: tuple[int, int, int]) -> bool:
        return all(abs(a - b) <= 12 for a, b in zip(p, rgb, strict=True))

    assert any(near(p, (0xF9, 0xD2, 0xC0)) for p in pixels), "no shaded reload window"
    assert any(near(p, (0x1F, 0x77, 0xB4)) for p in pixels), "no requests/s line"
