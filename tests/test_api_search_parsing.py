"""The pure search parser and the cursor codec, table-driven (no database, no HTTP)."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from locator.api.outcomes import InvalidCursorError, InvalidSearchError, UnsupportedParameterError
from locator.api.paging import CursorCodec, CursorState, Position
from locator.api.search import (
    IMAGING_STUDY_PARAMETERS,
    DatePrefix,
    SearchQuery,
    SortOrder,
    StudyIdentifier,
    parse_date_bound,
    parse_search,
)
from tests.api_helpers import ALICE, BOB, NHS

UID = "1.2.826.0.1.3680043.10.1.1"
ACSN = "http://terminology.hl7.org/CodeSystem/v2-0203|ACSN"


def parse(*pairs: tuple[str, str], strict: bool = False, test_numbers: bool = True) -> SearchQuery:
    return parse_search(pairs, accept_test_numbers=test_numbers, strict=strict)


@pytest.mark.parametrize("key", ["patient.identifier", "patient:identifier", "subject:identifier"])
@pytest.mark.parametrize(
    "value", [f"{NHS}|{ALICE}", ALICE, f"{NHS}|{ALICE[:3]} {ALICE[3:6]} {ALICE[6:]}"]
)
def test_patient_forms(key: str, value: str) -> None:
    query = parse((key, value))
    assert query.nhs_number == ALICE
    assert query.sort is SortOrder.STARTED_DESC and query.count == 20


@pytest.mark.parametrize(
    ("pairs", "message"),
    [
        ((("patient.identifier", f"{NHS}|9990000019"),), "modulus-11"),
        ((("patient.identifier", f"{NHS}|12345"),), "ten digits"),
        ((("patient.identifier", f"{NHS}|0000000000"),), "placeholder"),
        ((("patient.identifier", f"urn:other|{ALICE}"),), "only NHS Numbers"),
        ((("patient.identifier", f"{ALICE},{BOB}"),), "exactly one patient"),
        ((("patient.identifier", ALICE), ("subject:identifier", BOB)), "exactly one patient"),
        ((("subject", "Patient/123"),), "no Patient resources"),
        ((("patient.identifier", ALICE), ("started", "2024-13")), "not a valid date"),
        ((("patient.identifier", ALICE), ("started", "yesterday")), "not a FHIR date"),
        ((("patient.identifier", ALICE), ("started", "sa2024")), "not supported"),
        ((("patient.identifier", ALICE), ("_sort", "modality")), "sort by one of"),
        ((("patient.identifier", ALICE), ("_count", "many")), "whole number"),
        ((("patient.identifier", ALICE), ("status", "final")), "unknown status"),
        ((("patient.identifier", ALICE), ("modality:text", "CT")), "modifier"),
        ((("patient.identifier", ALICE), ("identifier:of-type", "x|y|z")), "only the type"),
        ((("modality", "CT"),), "must name a patient"),
        ((("started", "2024"),), "must name a patient"),
        ((("identifier", "ACC1"),), "must name a patient"),
        ((("identifier", "|ACC1"),), "must name a patient"),
        ((("identifier:of-type", f"{ACSN}|ACC1"),), "must name a patient"),
        ((("organization", "RZZ01"),), "must name a patient"),
        ((), "must name a patient"),
    ],
)
def test_refusals(pairs: tuple[tuple[str, str], ...], message: str) -> None:
    with pytest.raises(InvalidSearchError) as caught:
        parse(*pairs)
    assert message in caught.value.diagnostics


def test_the_test_range_is_refused_when_the_setting_says_so() -> None:
    with pytest.raises(InvalidSearchError, match="test range"):
        parse(("patient.identifier", ALICE), test_numbers=False)


@pytest.mark.parametrize(
    ("pairs", "expected"),
    [
        (
            (("identifier", f"urn:dicom:uid|urn:oid:{UID}"),),
            StudyIdentifier("uid", UID, "urn:dicom:uid"),
        ),
        ((("identifier", f"urn:dicom:uid|{UID}"),), StudyIdentifier("uid", UID, "urn:dicom:uid")),
        ((("identifier", "urn:acc:x|A1"),), StudyIdentifier("acc", "A1", "urn:acc:x")),
        (
            (("identifier:of-type", f"{ACSN}|A1"), ("organization", "RZZ01")),
            StudyIdentifier("typed-acc", "A1", None),
        ),
        ((("identifier", "A1"), ("patient.identifier", ALICE)), StudyIdentifier("any", "A1", None)),
    ],
)
def test_identifier_forms(pairs: tuple[tuple[str, str], ...], expected: StudyIdentifier) -> None:
    assert parse(*pairs).identifiers == ((expected,),)


def test_id_alone_is_enough_and_values_combine() -> None:
    query = parse(("_id", "a,b"), ("_id", "b,c"))
    assert query.ids == frozenset({"b"})


def test_tokens_with_systems() -> None:
    query = parse(
        ("patient.identifier", ALICE),
        ("modality", "http://dicom.nema.org/resources/ontology/DCM|ct,MR"),
        ("modality", "urn:other|CT"),
        ("organization", "https://fhir.nhs.uk/Id/ods-organization-code|rzz01,RZZ02"),
        ("status", "available,http://hl7.org/fhir/imagingstudy-status|cancelled"),
    )
    assert query.modalities == (frozenset({"CT", "MR"}), frozenset())
    assert query.organizations == (frozenset({"RZZ01", "RZZ02"}),)
    assert query.statuses == frozenset({"available", "cancelled"})


@pytest.mark.parametrize(
    ("count", "expected", "summary"),
    [("1", 1, False), ("100", 100, False), ("500", 100, False), ("0", 1, True)],
)
def test_count_is_capped(count: str, expected: int, summary: bool) -> None:
    query = parse(("patient.identifier", ALICE), ("_count", count))
    assert (query.count, query.summary_count) == (expected, summary)


def test_unknown_parameters_are_ignored_or_refused_when_strict() -> None:
    query = parse(
        ("patient.identifier", ALICE),
        ("bodysite", "head"),
        ("_elements", "id"),
        ("_include", "ImagingStudy:patient"),
        ("_format", "json"),
        ("_cursor", "x"),
    )
    assert query.ignored == ("bodysite", "_elements", "_include=ImagingStudy:patient")
    with pytest.raises(UnsupportedParameterError):
        parse(("patient.identifier", ALICE), ("bodysite", "head"), strict=True)
    assert parse(
        ("patient.identifier", ALICE), ("_include", "ImagingStudy:endpoint"), strict=True
    ).include_endpoint


LONDON_SUMMER = "+01:00"


@pytest.mark.parametrize(
    ("value", "prefix", "low", "high"),
    [
        ("2024", DatePrefix.EQ, "2024-01-01T00:00:00+00:00", "2025-01-01T00:00:00+00:00"),
        ("ge2024-07", DatePrefix.GE, "2024-06-30T23:00:00+00:00", "2024-07-31T23:00:00+00:00"),
        ("lt2024-12-31", DatePrefix.LT, "2024-12-31T00:00:00+00:00", "2025-01-01T00:00:00+00:00"),
        (
            "gt2024-06-01T10:00Z",
            DatePrefix.GT,
            "2024-06-01T10:00:00+00:00",
            "2024-06-01T10:01:00+00:00",
        ),
        (
            "le2024-06-01T10:00:30+02:00",
            DatePrefix.LE,
            "2024-06-01T08:00:30+00:00",
            "2024-06-01T08:00:31+00:00",
        ),
        (
            "ne2024-06-01T10:00:00",
            DatePrefix.NE,
            "2024-06-01T09:00:00+00:00",
            "2024-06-01T09:00:01+00:00",
        ),
    ],
)
def test_dates_have_an_implicit_range(value: str, prefix: DatePrefix, low: str, high: str) -> None:
    bound = parse_date_bound(value, "started")
    assert bound.prefix is prefix
    assert (bound.low, bound.high) == (datetime.fromisoformat(low), datetime.fromisoformat(high))
    assert bound.low.tzinfo is not None


def test_every_registry_parameter_is_parsed() -> None:
    """The registry the CapabilityStatement is generated from is the parser's dispatch table."""
    samples = {
        "patient": ALICE,
        "identifier": f"urn:dicom:uid|urn:oid:{UID}",
        "started": "2024",
        "modality": "CT",
        "status": "available",
        "organization": "RZZ01",
        "_id": "x",
        "_lastUpdated": "2024",
        "_sort": "started",
        "_count": "5",
        "_include": "ImagingStudy:endpoint",
        "_summary": "count",
    }
    for param in IMAGING_STUDY_PARAMETERS:
        if param.name in ("subject", "patient"):
            continue  # patient: every query below names one; subject: refused with a hint
        value = samples[param.name]
        if param.name == "identifier":
            parse((param.keys[0], value))
            continue
        query = parse(("patient.identifier", ALICE), (param.keys[0], value))
        assert query != parse(("patient.identifier", ALICE)), param.name


def codec(secret: str = "s1", ttl: int = 60) -> CursorCodec:
    return CursorCodec(lambda: secret, ttl)


def test_cursor_round_trip_and_refusals() -> None:
    state = CursorState(
        (("patient.identifier", ALICE),), Position("2024-01-01T00:00:00+00:00", "ab")
    )
    token = codec().seal(state)
    assert ALICE not in token
    assert codec().open(token) == state
    tampered = token[:-3] + ("A" if token[-3] != "A" else "B") + token[-2:]
    for bad in (tampered, "not a cursor!", "", "AQ", "x" * 5000):
        with pytest.raises(InvalidCursorError):
            codec().open(bad)
    with pytest.raises(InvalidCursorError, match="not issued"):
        codec("another secret").open(token)
    now = datetime.now(UTC).timestamp()
    old = codec(ttl=10).seal(state, now=now - 11)
    with pytest.raises(InvalidCursorError, match="expired"):
        codec().open(old)
