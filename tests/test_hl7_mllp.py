"""MLLP framing (pure): frames split anywhere, pipelined, oversize read to the end, garbage."""

from __future__ import annotations

import hashlib
from itertools import pairwise

from hypothesis import given, settings
from hypothesis import strategies as st

from ingest.mllp import FrameReader, frame_message

payloads = st.binary(max_size=300).map(lambda b: b.replace(b"\x0b", b"").replace(b"\x1c", b""))


def feed_in_chunks(reader: FrameReader, data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts} | {0, len(data)})
    frames = []
    for start, end in pairwise(points):
        frames += reader.feed(data[start:end])
    return [f.payload for f in frames]


@settings(max_examples=150, deadline=None)
@given(st.lists(payloads, max_size=6), st.lists(st.integers(min_value=0), max_size=12))
def test_frames_survive_any_split(messages: list[bytes], cuts: list[int]) -> None:
    stream = b"".join(frame_message(m) for m in messages)
    reader = FrameReader(max_bytes=10_000)
    assert feed_in_chunks(reader, stream, cuts) == messages
    assert reader.error is None and reader.idle


@settings(max_examples=150, deadline=None)
@given(
    st.lists(payloads, min_size=1, max_size=5),
    st.lists(st.integers(min_value=0), max_size=12),
    st.integers(min_value=1, max_value=120),
)
def test_oversize_frames_are_read_to_their_end(
    messages: list[bytes], cuts: list[int], cap: int
) -> None:
    stream = b"".join(frame_message(m) for m in messages)
    reader = FrameReader(max_bytes=cap)
    points = sorted({c % (len(stream) + 1) for c in cuts} | {0, len(stream)})
    frames = []
    for start, end in pairwise(points):
        frames += reader.feed(stream[start:end])
    assert [(f.size, f.sha256, f.oversize) for f in frames] == [
        (len(m), hashlib.sha256(m).hexdigest(), len(m) > cap) for m in messages
    ]
    assert [f.payload for f in frames] == [m[:cap] for m in messages]


def test_noise_between_frames_is_tolerated() -> None:
    reader = FrameReader(100)
    frames = reader.feed(b"\r\n" + frame_message(b"A") + b"\n\r " + frame_message(b"B"))
    assert [f.payload for f in frames] == [b"A", b"B"]


def test_garbage_sets_the_error_after_completed_frames() -> None:
    reader = FrameReader(100)
    frames = reader.feed(frame_message(b"A") + b"junk" + frame_message(b"B"))
    assert [f.payload for f in frames] == [b"A"]
    assert reader.error is not None
    assert reader.feed(frame_message(b"C")) == []


def test_partial_frame_is_not_idle() -> None:
    reader = FrameReader(100)
    assert reader.feed(b"\x0bMSH|") == []
    assert not reader.idle
    assert [f.payload for f in reader.feed(b"x\x1c\r")] == [b"MSH|x"]


def test_fs_without_cr_stays_inside_the_frame() -> None:
    reader = FrameReader(100)
    assert [f.payload for f in reader.feed(b"\x0ba\x1cb\x1c\r")] == [b"a\x1cb"]
