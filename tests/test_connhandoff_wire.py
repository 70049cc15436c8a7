"""The connection-handoff messages and the WebSocket codec: pure, table-driven."""

from __future__ import annotations

import asyncio

import pytest

from nodrop.connhandoff.websocket import OP_TEXT, accept_key, encode_frame, read_frame
from nodrop.connhandoff.wire import (
    MAX_STATE,
    Verdict,
    decode_states,
    encode_states,
    plan_batches,
    split_evenly,
)
from nodrop.errors import ProtocolError


@pytest.mark.parametrize(
    ("sizes", "kwargs", "expected"),
    [
        ([], {}, []),
        ([0] * 500, {}, [(0, 253), (253, 500)]),
        ([0] * 5, {"max_batch": 2}, [(0, 2), (2, 4), (4, 5)]),
        ([MAX_STATE] * 10, {}, [(0, 5), (5, 10)]),  # 32 KiB of base64 per batch
    ],
)
def test_plan_batches(
    sizes: list[int], kwargs: dict[str, int], expected: list[tuple[int, int]]
) -> None:
    assert plan_batches(sizes, **kwargs) == expected


def test_oversized_state_is_refused() -> None:
    with pytest.raises(ProtocolError):
        plan_batches([MAX_STATE + 1])
    with pytest.raises(ProtocolError):
        encode_states([b"x" * (MAX_STATE + 1)])


@pytest.mark.parametrize(
    ("pending", "rooms", "expected"),
    [
        (10, [100, 100], [5, 5]),
        (10, [3, 100], [3, 7]),
        (10, [2, 2], [2, 2]),
        (1, [5, 5], [1, 0]),
        (5, [], []),
    ],
)
def test_split_evenly(pending: int, rooms: list[int], expected: list[int]) -> None:
    assert split_evenly(pending, rooms) == expected


def test_states_round_trip_and_reject_garbage() -> None:
    states = [b"", b"\x00session=1", b"x" * MAX_STATE]
    assert decode_states(encode_states(states), 3) == states
    assert decode_states({}, 2) == [b"", b""]
    for bad in ({"states": "x"}, {"states": ["a"]}, {"states": [1, 2]}, {"states": ["***", ""]}):
        with pytest.raises(ProtocolError):
            decode_states(bad, 2)


@pytest.mark.parametrize(
    ("header", "ok"),
    [
        ({"placed": 2, "closed": 0, "returned": [2]}, True),
        ({"placed": 3, "closed": 0, "returned": [2]}, False),
        ({"placed": 1, "closed": 0, "returned": [2, 2]}, False),
        ({"placed": 2, "closed": 0, "returned": [3]}, False),
        ({"placed": True, "closed": 1, "returned": [0]}, False),
        ({"placed": 3}, False),
    ],
)
def test_verdict_must_cover_the_batch(header: dict[str, object], ok: bool) -> None:
    if ok:
        assert Verdict.from_header(header, 3).to_header()["count"] == 3
    else:
        with pytest.raises(ProtocolError):
            Verdict.from_header(header, 3)


def test_websocket_accept_key_rfc_example() -> None:
    assert accept_key("dGhlIHNhbXBsZSBub25jZQ==") == "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="


@pytest.mark.parametrize("size", [0, 5, 125, 126, 70000])
def test_websocket_frames_round_trip(size: int) -> None:
    payload = bytes(range(256)) * (size // 256) + bytes(size % 256)

    async def main() -> tuple[bool, int, bytes]:
        reader = asyncio.StreamReader()
        reader.feed_data(encode_frame(OP_TEXT, payload, mask=b"abcd"))
        return await read_frame(reader)

    assert asyncio.run(main()) == (True, OP_TEXT, payload)


def test_websocket_unmasked_client_frame_is_refused() -> None:
    async def main() -> None:
        reader = asyncio.StreamReader()
        reader.feed_data(encode_frame(OP_TEXT, b"hi"))
        await read_frame(reader)

    with pytest.raises(ProtocolError):
        asyncio.run(main())
