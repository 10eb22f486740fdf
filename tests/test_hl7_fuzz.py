"""Fuzzing the listener (hypothesis) over a real socket with python-hl7's MLLPClient:
mutated valid messages (dropped, repeated and swapped segments and fields, odd separators,
bad encodings), random bytes, truncated and oversized frames. The listener never crashes,
every well-framed message gets exactly one ACK, the journal holds every one of them."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from datetime import UTC, datetime

import hl7
import pytest
from hl7.client import MLLPClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy.orm import Session, sessionmaker

from ingest.hl7_process import Binding, decide_message
from locator.config import Settings
from locator.core.journal import Outcome
from locator.trusts import TrustRegistry, example_trusts
from tests.hl7_messages.helpers import CR, EB, SB, ListenerHarness, fixture_names, load

CAP = 4096
SEEDS = [load(name) for name in fixture_names()]
REGISTRY = TrustRegistry(example_trusts())


def _clean(data: bytes) -> bytes:
    """Keep the frame well formed: no start or end block inside the content."""
    return data.replace(SB, b"").replace(EB, b"")


@st.composite
def mutated(draw: st.DrawFn) -> bytes:
    seed = draw(st.sampled_from(SEEDS)).replace(b"\r\n", b"\r").replace(b"\n", b"\r")
    segments = [s for s in seed.split(b"\r") if s]
    for _ in range(draw(st.integers(0, 3))):
        op = draw(st.sampled_from(["drop", "repeat", "swap", "field", "sep", "bytes"]))
        i = draw(st.integers(0, len(segments) - 1)) if segments else 0
        if not segments:
            break
        if op == "drop":
            del segments[i]
        elif op == "repeat":
            segments.insert(i, segments[i])
        elif op == "swap":
            j = draw(st.integers(0, len(segments) - 1))
            segments[i], segments[j] = segments[j], segments[i]
        elif op == "field":
            fields = segments[i].split(b"|")
            k = draw(st.integers(0, len(fields) - 1))
            action = draw(st.sampled_from(["drop", "dup", "junk", "null"]))
            if action == "drop":
                del fields[k]
            elif action == "dup":
                fields.insert(k, fields[k])
            elif action == "junk":
                fields[k] = draw(st.binary(max_size=20))
            else:
                fields[k] = b'""'
            segments[i] = b"|".join(fields)
        elif op == "sep":
            segments[i] = segments[i].replace(
                b"^", draw(st.sampled_from([b"|", b"~", b"&", b"\\", b"^^"]))
            )
        else:
            segments[i] += draw(st.sampled_from([b"\xe9", b"\xff\xfe", b"\x00", b"\xc3("]))
    separator = draw(st.sampled_from([b"\r", b"\n", b"\r\n", b"\r\r"]))
    return _clean(separator.join(segments))


frames = st.one_of(
    mutated(),
    st.binary(max_size=200).map(_clean),
    st.builds(lambda n: b"MSH|^~\\&|CRIS|RZZ01|" + b"x" * n, st.integers(CAP, 3 * CAP)),
)


@pytest.fixture
def fuzz_listener(
    session_factory: sessionmaker[Session], registry: TrustRegistry
) -> Iterator[ListenerHarness]:
    harness = ListenerHarness(
        Settings(mllp_port=0, mllp_max_message_bytes=CAP), session_factory, registry
    )
    yield harness
    harness.stop()


def _journal_count(harness: ListenerHarness) -> int:
    return int(harness.rows("SELECT count(*) AS n FROM journal")[0].n)


@settings(
    max_examples=25,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(messages=st.lists(frames, min_size=1, max_size=4), truncated_tail=st.booleans())
def test_every_well_framed_message_gets_one_ack(
    fuzz_listener: ListenerHarness, messages: list[bytes], truncated_tail: bool
) -> None:
    before = _journal_count(fuzz_listener)
    with MLLPClient("127.0.0.1", fuzz_listener.port) as client:
        client.socket.settimeout(30)
        for message in messages:
            data = client.send_message(message)
            while not data.endswith(EB + CR):
                more = client.socket.recv(65536)
                assert more, "connection closed without an ACK"
                data += more
            assert data.count(EB + CR) == 1 and data.startswith(SB)
            assert b"MSA" in data
        if truncated_tail:  # a frame that never ends: the connection just goes away
            client.socket.sendall(SB + b"MSH|^~\\&|CRIS|RZZ01|partial")
    assert _journal_count(fuzz_listener) == before + len(messages)
    assert fuzz_listener.send(load("sample-oru-final-v2.4.hl7")).code in ("CA", "CE")


def test_random_garbage_stream_does_not_kill_the_listener(fuzz_listener: ListenerHarness) -> None:
    for junk in (b"\x00" * 100, b"GET / HTTP/1.1\r\n\r\n", b"\x1c\r\x1c\r", b"\x16\x03\x01"):
        with socket.create_connection(("127.0.0.1", fuzz_listener.port)) as sock:
            sock.sendall(junk)
            sock.shutdown(socket.SHUT_WR)
            sock.settimeout(30)
            assert sock.recv(100) == b""
    assert fuzz_listener.send(load("sample-oru-final-v2.4.hl7")).code == "CA"


@settings(max_examples=300, deadline=None)
@given(payload=st.one_of(mutated(), st.binary(max_size=300)))
def test_reader_always_decides(payload: bytes) -> None:
    """The pure path never raises: every payload gets an outcome and an ACK that an
    independent parser reads, echoing MSH-10 when there is one."""
    decision = decide_message(
        payload,
        sha256="0" * 64,
        size=len(payload),
        oversize=False,
        registry=REGISTRY,
        binding=Binding(),
        accept_test_numbers=True,
        received_at=datetime.now(UTC),
    )
    assert decision.outcome in (Outcome.ACCEPTED, Outcome.ERROR, Outcome.REJECTED)
    ack = hl7.parse(decision.ack)
    code = str(ack.segment("MSA")(1))
    assert code in ("AA", "AE", "AR", "CA", "CE", "CR")
    if decision.header is not None:
        assert decision.ack.split("\r")[1].split(decision.header.delimiters.field)[2] == (
            decision.header.msh10
        )
    assert (decision.outcome == Outcome.ACCEPTED) == (code in ("AA", "CA"))
