"""The MLLP listener over real sockets (port 0) with python-hl7's MLLPClient, on SQLite and
PostgreSQL: one test per convention, each asserting the ACK code, MSA-2, the ERR content and
what the index then holds."""

from __future__ import annotations

import hashlib
import socket
import threading
from collections.abc import Callable, Iterator
from dataclasses import replace
from typing import Any

import pytest
from hl7.client import MLLPClient
from prometheus_client import REGISTRY
from sqlalchemy.exc import IntegrityError, OperationalError
from sqlalchemy.orm import Session, sessionmaker

import ingest.hl7_listener as listener_module
import ingest.hl7_process as process_module
from locator.config import Settings
from locator.trusts import TrustRegistry, example_trusts, store_trusts
from tests.hl7_messages.helpers import (
    CR,
    EB,
    SB,
    ListenerHarness,
    load,
    oru,
    parse_acks,
    read_until_closed,
)

Make = Callable[..., ListenerHarness]


@pytest.fixture
def make_listener(
    session_factory: sessionmaker[Session], registry: TrustRegistry
) -> Iterator[Make]:
    made: list[ListenerHarness] = []

    def make(trusts: TrustRegistry | None = None, **overrides: Any) -> ListenerHarness:
        settings = Settings(mllp_port=0, **overrides)
        harness = ListenerHarness(settings, session_factory, trusts or registry)
        made.append(harness)
        return harness

    yield make
    for harness in made:
        harness.stop()


@pytest.fixture
def mllp(make_listener: Make) -> ListenerHarness:
    return make_listener()


def _trusts(session_factory: sessionmaker[Session], **changes: dict[str, Any]) -> TrustRegistry:
    trusts = [replace(t, **changes.get(t.ods_code, {})) for t in example_trusts()]
    with session_factory() as session, session.begin():
        store_trusts(session, trusts=trusts)
    return TrustRegistry(trusts)


# --------------------------------------------------------------------------- accepted


@pytest.mark.parametrize(
    ("name", "control", "study"),
    [
        (
            "sample-oru-final-v2.4.hl7",
            "RZZ-ORU-000101",
            ("RZZ01", "RZZ24000123", "9990000018", "linked", "available", "final", "CT"),
        ),
        (
            "sample-oru-corrected-v2.3.1.hl7",
            "RZZ-ORU-000187",
            ("RZZ01", "RZZ24000123", "9990000018", "linked", "available", "corrected", "CT"),
        ),
        (
            "sample-oru-cancelled-v2.4.hl7",
            "RZZ-ORU-000233",
            ("RZZ02", "RZZ24000200", "9990000026", "linked", "cancelled", None, "MR"),
        ),
        (
            "sample-oru-no-nhs-number-v2.5.hl7",
            "RZZ-ORU-000301",
            ("RZZ03", "RZZ24000301", None, "held", "available", "final", "DX"),
        ),
    ],
)
def test_samples(mllp: ListenerHarness, name: str, control: str, study: tuple[Any, ...]) -> None:
    ack = mllp.send(load(name))
    assert (ack.code, ack.control_id) == ("CA", control)  # MSH-15 AL: enhanced mode
    assert b"\rERR" not in ack.raw
    rows = mllp.studies()
    assert len(rows) == 1
    row = rows[0]
    assert (
        row.trust_ods,
        row.accession,
        row.nhs_number,
        row.patient_state,
        row.status,
        row.report_status,
        row.modalities,
    ) == study
    entry = mllp.journal()[0]
    assert (entry.outcome, entry.control_id, entry.sender_facility) == (
        "accepted",
        control,
        study[0],
    )
    assert entry.sha256 == hashlib.sha256(load(name)).hexdigest()
    assert "TESTPATIENT" not in entry.message


def test_original_mode_aa_and_ack_header(mllp: ListenerHarness) -> None:
    ack = mllp.send(oru(control="CTRL-1", version="2.4^GBR^2.16.840.1.113883.2.1.3.2.4.10"))
    assert (ack.code, ack.control_id) == ("AA", "CTRL-1")
    msh = ack.message.segment("MSH")
    assert (str(msh(3)), str(msh(4)), str(msh(5)), str(msh(6))) == (
        "FINDIT",
        "NHSE",
        "CRIS",
        "RZZ01",
    )
    assert str(msh(9)) == "ACK^R01^ACK"
    assert ack.version == "2.4^GBR^2.16.840.1.113883.2.1.3.2.4.10"  # echoed as received
    assert mllp.studies()[0].study_uid is None


def test_empty_version_is_read_as_2_5_and_echoed_mapped(mllp: ListenerHarness) -> None:
    ack = mllp.send(oru(version=""))
    assert (ack.code, ack.version) == ("AA", "2.5")


CONVENTIONS = [
    "lf-separated-v2.4.hl7",
    "crlf-separated-v2.4.hl7",
    "latin1-8859-1-v2.4.hl7",
    "latin1-undeclared-v2.4.hl7",
    "version-2.7-read-as-2.5.1.hl7",
    "nhs-in-pid2-v2.3.hl7",
    "nhs-cx6-authority-v2.3.hl7",
    "nhs-trace-suffix-v2.4.hl7",
]


def test_conventions_accepted(mllp: ListenerHarness) -> None:
    """One listener, one database: each fixture is accepted and linked to its NHS Number."""
    for count, name in enumerate(CONVENTIONS, start=1):
        ack = mllp.send(load(name))
        assert ack.code == "AA", (name, ack.raw)
        rows = mllp.studies()
        assert len(rows) == count, name
        assert all(r.nhs_number in ("9990000018", "9990000026") for r in rows), name


def test_untyped_ten_digits_is_held_under_a_local_id(mllp: ListenerHarness) -> None:
    assert mllp.send(load("untyped-ten-digits-v2.4.hl7")).code == "AA"
    row = mllp.studies()[0]
    assert (row.nhs_number, row.patient_state) == (None, "held")


def test_several_obr_index_several_studies(mllp: ListenerHarness) -> None:
    assert mllp.send(load("two-obr-ipc-v2.5.1.hl7")).code == "AA"
    rows = mllp.studies()
    assert [(r.accession, r.study_uid, r.modalities) for r in rows] == [
        ("RZZ25000006", "1.2.826.0.1.3680043.10.999.6", "MR"),
        ("RZZ25000007", None, "US"),
    ]


def test_obx11_w_withdraws_the_link(mllp: ListenerHarness) -> None:
    assert mllp.send(oru(control="W-1")).code == "AA"
    assert mllp.studies()[0].patient_state == "linked"
    body = ("OBX|1|TX|CHEAD^CT Head^NICIP||Sent for the wrong patient.||||||W",)
    assert mllp.send(oru(control="W-2", body=body)).code == "AA"
    row = mllp.studies()[0]
    assert row.patient_state == "entered-in-error"


def test_corrected_report_supersedes_final(mllp: ListenerHarness) -> None:
    assert mllp.send(load("sample-oru-final-v2.4.hl7")).code == "CA"
    assert mllp.send(load("sample-oru-corrected-v2.3.1.hl7")).code == "CA"
    # a late preliminary never downgrades
    assert mllp.send(oru(control="late", accession="RZZ24000123", status="P")).code == "AA"
    rows = mllp.studies()
    assert len(rows) == 1 and rows[0].report_status == "corrected"


# --------------------------------------------------------------------------- AE


def test_invalid_nhs_number_ae_102_err1_form(mllp: ListenerHarness) -> None:
    ack = mllp.send(oru(control="BAD-1", pid3="9990000019^^^NHS^NH"))
    assert (ack.code, ack.control_id) == ("AE", "BAD-1")
    assert str(ack.err()(1)) == "PID^1^3^102&Data type error&HL70357"
    assert "invalid NHS Number" in ack.text and "9990000019" not in ack.text
    assert mllp.studies() == []
    entry = mllp.journal()[0]
    assert entry.outcome == "error" and entry.reason.startswith("102 ")


def test_invalid_nhs_number_ae_102_err_v25_form(mllp: ListenerHarness) -> None:
    ack = mllp.send(oru(control="BAD-2", version="2.5", pid3="K1^^^RZZ^MR~1234567890^^^NHS^NH"))
    assert ack.code == "AE"
    err = ack.err()
    assert str(err(1)) == ""
    assert str(err(2)) == "PID^1^3^2"
    assert str(err(3)) == "102^Data type error^HL70357"
    assert str(err(4)) == "E"
    assert "invalid NHS Number" in str(err(8))


def test_test_numbers_refused_when_configured(make_listener: Make) -> None:
    mllp = make_listener(accept_test_nhs_numbers=False)
    ack = mllp.send(oru())
    assert ack.code == "AE" and "102" in str(ack.err()(1))


def test_no_patient_identifier_ae_101(mllp: ListenerHarness) -> None:
    ack = mllp.send(oru(control="NOID", pid3=""))
    assert (ack.code, ack.control_id) == ("AE", "NOID")
    assert str(ack.err()(1)) == "PID^1^3^101&Required field missing&HL70357"


def test_no_accession_no_uid_ae_101_at_obr18(mllp: ListenerHarness) -> None:
    ack = mllp.send(oru(control="NOKEY", accession="", obr3="", body=()))
    assert ack.code == "AE"
    assert str(ack.err()(1)) == "OBR^1^18^101&Required field missing&HL70357"
    assert mllp.studies() == []


def test_enhanced_mode_ce_and_cr(mllp: ListenerHarness) -> None:
    assert mllp.send(oru(ack_modes=("AL", "NE"), pid3="")).code == "CE"
    assert mllp.send(oru(ack_modes=("NE", "NE"), processing="T")).code == "CR"
    assert mllp.send(oru(ack_modes=("", "AL"))).code == "CA"


def test_reader_exception_is_ae_207(mllp: ListenerHarness, monkeypatch: pytest.MonkeyPatch) -> None:
    def boom(*_a: Any, **_k: Any) -> Any:
        raise RuntimeError("reader bug")

    monkeypatch.setattr(process_module, "read_oru", boom)
    ack = mllp.send(oru(control="BUG"))
    assert (ack.code, ack.control_id) == ("AE", "BUG")
    assert "207" in str(ack.err()(1))
    assert mllp.journal()[0].outcome == "error"


def test_not_hl7_is_answered_ae_207(mllp: ListenerHarness) -> None:
    ack = mllp.send(b"hello, this is not HL7")
    assert ack.code == "AE" and ack.control_id == ""
    assert mllp.journal()[0].outcome == "error"


# --------------------------------------------------------------------------- AR


HEADER_REFUSALS = [
    ({"msg_type": "ADT^A01^ADT_A01"}, 200, 9),
    ({"msg_type": "ORU^R30"}, 201, 9),
    ({"processing": "T"}, 202, 11),
    ({"processing": "D"}, 202, 11),
    ({"version": "2.2"}, 203, 12),
    ({"facility": "NOBODY"}, 204, 4),
]


def test_header_refusals_ar(mllp: ListenerHarness) -> None:
    for n, (kw, code, field) in enumerate(HEADER_REFUSALS, start=1):
        ack = mllp.send(oru(control=f"HDR{n}", **kw))  # type: ignore[arg-type]
        assert (ack.code, ack.control_id) == ("AR", f"HDR{n}")
        assert str(ack.err()(1)).startswith(f"MSH^1^{field}^{code}&"), kw
        assert mllp.journal()[-1].outcome == "rejected"
    assert mllp.studies() == []


def test_dedicated_trust_port(session_factory: sessionmaker[Session], make_listener: Make) -> None:
    trusts = _trusts(session_factory, RZZ02={"mllp_port": 0})
    mllp = make_listener(trusts)
    port = mllp.listener.ports["mllp.RZZ02"]
    assert port != mllp.port
    ack = mllp.send(oru(control="D1", facility="RZZ01"), port=port)
    assert ack.code == "AR" and str(ack.err()(1)).startswith("MSH^1^4^204&")
    assert mllp.send(oru(control="D2", facility="RZZ02"), port=port).code == "AA"
    assert [r.trust_ods for r in mllp.studies()] == ["RZZ02"]


def test_source_addresses_on_the_shared_port(
    session_factory: sessionmaker[Session], make_listener: Make
) -> None:
    trusts = _trusts(session_factory, RZZ01={"source_addresses": ("10.1.0.0/16",)})
    mllp = make_listener(trusts)
    ack = mllp.send(oru(facility="RZZ01"))
    assert ack.code == "AR" and "204" in str(ack.err()(1))
    assert mllp.send(oru(facility="RZZ02")).code == "AA"


def test_oversize_read_to_its_end_journaled_truncated_ar_207(make_listener: Make) -> None:
    mllp = make_listener(mllp_max_message_bytes=2000)
    big = oru(control="BIG", body=tuple(f"OBX|{i}|TX|X||{'y' * 80}||||||F" for i in range(60)))
    small = oru(control="SMALL")
    raw_big = big.encode()
    with MLLPClient("127.0.0.1", mllp.port) as client:
        client.socket.sendall(SB + raw_big + EB + CR + SB + small.encode() + EB + CR)
        data = b""
        while data.count(EB + CR) < 2:
            data += client.socket.recv(65536)
    acks = parse_acks(data)
    assert [(a.code, a.control_id) for a in acks] == [("AR", "BIG"), ("AA", "SMALL")]
    assert str(acks[0].err()(1)).startswith("MSH^1^^207&")
    entry = mllp.journal()[0]
    assert (entry.outcome, bool(entry.truncated), entry.size) == ("rejected", True, len(raw_big))
    assert entry.sha256 == hashlib.sha256(raw_big).hexdigest()
    assert len(entry.message) <= 2000


# --------------------------------------------------------------------------- idempotency


def test_duplicate_gets_the_stored_ack_and_is_not_applied_twice(mllp: ListenerHarness) -> None:
    message = oru(control="DUP-1")
    first = mllp.send(message)
    version = mllp.rows("SELECT version FROM study")[0].version
    second = mllp.send(message)
    assert second.raw == first.raw
    assert mllp.rows("SELECT version FROM study")[0].version == version
    assert [e.outcome for e in mllp.journal()] == ["accepted", "duplicate"]


def test_reused_control_id_with_new_content_is_processed(mllp: ListenerHarness) -> None:
    first = mllp.send(oru(control="REUSE", status="P"))
    second = mllp.send(oru(control="REUSE", status="F"))
    assert (first.code, second.code) == ("AA", "AA")
    assert second.raw != first.raw
    assert mllp.studies()[0].report_status == "final"
    assert [e.outcome for e in mllp.journal()] == ["accepted", "accepted"]


def test_rejected_ones_are_re_evaluated(mllp: ListenerHarness) -> None:
    message = oru(control="AR-AGAIN", processing="T")
    assert mllp.send(message).code == "AR"
    assert mllp.send(message).code == "AR"
    assert [e.outcome for e in mllp.journal()] == ["rejected", "rejected"]


def test_error_duplicates_get_the_stored_ae(mllp: ListenerHarness) -> None:
    message = oru(control="AE-AGAIN", pid3="")
    first, second = mllp.send(message), mllp.send(message)
    assert first.code == "AE" and second.raw == first.raw
    assert [e.outcome for e in mllp.journal()] == ["error", "duplicate"]


# --------------------------------------------------------------------------- framing


def test_pipelined_frames_are_answered_in_order(mllp: ListenerHarness) -> None:
    frames = b"".join(
        SB + oru(control=f"P{i}", accession=f"ACC{i}").encode() + EB + CR for i in range(5)
    )
    with socket.create_connection(("127.0.0.1", mllp.port)) as sock:
        sock.sendall(frames)
        data = b""
        sock.settimeout(30)
        while data.count(EB + CR) < 5:
            data += sock.recv(65536)
    assert [(a.code, a.control_id) for a in parse_acks(data)] == [("AA", f"P{i}") for i in range(5)]
    assert len(mllp.studies()) == 5


def test_broken_frame_closes_the_connection_listener_lives(mllp: ListenerHarness) -> None:
    with socket.create_connection(("127.0.0.1", mllp.port)) as sock:
        sock.sendall(b"garbage without a start block" + EB + CR)
        assert read_until_closed(sock) == b""
    assert mllp.send(oru()).code == "AA"


def test_frame_completed_before_garbage_is_answered(mllp: ListenerHarness) -> None:
    with socket.create_connection(("127.0.0.1", mllp.port)) as sock:
        sock.sendall(SB + oru(control="OK").encode() + EB + CR + b"junk")
        acks = parse_acks(read_until_closed(sock))
    assert [(a.code, a.control_id) for a in acks] == [("AA", "OK")]


def test_idle_timeout_closes(make_listener: Make) -> None:
    mllp = make_listener(mllp_idle_timeout_seconds=0.2)
    with socket.create_connection(("127.0.0.1", mllp.port)) as sock:
        assert read_until_closed(sock, timeout=20) == b""


def test_per_source_connection_cap(make_listener: Make) -> None:
    mllp = make_listener(mllp_max_connections_per_source=1)
    with MLLPClient("127.0.0.1", mllp.port) as first:
        assert b"MSA|AA" in first.send_message(oru(control="C1"))
        with socket.create_connection(("127.0.0.1", mllp.port)) as second:
            second.sendall(SB + oru(control="C2").encode() + EB + CR)
            assert read_until_closed(second) == b""
        assert b"MSA|AA" in first.send_message(oru(control="C3"))


# --------------------------------------------------------------------------- failures


def test_transient_failure_withholds_then_acks(
    mllp: ListenerHarness, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = listener_module.commit_decisions
    failures = iter([OperationalError("stmt", {}, Exception("db down"))] * 2)

    def flaky(session: Session, decisions: Any) -> Any:
        error = next(failures, None)
        if error is not None:
            raise error
        return real(session, decisions)

    monkeypatch.setattr(listener_module, "commit_decisions", flaky)
    ack = mllp.send(oru(control="FLAKY"))
    assert (ack.code, ack.control_id) == ("AA", "FLAKY")
    assert [e.outcome for e in mllp.journal()] == ["accepted"]


def test_database_down_closes_without_an_ack(
    make_listener: Make, monkeypatch: pytest.MonkeyPatch
) -> None:
    mllp = make_listener(mllp_commit_retry_seconds=0.3)

    def down(session: Session, decisions: Any) -> Any:
        raise OperationalError("stmt", {}, Exception("db down"))

    monkeypatch.setattr(listener_module, "commit_decisions", down)
    before = REGISTRY.get_sample_value("locator_db_errors_total", {"where": "mllp"}) or 0
    with socket.create_connection(("127.0.0.1", mllp.port)) as sock:
        sock.sendall(SB + oru(control="LOST").encode() + EB + CR)
        assert read_until_closed(sock) == b""  # closed, no ACK: the sender resends
    assert (REGISTRY.get_sample_value("locator_db_errors_total", {"where": "mllp"}) or 0) > before
    monkeypatch.undo()
    assert mllp.send(oru(control="LOST")).code == "AA"  # the resend lands
    assert [e.outcome for e in mllp.journal()] == ["accepted"]


def test_conflict_retries_the_unit(mllp: ListenerHarness, monkeypatch: pytest.MonkeyPatch) -> None:
    real = listener_module.commit_decisions
    calls = {"n": 0}

    def racing(session: Session, decisions: Any) -> Any:
        calls["n"] += 1
        if calls["n"] == 1:
            raise IntegrityError("insert", {}, Exception("duplicate key"))
        return real(session, decisions)

    monkeypatch.setattr(listener_module, "commit_decisions", racing)
    assert mllp.send(oru(control="RACE")).code == "AA"
    assert calls["n"] == 2


def test_apply_failure_is_ae_207_for_that_message_only(
    mllp: ListenerHarness, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = process_module.apply_notices

    def picky(session: Session, *, notices: Any, **options: Any) -> Any:
        if any(n.studies[0].accession == "POISON" for n in notices):
            raise ValueError("bad data")
        return real(session, notices=notices, **options)

    monkeypatch.setattr(process_module, "apply_notices", picky)
    ack = mllp.send(oru(control="X1", accession="POISON"))
    assert ack.code == "AE" and "207" in str(ack.err()(1))
    assert mllp.send(oru(control="X2", accession="FINE")).code == "AA"
    assert [r.accession for r in mllp.studies()] == ["FINE"]
    # a resend after our own failure is processed again, not answered from the journal
    monkeypatch.setattr(process_module, "apply_notices", real)
    assert mllp.send(oru(control="X1", accession="POISON")).code == "AA"


def test_stop_lets_in_flight_messages_finish(
    mllp: ListenerHarness, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = listener_module.commit_decisions
    entered, release = threading.Event(), threading.Event()

    def slow(session: Session, decisions: Any) -> Any:
        entered.set()
        assert release.wait(30)
        return real(session, decisions)

    monkeypatch.setattr(listener_module, "commit_decisions", slow)
    result: dict[str, Any] = {}
    sender = threading.Thread(target=lambda: result.update(ack=mllp.send(oru(control="LAST"))))
    sender.start()
    assert entered.wait(30)
    stopper = threading.Thread(target=lambda: mllp.run(mllp.listener.stop()))
    stopper.start()
    with pytest.raises(OSError):  # no longer accepting
        for _ in range(200):
            socket.create_connection(("127.0.0.1", mllp.port), timeout=1).close()
    release.set()
    sender.join(30)
    stopper.join(30)
    assert result["ack"].code == "AA"
    assert [e.outcome for e in mllp.journal()] == ["accepted"]


def test_metrics(mllp: ListenerHarness) -> None:
    labels = {"feed": "hl7", "trust": "RZZ01", "outcome": "accepted"}
    before = REGISTRY.get_sample_value("locator_messages_total", labels) or 0
    acks_before = (
        REGISTRY.get_sample_value("locator_ack_latency_seconds_count", {"feed": "hl7"}) or 0
    )
    mllp.send(oru(control="M1"))
    assert REGISTRY.get_sample_value("locator_messages_total", labels) == before + 1
    assert (
        REGISTRY.get_sample_value("locator_ack_latency_seconds_count", {"feed": "hl7"})
        == acks_before + 1
    )


def test_control_character_in_an_identifier_is_ae_102_on_every_backend(
    mllp: ListenerHarness,
) -> None:
    """A NUL (sent raw or as the escape \\X00\\) has no place in an identifier, and
    PostgreSQL cannot store one: the same AE 102 at the field on both databases, never an
    internal error, and the next message lands."""
    for control, accession in (("N1", "A\x00B"), ("N2", "A\\X00\\B"), ("N3", "A\x1bB")):
        ack = mllp.send(oru(control=control, accession=accession))
        assert (ack.code, ack.control_id) == ("AE", control)
        assert str(ack.err()(1)) == "OBR^1^18^102&Data type error&HL70357"
        assert "control character" in ack.text
    assert mllp.send(oru(control="N4", accession="FINE")).code == "AA"
    assert [r.accession for r in mllp.studies()] == ["FINE"]
