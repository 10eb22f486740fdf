"""ImagingStudy search over HTTP, on SQLite and PostgreSQL, with data built by apply_notice.

Every response is validated with fhir.resources' R4B models (api_helpers.fhir_json)."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import pytest
from sqlalchemy import Engine, select
from sqlalchemy.orm import Session, sessionmaker

from locator.core.notice import ReportStatus, SeriesRef, StudyStatus
from locator.store.models import audit_table
from locator.trusts import TrustRegistry
from tests.api_helpers import (
    ALICE,
    BOB,
    CAROL,
    NHS,
    T0,
    TestClient,
    add_studies,
    client_for,
    diagnostics,
    fhir_json,
    make_app,
    match_ids,
    outcome_of,
    search,
    study,
)

Factory = sessionmaker[Session]
UID = "1.2.826.0.1.3680043.10.7"
ACSN_TYPE = "http://terminology.hl7.org/CodeSystem/v2-0203|ACSN"


@dataclass
class World:
    client: TestClient
    factory: Factory
    registry: TrustRegistry
    ids: dict[str, str]


@pytest.fixture
def world(engine: Engine, session_factory: Factory, registry: TrustRegistry) -> World:
    """ALICE: ct0 < ct1 < mr2 (cancelled) at RZZ01 and us3 (report only) at RZZ02, plus an
    entered-in-error study; BOB: one study; a held study (local id only); a quarantined one."""
    f = session_factory
    ids: dict[str, str] = {}
    series = (SeriesRef(f"{UID}.0.1", "CT", 120), SeriesRef(f"{UID}.0.2", None, 3))
    ids["ct0"], ids["ct1"] = add_studies(
        f,
        ALICE,
        [
            study(f"{UID}.0", "ACC0", series=series),
            study(f"{UID}.1", "ACC1", started=T0 + timedelta(1)),
        ],
    )
    [ids["mr2"]] = add_studies(
        f,
        ALICE,
        [
            study(
                f"{UID}.2",
                "ACC2",
                started=T0 + timedelta(2),
                modalities=("MR",),
                status=StudyStatus.CANCELLED,
            )
        ],
    )
    [ids["us3"]] = add_studies(
        f,
        ALICE,
        [
            study(
                None,
                "R2-3",
                started=T0 + timedelta(30),
                modalities=("US",),
                report_status=ReportStatus.FINAL,
            )
        ],
        trust="RZZ02",
        source="hl7:RIS2",
    )
    [ids["eie"]] = add_studies(
        f, ALICE, [study(f"{UID}.9", "ACC9", started=T0 + timedelta(40))], source="hl7:WRONG"
    )
    add_studies_withdrawn(f, ALICE, f"{UID}.9")
    [ids["bob"]] = add_studies(f, BOB, [study(f"{UID}.5", "ACC5", started=T0 + timedelta(50))])
    [ids["held"]] = add_studies(f, None, [study(f"{UID}.6", "ACC6")], local="MRN6")
    [ids["quarantined"]] = add_studies(f, CAROL, [study(f"{UID}.8", "ACC8")], source="hl7:A")
    add_studies(f, BOB, [study(f"{UID}.8", "ACC8")], source="hl7:B")
    client = client_for(make_app(engine, session_factory, registry))
    return World(client, session_factory, registry, ids)


def add_studies_withdrawn(factory: Factory, nhs: str, uid: str) -> None:
    from locator.core.index import apply_notice
    from locator.store.db import transaction
    from tests.index_helpers import notice

    with transaction(factory) as session:
        apply_notice(
            session, notice=notice(study(uid), source="hl7:WRONG", nhs=nhs, withdrawn=True)
        )


def audits(factory: Factory) -> list[Any]:
    with factory() as session:
        return list(session.execute(select(audit_table).order_by(audit_table.c.id)).all())


def names(world: World, bundle: dict[str, Any]) -> list[str]:
    by_id = {v: k for k, v in world.ids.items()}
    return [by_id[i] for i in match_ids(bundle)]


def test_a_patients_studies_newest_first_with_their_endpoints(world: World) -> None:
    response = world.client.get(
        "/fhir/ImagingStudy",
        params={"patient.identifier": f"{NHS}|{ALICE}", "_include": "ImagingStudy:endpoint"},
        headers={"X-Request-ID": "req-alice-1"},
    )
    bundle = fhir_json(response)
    assert bundle["type"] == "searchset" and bundle["total"] == 4
    assert names(world, bundle) == ["us3", "mr2", "ct1", "ct0"]
    includes = [e for e in bundle["entry"] if e["search"]["mode"] == "include"]
    assert [e["fullUrl"] for e in includes] == [
        "http://locator.test/fhir/Endpoint/RZZ01-dicomweb",
        "http://locator.test/fhir/Endpoint/RZZ02-dicomweb",
    ]
    rzz02 = world.registry.get("RZZ02")
    assert rzz02 is not None and includes[1]["resource"]["address"] == rzz02.dicomweb_url
    by_name = dict(
        zip(names(world, bundle), [e["resource"] for e in bundle["entry"]], strict=False)
    )
    for name, entry in zip(names(world, bundle), bundle["entry"], strict=False):
        assert entry["fullUrl"] == f"http://locator.test/fhir/ImagingStudy/{world.ids[name]}"
        assert entry["resource"]["subject"]["identifier"] == {"system": NHS, "value": ALICE}
    ct0 = by_name["ct0"]
    rzz01 = world.registry.get("RZZ01")
    assert rzz01 is not None
    assert ct0["identifier"][0] == {"system": "urn:dicom:uid", "value": f"urn:oid:{UID}.0"}
    assert ct0["identifier"][1]["system"] == rzz01.accession_system
    assert ct0["identifier"][1]["assigner"]["identifier"]["value"] == "RZZ01"
    [viewer] = ct0["contained"]
    assert viewer["address"] == rzz01.viewer_link(study_uid=f"{UID}.0", accession="ACC0")
    assert viewer["connectionType"]["code"] == "ihe-iid"
    assert viewer["payloadMimeType"] == ["text/html"]
    assert ct0["endpoint"] == [{"reference": "#viewer"}, {"reference": "Endpoint/RZZ01-dicomweb"}]
    assert [s["modality"]["code"] for s in ct0["series"]] == ["CT", "OT"]
    assert (ct0["numberOfSeries"], ct0["numberOfInstances"]) == (2, 123)
    assert ct0["procedureCode"][0]["coding"][0]["code"] == "CHEAD"
    us3 = by_name["us3"]  # report only: no Study UID, no series; viewer by accession
    assert "series" not in us3 and len(us3["identifier"]) == 1
    assert us3["contained"][0]["address"] == "https://imaging.rzz02.example/viewer/accession/R2-3"
    assert us3["extension"] == [
        {
            "url": "https://locator.example/fhir/StructureDefinition/report-status",
            "valueCode": "final",
        }
    ]
    assert by_name["mr2"]["status"] == "cancelled"
    [record] = audits(world.factory)
    assert (record.nhs_number, record.outcome, record.result_count) == (ALICE, 200, 4)
    assert record.request_id == "req-alice-1" and record.action == "search"
    assert ALICE not in record.query and record.trust_ods == "RZZ01,RZZ02"


def test_every_patient_form_and_post_agree(world: World) -> None:
    expected = match_ids(fhir_json(search(world.client, ALICE)))
    for key in ("patient:identifier", "subject:identifier"):
        got = fhir_json(world.client.get("/fhir/ImagingStudy", params={key: f"{NHS}|{ALICE}"}))
        assert match_ids(got) == expected, key
    posted = world.client.post(
        "/fhir/ImagingStudy/_search", data={"patient.identifier": f"{NHS}|{ALICE}"}
    )
    assert match_ids(fhir_json(posted)) == expected
    bad_type = world.client.post(
        "/fhir/ImagingStudy/_search", content=b"{}", headers={"content-type": "application/json"}
    )
    outcome_of(bad_type, 400)
    not_utf8 = world.client.post(
        "/fhir/ImagingStudy/_search",
        content=b"patient.identifier=\xff",
        headers={"content-type": "application/x-www-form-urlencoded"},
    )
    outcome_of(not_utf8, 400)
    huge = world.client.post("/fhir/ImagingStudy/_search", data={"x": "y" * 20_000})
    outcome_of(huge, 400)


CASES: list[tuple[dict[str, str], list[str]]] = [
    ({"started": "2024-01-11"}, ["ct1"]),
    ({"started": "ge2024-01-11"}, ["us3", "mr2", "ct1"]),
    ({"started": "gt2024-01-11"}, ["us3", "mr2"]),
    ({"started": "lt2024-01-11"}, ["ct0"]),
    ({"started": "le2024-01-11"}, ["ct1", "ct0"]),
    ({"started": "ne2024-01-11"}, ["us3", "mr2", "ct0"]),
    ({"started": "2024-02"}, ["us3"]),
    ({"started": "2023"}, []),
    ({"started": "ge2024-01-10T09:00:00Z"}, ["us3", "mr2", "ct1", "ct0"]),
    ({"started": "gt2024-01-10T09:00:00Z"}, ["us3", "mr2", "ct1"]),
    ({"modality": "MR"}, ["mr2"]),
    ({"modality": "http://dicom.nema.org/resources/ontology/DCM|US,mr"}, ["us3", "mr2"]),
    ({"modality": "urn:other|CT"}, []),
    ({"status": "cancelled"}, ["mr2"]),
    ({"status": "available"}, ["us3", "ct1", "ct0"]),
    ({"status": "entered-in-error"}, ["eie"]),
    ({"organization": "RZZ02"}, ["us3"]),
    ({"organization": "https://fhir.nhs.uk/Id/ods-organization-code|RZZ01"}, ["mr2", "ct1", "ct0"]),
    ({"identifier": f"urn:dicom:uid|urn:oid:{UID}.1"}, ["ct1"]),
    ({"identifier": "urn:locator:accession:RZZ02|R2-3"}, ["us3"]),
    ({"identifier": "ACC2"}, ["mr2"]),
    ({"identifier:of-type": f"{ACSN_TYPE}|ACC0"}, ["ct0"]),
    ({"_sort": "started"}, ["ct0", "ct1", "mr2", "us3"]),
    ({"_sort": "_lastUpdated"}, ["ct0", "ct1", "mr2", "us3"]),
    ({"_sort": "-_lastUpdated"}, ["us3", "mr2", "ct1", "ct0"]),
    ({"_lastUpdated": "gt2000"}, ["us3", "mr2", "ct1", "ct0"]),
    ({"_lastUpdated": "lt2000"}, []),
    ({"modality": "CT", "started": "ge2024-01-11"}, ["ct1"]),
]


def test_filters_and_sorts(world: World) -> None:
    for params, expected in CASES:
        bundle = fhir_json(search(world.client, ALICE, **params))
        assert names(world, bundle) == expected, params
        assert bundle["total"] == len(expected), params


def test_studies_not_linked_to_the_patient_are_never_returned(world: World) -> None:
    ids = world.ids
    for hidden in ("held", "quarantined"):
        bundle = fhir_json(world.client.get("/fhir/ImagingStudy", params={"_id": ids[hidden]}))
        assert match_ids(bundle) == [] and bundle["total"] == 0
    for nhs in (CAROL,):
        assert match_ids(fhir_json(search(world.client, nhs))) == []
    assert names(world, fhir_json(search(world.client, BOB))) == ["bob"]
    quarantined_uid = {"identifier": f"urn:dicom:uid|urn:oid:{UID}.8"}
    assert (
        match_ids(fhir_json(world.client.get("/fhir/ImagingStudy", params=quarantined_uid))) == []
    )
    by_id = fhir_json(world.client.get("/fhir/ImagingStudy", params={"_id": ids["eie"]}))
    assert match_ids(by_id) == []
    asked = fhir_json(
        world.client.get(
            "/fhir/ImagingStudy", params={"_id": ids["eie"], "status": "entered-in-error"}
        )
    )
    assert match_ids(asked) == [ids["eie"]]
    assert asked["entry"][0]["resource"]["status"] == "entered-in-error"


def test_identifier_searches_without_a_patient(world: World) -> None:
    c = world.client
    by_uid = fhir_json(
        c.get("/fhir/ImagingStudy", params={"identifier": f"urn:dicom:uid|urn:oid:{UID}.5"})
    )
    assert names(world, by_uid) == ["bob"]
    by_acc = fhir_json(
        c.get("/fhir/ImagingStudy", params={"identifier": "urn:locator:accession:RZZ01|ACC1"})
    )
    assert names(world, by_acc) == ["ct1"]
    wrong_trust = fhir_json(
        c.get("/fhir/ImagingStudy", params={"identifier": "urn:locator:accession:RZZ02|ACC1"})
    )
    assert match_ids(wrong_trust) == []
    typed = fhir_json(
        c.get(
            "/fhir/ImagingStudy",
            params={"identifier:of-type": f"{ACSN_TYPE}|R2-3", "organization": "RZZ02"},
        )
    )
    assert names(world, typed) == ["us3"]
    [*_, record] = audits(world.factory)
    assert record.nhs_number == ALICE and record.outcome == 200


def test_summary_count(world: World) -> None:
    for params in ({"_summary": "count"}, {"_count": "0"}):
        bundle = fhir_json(search(world.client, ALICE, **params))
        assert bundle["total"] == 4 and "entry" not in bundle


def test_refused_searches_are_400_and_audited(world: World) -> None:
    c = world.client
    refused = outcome_of(c.get("/fhir/ImagingStudy", params={"modality": "CT"}), 400)
    assert "must name a patient" in diagnostics(refused)
    bad = outcome_of(
        c.get("/fhir/ImagingStudy", params={"patient.identifier": f"{NHS}|9990000019"}), 400
    )
    assert "modulus-11" in diagnostics(bad) and bad["issue"][0]["code"] == "value"
    bad_date = outcome_of(search(c, ALICE, started="2024-02-30"), 400)
    assert "started" in diagnostics(bad_date)
    records = audits(world.factory)
    assert [(r.outcome, r.nhs_number) for r in records] == [(400, None), (400, None), (400, ALICE)]
    assert all("9990000019" not in r.query for r in records)


def test_unknown_parameters_are_reported_or_refused_when_strict(world: World) -> None:
    bundle = fhir_json(search(world.client, ALICE, bodysite="head"))
    [outcome] = [e for e in bundle["entry"] if e["search"]["mode"] == "outcome"]
    assert outcome["resource"]["resourceType"] == "OperationOutcome"
    assert "bodysite" in diagnostics(outcome["resource"])
    assert len(match_ids(bundle)) == 4
    strict = world.client.get(
        "/fhir/ImagingStudy",
        params={"patient.identifier": ALICE, "bodysite": "head"},
        headers={"Prefer": "handling=strict"},
    )
    assert "bodysite" in diagnostics(outcome_of(strict, 400))
