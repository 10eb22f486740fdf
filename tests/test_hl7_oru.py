"""The lean ORU reader (pure): identity, study keys, codes, times, statuses, header checks,
character sets, the journal copy, and the differential test against hl7apy."""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, datetime

import pytest

from ingest.hl7_errors import ErrorCode, Hl7Error, MessageContentError, MessageRejectedError
from ingest.hl7_fields import map_modality
from ingest.hl7_oru import read_oru
from ingest.hl7_redact import strip_for_journal
from ingest.hl7_segments import check_header, decode_message, parse_message
from ingest.hl7_validate import describe_message, read_oru_with_hl7apy
from locator.core.notice import ReportStatus, StudyNotice, StudyStatus
from locator.trusts import TrustConfig, example_trusts
from tests.hl7_messages.helpers import fixture_names, load, oru

TRUSTS = {t.ods_code: t for t in example_trusts()}
NOW = datetime(2026, 1, 1, tzinfo=UTC)


def read(
    message: str | bytes, *, trust: TrustConfig | None = None, accept_test_numbers: bool = True
) -> tuple[StudyNotice, ...]:
    parsed = parse_message(message)
    check_header(parsed.header)
    trust = trust or TRUSTS[parsed.header.sending_facility]
    return read_oru(parsed, trust=trust, accept_test_numbers=accept_test_numbers, received_at=NOW)


def one(message: str | bytes, **kw: object) -> StudyNotice:
    notices = read(message, **kw)  # type: ignore[arg-type]
    assert len(notices) == 1
    return notices[0]


def error_of(message: str | bytes, **kw: object) -> Hl7Error:
    with pytest.raises(Hl7Error) as info:
        read(message, **kw)  # type: ignore[arg-type]
    return info.value


# --------------------------------------------------------------------------- identity


@pytest.mark.parametrize(
    ("pid2", "pid3", "nhs", "local", "namespace"),
    [
        ("", "9990000018^^^NHS^NH~K1^^^RZZ^MR", "9990000018", "K1", "RZZ"),  # CX.4 + CX.5
        ("", "9990000018^^^^NH", "9990000018", None, None),  # CX.5 NH alone
        ("", "9990000018^^^^NH01", "9990000018", None, None),  # NH + trace status (PKB)
        ("", "9990000018^^^NHS", "9990000018", None, None),  # CX.4 NHS
        ("", "9990000018^^^^^NHS", "9990000018", None, None),  # CX.6 NHS
        ("", "999 000 0018^^^NHS^NH", "9990000018", None, None),  # formatting spaces
        ("9990000018^^^NHS^NH", "K1^^^RZZ^MR", "9990000018", "K1", "RZZ"),  # PID-2, old feeds
        ("", "9990000018", None, "9990000018", None),  # untyped 10 digits: a local id
        ("", "9990000018^^^RZZ^MR", None, "9990000018", "RZZ"),  # typed MR: a local id
        ("", "V9^^^RZZ^VN~P7^^^RZZ^PI", None, "P7", "RZZ"),  # visit number is not a patient id
        ("", "A1^^^X^PI~B2^^^Y^MR", None, "B2", "Y"),  # MR preferred over PI
        ("", '""~9990000018^^^NHS^NH', "9990000018", None, None),  # "" is an explicit null
    ],
)
def test_patient_identifiers(
    pid2: str, pid3: str, nhs: str | None, local: str | None, namespace: str | None
) -> None:
    patient = one(oru(pid2=pid2, pid3=pid3)).patient
    assert (patient.nhs_number, patient.local_id, patient.local_namespace) == (
        nhs,
        local,
        namespace,
    )
    assert patient.withdrawn is False


@pytest.mark.parametrize(
    ("pid2", "pid3", "field", "repetition"),
    [
        ("", "9990000019^^^NHS^NH", 3, 1),  # fails modulus 11
        ("", "K1^^^RZZ^MR~1111111111^^^NHS^NH", 3, 2),  # repeated-digit placeholder
        ("", "12345^^^^NH", 3, 1),  # not ten digits
        ("9990000019^^^NHS^NH", "K1^^^RZZ^MR", 2, 1),  # PID-2 is checked too
        ("", "9990000018^^^NHS^NH~9990000026^^^NHS^NH", 3, 2),  # two different numbers
    ],
)
def test_invalid_nhs_number_is_102_at_the_pid_field(
    pid2: str, pid3: str, field: int, repetition: int
) -> None:
    error = error_of(oru(pid2=pid2, pid3=pid3))
    assert isinstance(error, MessageContentError)
    assert error.code == ErrorCode.DATA_TYPE_ERROR
    assert error.location is not None
    assert (error.location.segment, error.location.field, error.location.repetition) == (
        "PID",
        field,
        repetition,
    )
    assert "999000001" not in error.text  # masked: at most the last four digits


def test_test_range_refused_when_the_setting_says_so() -> None:
    error = error_of(oru(), accept_test_numbers=False)
    assert error.code == ErrorCode.DATA_TYPE_ERROR
    assert "test range" in error.text


@pytest.mark.parametrize("pid3", ["", '""', "^^^NHS^NH", "V1^^^RZZ^VN"])
def test_no_usable_patient_identifier_is_101_at_pid3(pid3: str) -> None:
    error = error_of(oru(pid3=pid3))
    assert error.code == ErrorCode.REQUIRED_FIELD_MISSING
    assert error.location is not None
    assert (error.location.segment, error.location.field) == ("PID", 3)


def test_obx11_w_withdraws_the_patient_link() -> None:
    body = ("OBX|1|TX|CHEAD^CT Head^NICIP||Sent for the wrong patient.||||||W",)
    assert one(oru(body=body)).patient.withdrawn is True


# --------------------------------------------------------------------------- study keys


def test_accession_obr18_then_obr3_by_default() -> None:
    assert one(oru(accession="A18", obr3="A3")).studies[0].accession == "A18"
    assert one(oru(accession="", obr3="A3^CRIS")).studies[0].accession == "A3"


def test_accession_obr3_only_when_the_trust_says_so() -> None:
    trust = replace(TRUSTS["RZZ01"], accession_field="OBR-3")
    assert one(oru(accession="A18", obr3="A3"), trust=trust).studies[0].accession == "A3"
    error = error_of(oru(accession="A18", obr3="", body=()), trust=trust)
    assert error.code == ErrorCode.REQUIRED_FIELD_MISSING


@pytest.mark.parametrize(
    "segment",
    [
        "ZDS|1.2.3.4^CRIS^Application^DICOM",
        "IPC|ACC|RP|1.2.3.4|SPS|CT",
        "OBX|2|ST|113014^DICOM Study^DCM||1.2.3.4||||||F",
        "OBX|2|HD|^Study Instance UID||1.2.3.4||||||F",
        "OBX|2|ST|SUID^Study Instance UID^L||1.2.3.4||||||F",
    ],
)
def test_study_uid_locations(segment: str) -> None:
    study = one(oru(accession="", obr3="", body=(segment,))).studies[0]
    assert (study.study_uid, study.accession) == ("1.2.3.4", None)


def test_neither_accession_nor_uid_is_101_at_obr18() -> None:
    error = error_of(oru(accession="", obr3="", body=()))
    assert error.code == ErrorCode.REQUIRED_FIELD_MISSING
    assert error.location is not None
    assert (error.location.segment, error.location.field) == ("OBR", 18)


def test_bad_study_uid_is_102() -> None:
    error = error_of(oru(body=("ZDS|1.2.abc^CRIS^Application^DICOM",)))
    assert error.code == ErrorCode.DATA_TYPE_ERROR


def test_several_obr_give_several_studies() -> None:
    notice = one(load("two-obr-ipc-v2.5.1.hl7"))
    assert [(s.accession, s.study_uid, s.modalities) for s in notice.studies] == [
        ("RZZ25000006", "1.2.826.0.1.3680043.10.999.6", ("MR",)),
        ("RZZ25000007", None, ("US",)),
    ]


# --------------------------------------------------------------------------- codes, times


@pytest.mark.parametrize(
    ("code", "modality"),
    [
        ("CT", "CT"),
        ("MR", "MR"),
        ("DX", "DX"),
        ("PT", "PT"),
        ("OT", "OT"),
        ("RX", "DX"),
        ("RUS", "US"),
        ("NMR", "MR"),
        ("NMS", "NM"),
        ("CTH", "XA"),
        ("XRC", "RF"),
        ("RAD", None),
        ("LAB", None),
        ("", None),
        ("us", "US"),
    ],
)
def test_modality_map(code: str, modality: str | None) -> None:
    assert map_modality(code) == modality


def test_procedure_nicip_system() -> None:
    procedure = one(oru()).studies[0].procedure
    assert procedure is not None
    assert (procedure.system, procedure.code, procedure.display) == (
        "https://nicip.nhs.uk",
        "CHEAD",
        "CT Head",
    )


@pytest.mark.parametrize(
    ("status", "study_status", "report_status"),
    [
        ("O", StudyStatus.REGISTERED, None),
        ("I", StudyStatus.REGISTERED, None),
        ("S", StudyStatus.REGISTERED, None),
        ("A", StudyStatus.AVAILABLE, ReportStatus.PRELIMINARY),
        ("P", StudyStatus.AVAILABLE, ReportStatus.PRELIMINARY),
        ("R", StudyStatus.AVAILABLE, ReportStatus.PRELIMINARY),
        ("F", StudyStatus.AVAILABLE, ReportStatus.FINAL),
        ("C", StudyStatus.AVAILABLE, ReportStatus.CORRECTED),
        ("X", StudyStatus.CANCELLED, None),
    ],
)
def test_result_status_table_0123(
    status: str, study_status: StudyStatus, report_status: ReportStatus | None
) -> None:
    study = one(oru(status=status)).studies[0]
    assert (study.status, study.report_status) == (study_status, report_status)
    assert (study.report_hash is not None) == (report_status is not None)


@pytest.mark.parametrize("status", ["Y", "Z", "Q"])
def test_query_statuses_are_content_errors(status: str) -> None:
    error = error_of(oru(status=status))
    assert isinstance(error, MessageContentError)
    assert error.location is not None and error.location.field == 25


def test_report_hash_follows_the_report_text() -> None:
    a = one(oru()).studies[0].report_hash
    b = one(oru(body=("OBX|1|TX|CHEAD^CT Head^NICIP||Different.||||||F",))).studies[0]
    assert a and b.report_hash and a != b.report_hash
    assert one(oru(control="other")).studies[0].report_hash == a  # header is not the report


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("20240601093000", datetime(2024, 6, 1, 8, 30, tzinfo=UTC)),  # BST
        ("20240101093000", datetime(2024, 1, 1, 9, 30, tzinfo=UTC)),  # GMT
        ("20240331013000", datetime(2024, 3, 31, 1, 30, tzinfo=UTC)),  # spring gap: fold=0
        ("20241027013000", datetime(2024, 10, 27, 0, 30, tzinfo=UTC)),  # overlap: first (BST)
        ("20240601093000+0000", datetime(2024, 6, 1, 9, 30, tzinfo=UTC)),
        ("20240601101400.1234-0500", datetime(2024, 6, 1, 15, 14, 0, 123400, tzinfo=UTC)),
        ("202406011014", datetime(2024, 6, 1, 9, 14, tzinfo=UTC)),
        ("20240601", datetime(2024, 5, 31, 23, 0, tzinfo=UTC)),
    ],
)
def test_times_in_the_trust_zone(value: str, expected: datetime) -> None:
    assert one(oru(obr7=value)).studies[0].started == expected


def test_bad_time_is_102_at_the_field() -> None:
    error = error_of(oru(obr22="2024-06-01"))
    assert error.code == ErrorCode.DATA_TYPE_ERROR
    assert error.location is not None and error.location.field == 22


def test_explicit_nulls() -> None:
    study = one(load("explicit-nulls-v2.4.hl7")).studies[0]
    assert (study.started, study.report_time, study.modalities) == (None, None, ())


def test_escapes_are_read() -> None:
    notice = one(load("escapes-v2.5.hl7"))
    assert notice.patient.local_id == "K&99"
    assert notice.studies[0].accession == "RZZ^25000016"


# --------------------------------------------------------------------------- header


@pytest.mark.parametrize(
    ("kw", "code"),
    [
        ({"msg_type": "ADT^A01^ADT_A01"}, ErrorCode.UNSUPPORTED_MESSAGE_TYPE),
        ({"msg_type": "ORU^R30^ORU_R30"}, ErrorCode.UNSUPPORTED_EVENT_CODE),
        ({"processing": "T"}, ErrorCode.UNSUPPORTED_PROCESSING_ID),
        ({"processing": "D"}, ErrorCode.UNSUPPORTED_PROCESSING_ID),
        ({"version": "2.2"}, ErrorCode.UNSUPPORTED_VERSION_ID),
        ({"version": "3.0"}, ErrorCode.UNSUPPORTED_VERSION_ID),
        ({"version": "2.9"}, ErrorCode.UNSUPPORTED_VERSION_ID),
    ],
)
def test_header_refusals(kw: dict[str, str], code: ErrorCode) -> None:
    with pytest.raises(MessageRejectedError) as info:
        check_header(parse_message(oru(**kw)).header)  # type: ignore[arg-type]
    assert info.value.code == code


@pytest.mark.parametrize(
    ("version", "read_as"),
    [
        ("", "2.5"),
        ("2.3", "2.3"),
        ("2.3.1", "2.3.1"),
        ("2.4^GBR^2.16.840.1", "2.4"),
        ("2.5.1", "2.5.1"),
        ("2.6", "2.5.1"),
        ("2.8.2", "2.5.1"),
    ],
)
def test_version_mapping(version: str, read_as: str) -> None:
    header = parse_message(oru(version=version)).header
    check_header(header)
    assert header.version == read_as


def test_two_component_msh9_is_accepted() -> None:
    assert one(oru(msg_type="ORU^R01"))


@pytest.mark.parametrize("sep", ["\n", "\r\n", "\r"])
def test_segment_separators(sep: str) -> None:
    assert one(oru(sep=sep)) == one(oru())


def test_charsets() -> None:
    assert "Opacité" in decode_message(load("latin1-8859-1-v2.4.hl7"))
    assert "Résumé" in decode_message(load("latin1-undeclared-v2.4.hl7"))  # fallback
    assert "é" in decode_message(
        "MSH|^~\\&|A|B|||||ORU^R01|1|P|2.5|||||GBR|UNICODE UTF-8\rNTE|1||é".encode()
    )


# --------------------------------------------------------------------------- journal copy


def test_journal_copy_has_no_report_text_or_demographics() -> None:
    message = load("sample-oru-final-v2.4.hl7").decode()
    stripped = strip_for_journal(message)
    for private in ("TESTPATIENT", "ALICE", "19700101", "No acute intracranial"):
        assert private in message and private not in stripped
    for kept in ("9990000018", "K1234567", "RZZ24000123", "1.2.826.0.1.3680043.10.999.1", "NSTS01"):
        assert kept in stripped
    # The stripped copy reads to the same notice (replay), report hash included.
    assert one(stripped) == one(message)


def test_journal_copy_strips_notes_and_addresses() -> None:
    body = (
        "OBX|1|FT|X||Secret finding||||||F",
        "NTE|1||Secret note",
        "NK1|1|MOTHER^MARY|MTH|1 High Street",
    )
    message = (
        oru(body=body)
        .replace("PID|1||", "PID|1||", 1)
        .replace("19700101|F", "19700101|F|||1 Acacia Avenue^^Town||01234 567890")
    )
    stripped = strip_for_journal(message)
    for private in ("Secret", "Acacia", "01234", "MOTHER"):
        assert private not in stripped
    assert one(stripped) == one(message)


def test_journal_copy_of_garbage() -> None:
    assert "not an HL7 message" in strip_for_journal("hello world")


# --------------------------------------------------------------------------- differential


@pytest.mark.parametrize("name", fixture_names())
def test_differential_lean_reader_and_hl7apy_agree(name: str) -> None:
    """Over every fixture: our splitter and hl7apy's (TOLERANT, find_groups=False, after
    newline normalisation) give the same notice; and hl7apy can describe the journal copy."""
    text = decode_message(load(name))
    parsed = parse_message(text)
    trust = TRUSTS[parsed.header.sending_facility]
    ours = read_oru(parsed, trust=trust, accept_test_numbers=True, received_at=NOW)
    theirs = read_oru_with_hl7apy(text, trust=trust, accept_test_numbers=True, received_at=NOW)
    assert ours == theirs
    assert ours[0].studies
    assert describe_message(strip_for_journal(text))


def test_several_patients_give_several_notices() -> None:
    first = oru(control="TWO", accession="A1")
    second = oru(pid3="9990000026^^^NHS^NH", accession="A2").split("\r", 1)[1]
    notices = read(first + "\r" + second)
    assert [(n.patient.nhs_number, n.studies[0].accession) for n in notices] == [
        ("9990000018", "A1"),
        ("9990000026", "A2"),
    ]


@pytest.mark.parametrize("order", [("OBR", "PID", "PID"), ("PID", "PID", "OBR")])
def test_swapped_and_repeated_pid(order: tuple[str, ...]) -> None:
    lines = {s[:3]: s for s in oru(body=()).split("\r")}
    message = "\r".join([lines["MSH"], *(lines[name] for name in order)])
    notices = read(message)
    assert len(notices) == 1 and notices[0].studies[0].accession == "RZZ26000001"
