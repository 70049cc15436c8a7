"""Pure parts of the load generator, table-driven: classifier, HTTP parser,
histogram, windows, samples wire form, statistics and the text table."""

from __future__ import annotations

import array
import errno
import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from nodrop.errors import ConfigError, ProtocolError
from nodrop.load import Histogram, LoadConfig, Mode, Outcome, ReloadRecord, classify, format_table
from nodrop.load.http import ResponseParser, build_request
from nodrop.load.runner import reload_schedule, split
from nodrop.load.samples import CLEAN_CLOSE, Samples, decode, encode
from nodrop.load.stats import WindowIndex, merge_windows, summarize

# --- classifier ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "expected"),
    [
        ({"complete": True, "status": 200}, Outcome.OK),
        ({"complete": True, "status": 404}, Outcome.OK),
        ({"complete": True, "status": 500}, Outcome.BAD_STATUS),
        ({"complete": True, "status": 503}, Outcome.BAD_STATUS),
        ({"complete": True, "status": None}, Outcome.OK),  # tcp line mode
        ({"malformed": True}, Outcome.BAD_STATUS),
        ({}, Outcome.EOF),
        ({"status": 200}, Outcome.EOF),  # head but body cut short
        ({"error": ConnectionRefusedError(errno.ECONNREFUSED, "x")}, Outcome.REFUSED),
        ({"error": ConnectionResetError(errno.ECONNRESET, "x")}, Outcome.RESET),
        ({"error": ConnectionAbortedError(errno.ECONNABORTED, "x")}, Outcome.RESET),
        ({"error": BrokenPipeError(errno.EPIPE, "x")}, Outcome.BROKEN_PIPE),
        ({"error": TimeoutError()}, Outcome.TIMEOUT),
        ({"error": OSError(errno.ETIMEDOUT, "x")}, Outcome.TIMEOUT),
        ({"error": OSError(errno.EHOSTUNREACH, "x")}, Outcome.OTHER),
        ({"error": OSError("no errno")}, Outcome.OTHER),
        ({"error": EOFError()}, Outcome.EOF),
        ({"error": RuntimeError("x")}, Outcome.OTHER),
        # A complete response wins over an error after it.
        ({"error": ConnectionResetError(errno.ECONNRESET, "x"), "complete": True}, Outcome.OK),
    ],
)
def test_classify(kwargs: dict[str, object], expected: Outcome) -> None:
    assert classify(**kwargs) is expected  # type: ignore[arg-type]


# --- HTTP parser ----------------------------------------------------------------


def _parse(chunks: list[bytes], eof: bool = False) -> ResponseParser:
    parser = ResponseParser()
    for chunk in chunks:
        parser.feed(chunk)
    if eof:
        parser.feed_eof()
    return parser


WHOLE = [
    (b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok", 200, True),
    (b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n", 200, True),
    (b"HTTP/1.1 204 No Content\r\n\r\n", 204, True),
    (b"HTTP/1.1 304 Not Modified\r\nContent-Length: 9\r\n\r\n", 304, True),
    (b"HTTP/1.1 503 Busy\r\nContent-Length: 1\r\nConnection: close\r\n\r\nx", 503, False),
    (b"HTTP/1.0 200 OK\r\nContent-Length: 1\r\n\r\nx", 200, False),
    (b"HTTP/1.0 200 OK\r\nContent-Length: 1\r\nConnection: Keep-Alive\r\n\r\nx", 200, True),
    (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nok\r\n0\r\n\r\n", 200, True),
    (
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"3;ext=1\r\nabc\r\nA\r\n0123456789\r\n0\r\nX-Trailer: 1\r\n\r\n",
        200,
        True,
    ),
    (b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 1\r\n\r\nx", 200, True),
    (b"HTTP/1.1 200\r\nContent-Length: 1\r\n\r\nx", 200, True),  # empty reason
]


@pytest.mark.parametrize(("raw", "status", "keep_alive"), WHOLE)
def test_parser_complete_responses(raw: bytes, status: int, keep_alive: bool) -> None:
    whole = _parse([raw])
    assert (whole.complete, whole.status, whole.keep_alive) == (True, status, keep_alive)
    bytewise = _parse([raw[i : i + 1] for i in range(len(raw))])
    assert (bytewise.complete, bytewise.status, bytewise.keep_alive) == (True, status, keep_alive)


@pytest.mark.parametrize(
    "raw",
    [
        b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nok",  # body short
        b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n",  # head unfinished
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nok\r\n",  # no last chunk
        b"",
    ],
)
def test_parser_incomplete_at_eof(raw: bytes) -> None:
    parser = _parse([raw], eof=True)
    assert not parser.complete


def test_parser_body_until_eof() -> None:
    parser = _parse([b"HTTP/1.1 200 OK\r\n\r\nsome", b" body"])
    assert not parser.complete
    assert not parser.keep_alive
    assert parser.feed_eof()


@pytest.mark.parametrize(
    "raw",
    [
        b"SSH-2.0-OpenSSH_9\r\n",
        b"HTTP/2 200\r\n\r\n",
        b"HTTP/1.1 2000 OK\r\n\r\n",
        b"HTTP/1.1 abc OK\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nno colon\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Length: -1\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nokXX",
    ],
)
def test_parser_rejects_malformed(raw: bytes) -> None:
    with pytest.raises(ProtocolError):
        _parse([raw])


@pytest.mark.parametrize(
    ("host", "keep_alive", "expected"),
    [
        (
            "127.0.0.1",
            False,
            b"GET /x HTTP/1.1\r\nHost: 127.0.0.1:8080\r\nUser-Agent: nodrop-load\r\n"
            b"Connection: close\r\n\r\n",
        ),
        (
            "::1",
            True,
            b"GET /x HTTP/1.1\r\nHost: [::1]:8080\r\nUser-Agent: nodrop-load\r\n"
            b"Connection: keep-alive\r\n\r\n",
        ),
    ],
)
def test_build_request(host: str, keep_alive: bool, expected: bytes) -> None:
    assert build_request(host, 8080, "/x", keep_alive=keep_alive) == expected


@pytest.mark.parametrize("path", ["x", "/a b", "/a\r\nX: y"])
def test_build_request_rejects_bad_path(path: str) -> None:
    with pytest.raises(ValueError, match="bad request path"):
        build_request("h", 1, path, keep_alive=True)


# --- histogram -------------------------------------------------------------------

# (values, q, exact nearest-rank answer)
PERCENTILES = [
    ([0.001], 50, 0.001),
    ([0.001], 100, 0.001),
    ([0.001, 0.002, 0.003, 0.004], 50, 0.002),
    ([0.001, 0.002, 0.003, 0.004], 75, 0.003),
    ([0.001, 0.002, 0.003, 0.004], 76, 0.004),
    ([i / 1000 for i in range(1, 101)], 99, 0.099),
    ([i / 1000 for i in range(1, 1001)], 99.9, 0.999),
    ([i / 1000 for i in range(1, 1001)], 99, 0.990),
    ([0.0005] * 999 + [2.0], 99.9, 0.0005),
    ([0.0005] * 998 + [2.0, 2.0], 99.9, 2.0),
    ([1e-9, 1e-9, 5.0], 50, 1e-9),  # below the floor: reported as the floor, clamped to min
]


@pytest.mark.parametrize(("values", "q", "exact"), PERCENTILES)
def test_histogram_percentile_within_bound(values: list[float], q: float, exact: float) -> None:
    hist = Histogram()
    hist.extend(values)
    got = hist.percentile(q)
    assert got is not None
    if exact < 1e-6:
        assert got <= 1e-6
    else:
        assert abs(got - exact) <= exact * hist.relative_error * (1 + 1e-9)


@given(
    st.lists(st.floats(min_value=1e-6, max_value=100.0), min_size=1, max_size=300),
    st.floats(min_value=0.1, max_value=100.0),
)
def test_histogram_error_bound_property(values: list[float], q: float) -> None:
    hist = Histogram()
    hist.extend(values)
    exact = sorted(values)[max(1, math.ceil(q / 100 * len(values) - 1e-9)) - 1]
    got = hist.percentile(q)
    assert got is not None
    assert abs(got - exact) <= exact * hist.relative_error * (1 + 1e-6)


def test_histogram_merge_equals_one_histogram() -> None:
    values = [i * 0.0007 for i in range(1, 500)]
    one, a, b = Histogram(), Histogram(), Histogram()
    one.extend(values)
    a.extend(values[:200])
    b.extend(values[200:])
    a.merge(b)
    assert a.to_dict() == one.to_dict()
    assert Histogram.from_dict(one.to_dict()).to_dict() == one.to_dict()
    for q in (50, 99, 99.9, 100):
        assert a.percentile(q) == one.percentile(q)
    assert one.percentile(100) == one.max == values[-1]
    with pytest.raises(ValueError, match="different parameters"):
        a.merge(Histogram(relative_error=0.01))


def test_histogram_empty() -> None:
    assert Histogram().percentile(50) is None
    with pytest.raises(ValueError, match="q must be in"):
        Histogram().percentile(0)


# --- windows, samples, stats ---------------------------------------------------


def test_merge_windows() -> None:
    assert merge_windows([(5, 6), (1, 2), (1.5, 3), (3, 4)]) == [(1, 4), (5, 6)]
    assert merge_windows([]) == []


@pytest.mark.parametrize(
    ("start", "end", "overlaps"),
    [
        (0, 0.5, False),
        (0, 1, True),
        (1.5, 1.6, True),
        (2.5, 2.9, False),
        (2.9, 10, True),
        (3, 3, True),
        (4.01, 5, False),
        (2, 2, True),
    ],
)
def test_window_index(start: float, end: float, overlaps: bool) -> None:
    index = WindowIndex([(3, 4), (1, 2)])
    assert index.overlaps(start, end) is overlaps


def test_samples_round_trip() -> None:
    s = Samples(cpu_seconds=1.5, wall_seconds=2.0)
    s.starts.extend([1.0, 2.0])
    s.latencies.extend([0.1, 0.2])
    s.outcomes.extend([0, 3])
    s.reconnect_times.append(2.2)
    s.reconnect_causes.append(CLEAN_CLOSE)
    back = decode(encode(s))
    assert back == s
    with pytest.raises(ProtocolError):
        decode(encode(s)[:-1])
    with pytest.raises(ProtocolError):
        decode(b"garbage")


def _samples(rows: list[tuple[float, float, Outcome]]) -> Samples:
    s = Samples(cpu_seconds=1.0, wall_seconds=2.0)
    for start, latency, outcome in rows:
        s.starts.append(start)
        s.latencies.append(latency)
        s.outcomes.append(outcome)
    return s


def test_summarize_splits_steady_and_reload() -> None:
    config = LoadConfig(host="127.0.0.1", port=1, duration=3.0)
    t0 = 100.0
    rows = [
        (t0 + 0.1, 0.001, Outcome.OK),  # steady, second 0
        (t0 + 0.9, 0.2, Outcome.OK),  # ends at 1.1: overlaps the window -> reload
        (t0 + 1.5, 0.010, Outcome.OK),  # inside the window
        (t0 + 1.6, 0.001, Outcome.REFUSED),  # inside the window, failed
        (t0 + 2.5, 0.002, Outcome.OK),  # steady, second 2
        (t0 + 2.9, 0.5, Outcome.TIMEOUT),  # ends after the end: lands in second 2
    ]
    samples = _samples(rows)
    samples.reconnect_times.extend([t0 + 1.2, t0 + 2.7])
    samples.reconnect_causes.extend([CLEAN_CLOSE, int(Outcome.RESET)])
    reload = ReloadRecord(t0 + 1.0, t0 + 1.1, t0 + 1.8, True, "fake")
    result = summarize(config, samples, [reload], started=t0, ended=t0 + 3.0, processes=2)
    assert result.attempts == 6
    assert result.ok == 4
    assert result.failed == 2
    assert result.outcomes["refused"] == 1
    assert result.outcomes["timeout"] == 1
    assert result.outcomes_in_reload["ok"] == 2
    assert result.outcomes_in_reload["refused"] == 1
    assert result.steady.count == 2
    assert result.reload.count == 2
    assert result.reload.max == pytest.approx(0.2)
    assert result.steady.max == pytest.approx(0.002)
    assert result.reconnects == 2
    assert result.reconnects_in_reload == 1
    assert result.reconnect_causes == {"clean_close": 1, "reset": 1}
    assert [s.attempts for s in result.timeline] == [1, 3, 2]
    assert [s.errors for s in result.timeline] == [0, 1, 1]
    assert result.ended == pytest.approx(t0 + 3.4)
    assert result.generator_cpu == pytest.approx(0.25)
    assert result.failed_per_million == pytest.approx(1e6 / 3)
    data = result.to_dict()
    assert data["attempts"] == 6
    reloads = data["reloads"]
    assert isinstance(reloads, list)
    assert reloads[0]["window"] == [t0 + 1.0, t0 + 1.8]
    text = format_table(result)
    for needle in ("attempts", "refused", "timeout", "p99.9", "reconnects", "fake", "ratio"):
        assert needle in text


def test_summarize_empty_run() -> None:
    config = LoadConfig(host="127.0.0.1", port=1, duration=2.0)
    result = summarize(config, Samples(), [], started=5.0, ended=7.0, processes=1)
    assert result.attempts == 0
    assert result.overall.p99 is None
    assert len(result.timeline) == 2
    assert result.achieved_rate == 0
    assert "-" in format_table(result)


# --- config and schedule ---------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs",
    [
        {"port": 0},
        {"concurrency": 0},
        {"duration": 0},
        {"max_requests": 0},
        {"processes": 0},
        {"reloads": 2},
        {"path": "x"},
        {"tcp_line": "a\nb"},
    ],
)
def test_config_rejects(kwargs: dict[str, object]) -> None:
    base: dict[str, object] = {"host": "127.0.0.1", "port": 80}
    with pytest.raises(ConfigError):
        LoadConfig(**(base | kwargs))  # type: ignore[arg-type]


def test_config_processes_capped_by_concurrency() -> None:
    assert LoadConfig(host="h", port=1, concurrency=1, processes=4).effective_processes() == 1
    assert LoadConfig(host="h", port=1, mode=Mode.TCP, processes=3).effective_processes() == 3


@pytest.mark.parametrize(
    ("total", "parts", "expected"),
    [(10, 3, [4, 3, 3]), (2, 2, [1, 1]), (1, 2, [1, 0]), (0, 1, [0])],
)
def test_split(total: int, parts: int, expected: list[int]) -> None:
    assert split(total, parts) == expected


def test_reload_schedule() -> None:
    assert reload_schedule(10.0, 20.0, 3.0, 5) == [13.0, 16.0, 19.0]
    assert reload_schedule(10.0, 20.0, 3.0, 2) == [13.0, 16.0]
    assert reload_schedule(10.0, 20.0, 1.0, 0) == []


def test_array_typecodes_match_wire_sizes() -> None:
    assert array.array("d").itemsize == 8
    assert array.array("B").itemsize == 1
