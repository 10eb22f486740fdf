"""Reads, registry resources, conformance resources, errors and operations endpoints, on
SQLite and PostgreSQL."""

from __future__ import annotations

from typing import Any

import pytest
from sqlalchemy import Engine, select
from sqlalchemy.orm import Session, sessionmaker

from locator.api import interactions
from locator.api.search import IMAGING_STUDY_PARAMETERS
from locator.core.notice import ReportStatus, SeriesRef
from locator.metrics import AUDIT_WRITE_FAILURES
from locator.store.models import audit_table
from locator.trusts import TrustRegistry
from tests.api_helpers import (
    ALICE,
    NHS,
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
UID = "1.2.826.0.1.3680043.10.42"


@pytest.fixture
def client(engine: Engine, session_factory: Factory, registry: TrustRegistry) -> TestClient:
    return client_for(make_app(engine, session_factory, registry))


def read(client: TestClient, study_id: str, **headers: str) -> Any:
    return client.get(f"/fhir/ImagingStudy/{study_id}", headers=headers)


def test_version_id_and_etag_change_exactly_when_the_study_does(
    client: TestClient, session_factory: Factory
) -> None:
    [sid] = add_studies(session_factory, ALICE, [study(UID, "A42")])
    first = read(client, sid)
    body = fhir_json(first)
    assert body["id"] == sid and body["meta"]["versionId"] == "1"
    assert first.headers["etag"] == 'W/"1"'
    add_studies(session_factory, ALICE, [study(UID, "A42")])  # the same notice again
    again = read(client, sid)
    assert fhir_json(again)["meta"] == body["meta"] and again.headers["etag"] == 'W/"1"'
    add_studies(session_factory, ALICE, [study(UID, "A42", report_status=ReportStatus.FINAL)])
    changed = read(client, sid)
    new = fhir_json(changed)
    assert new["meta"]["versionId"] == "2" and changed.headers["etag"] == 'W/"2"'
    assert new["meta"]["lastUpdated"] > body["meta"]["lastUpdated"]
    assert new["extension"][0]["valueCode"] == "final"
    series = (SeriesRef(f"{UID}.1", "CT", 5),)
    add_studies(session_factory, ALICE, [study(UID, series=series)], source="mpps:1.2.3")
    assert fhir_json(read(client, sid))["meta"]["versionId"] == "3"
    with session_factory() as session:
        records = session.execute(select(audit_table)).all()
    assert [(r.action, r.nhs_number, r.outcome, r.trust_ods) for r in records] == [
        ("read", ALICE, 200, "RZZ01")
    ] * 4


def test_a_merged_away_id_names_the_survivor(client: TestClient, session_factory: Factory) -> None:
    [by_acc] = add_studies(session_factory, ALICE, [study(None, "M1")])
    [by_uid] = add_studies(session_factory, ALICE, [study(UID, None)], source="mpps:9")
    [joined] = add_studies(session_factory, ALICE, [study(UID, "M1")])
    survivor, loser = joined, ({by_acc, by_uid} - {joined}).pop()
    response = read(client, loser)
    outcome = outcome_of(response, 404)
    assert f"ImagingStudy/{survivor}" in diagnostics(outcome)
    assert fhir_json(read(client, survivor))["id"] == survivor
    assert match_ids(fhir_json(search(client, ALICE))) == [survivor]


def test_unlinked_and_unknown_studies_are_not_found(
    client: TestClient, session_factory: Factory
) -> None:
    [held] = add_studies(session_factory, None, [study(UID, "H1")], local="MRN1")
    for sid in (held, "0" * 32, "x" * 80):
        assert "not known" in diagnostics(outcome_of(read(client, sid), 404))


def test_endpoints_and_organizations_from_the_trust_registry(
    client: TestClient, registry: TrustRegistry
) -> None:
    rzz03 = registry.get("RZZ03")
    assert rzz03 is not None
    endpoint = fhir_json(client.get("/fhir/Endpoint/RZZ03-dicomweb"))
    assert endpoint["address"] == rzz03.dicomweb_url
    assert endpoint["connectionType"]["code"] == "dicom-wado-rs" and endpoint["payloadType"]
    assert endpoint["managingOrganization"]["identifier"]["value"] == "RZZ03"
    organization = fhir_json(client.get("/fhir/Organization/RZZ03"))
    assert organization["identifier"] == [
        {"system": "https://fhir.nhs.uk/Id/ods-organization-code", "value": "RZZ03"}
    ]
    assert organization["name"] == rzz03.name
    for query in (
        "RZZ03",
        "Organization/RZZ03",
        "https://fhir.nhs.uk/Id/ods-organization-code|RZZ03",
    ):
        found = fhir_json(client.get("/fhir/Endpoint", params={"organization": query}))
        assert match_ids(found) == ["RZZ03-dicomweb"], query
    found = fhir_json(
        client.get(
            "/fhir/Organization",
            params={"identifier": "https://fhir.nhs.uk/Id/ods-organization-code|RZZ02"},
        )
    )
    assert match_ids(found) == ["RZZ02"]
    assert match_ids(fhir_json(client.get("/fhir/Organization"))) == ["RZZ01", "RZZ02", "RZZ03"]
    for path in ("/fhir/Endpoint/RZZ09-dicomweb", "/fhir/Endpoint/RZZ01", "/fhir/Organization/X"):
        outcome_of(client.get(path), 404)


def test_conformance_resources_and_capability_statement(client: TestClient) -> None:
    statement = fhir_json(client.get("/fhir/metadata"))
    assert statement["fhirVersion"] == "4.0.1" and "application/fhir+json" in statement["format"]
    [rest] = statement["rest"]
    assert "security" in rest
    imaging = next(r for r in rest["resource"] if r["type"] == "ImagingStudy")
    declared = {p["name"] for p in imaging["searchParam"]}
    assert declared == {p.name for p in IMAGING_STUDY_PARAMETERS}
    assert imaging["searchInclude"] == ["ImagingStudy:endpoint"]
    organization_sp = next(p for p in imaging["searchParam"] if p["name"] == "organization")
    sp = fhir_json(client.get("/fhir/SearchParameter/ImagingStudy-organization"))
    assert sp["url"] == organization_sp["definition"] and sp["code"] == "organization"
    modality = fhir_json(client.get("/fhir/SearchParameter/ImagingStudy-modality"))
    assert "ImagingStudy.modality" in modality["expression"]
    extension = fhir_json(client.get("/fhir/StructureDefinition/report-status"))
    assert extension["url"] == "https://locator.example/fhir/StructureDefinition/report-status"
    outcome_of(client.get("/fhir/SearchParameter/nope"), 404)


@pytest.mark.parametrize(
    ("method", "path", "status"),
    [
        ("PUT", "/fhir/ImagingStudy/abc", 405),
        ("DELETE", "/fhir/ImagingStudy/abc", 405),
        ("POST", "/fhir/ImagingStudy", 405),
        ("PATCH", "/fhir/Endpoint/RZZ01-dicomweb", 405),
        ("GET", "/fhir/Patient/123", 404),
    ],
)
def test_writes_and_unknown_types(client: TestClient, method: str, path: str, status: int) -> None:
    outcome_of(client.request(method, path, content=b"{}"), status)


def test_content_negotiation(client: TestClient, session_factory: Factory) -> None:
    add_studies(session_factory, ALICE, [study(UID)])
    params = {"patient.identifier": f"{NHS}|{ALICE}"}
    for accept in ("application/fhir+xml", "application/xml", "text/html"):
        response = client.get("/fhir/ImagingStudy", params=params, headers={"Accept": accept})
        assert outcome_of(response, 406)["issue"][0]["code"] == "not-supported"
    for fmt in ("xml", "application/fhir+xml"):
        outcome_of(client.get("/fhir/metadata", params={"_format": fmt}), 406)
    as_json = client.get(
        "/fhir/ImagingStudy", params=params, headers={"Accept": "application/json"}
    )
    assert as_json.headers["content-type"].startswith("application/json")
    fhir_json(as_json)
    for fmt in ("json", "application/fhir+json"):
        response = client.get("/fhir/ImagingStudy", params={**params, "_format": fmt})
        assert response.headers["content-type"].startswith("application/fhir+json")
        assert len(match_ids(fhir_json(response))) == 1


def test_no_patient_data_without_an_audit_record(
    client: TestClient, session_factory: Factory, monkeypatch: pytest.MonkeyPatch
) -> None:
    [sid] = add_studies(session_factory, ALICE, [study(UID)])

    def broken(*_args: Any, **_kwargs: Any) -> None:
        raise RuntimeError("audit store down")

    monkeypatch.setattr(interactions, "record_accesses", broken)
    before = AUDIT_WRITE_FAILURES._value.get()
    for response in (search(client, ALICE), read(client, sid)):
        outcome = outcome_of(response, 503)
        assert ALICE not in response.text and sid not in response.text
        assert "audit" in diagnostics(outcome)
    assert AUDIT_WRITE_FAILURES._value.get() == before + 2


def test_internal_errors_never_echo_internals(
    client: TestClient, session_factory: Factory, monkeypatch: pytest.MonkeyPatch
) -> None:
    def failing(*_args: Any, **_kwargs: Any) -> None:
        raise RuntimeError("SELECT secret_table password=hunter2")

    monkeypatch.setattr(interactions, "search_studies", failing)
    response = search(client, ALICE)
    assert response.status_code == 500
    assert "hunter2" not in response.text and "secret_table" not in response.text
    assert response.json()["resourceType"] == "OperationOutcome"


def test_health_readiness_and_metrics(client: TestClient, session_factory: Factory) -> None:
    assert client.get("/healthz").status_code == 200
    assert client.get("/readyz").json() == {"status": "ready"}
    add_studies(session_factory, ALICE, [study(UID, "Q1")], source="hl7:A")
    add_studies(session_factory, "9990000026", [study(UID, "Q1")], source="hl7:B")
    metrics = client.get("/metrics")
    assert metrics.status_code == 200
    assert "locator_quarantined_studies 1.0" in metrics.text


def test_readiness_fails_without_a_database(registry: TrustRegistry, tmp_path: Any) -> None:
    from locator.store.db import create_db_engine, make_session_factory

    missing = create_db_engine(f"sqlite:///{tmp_path}/no/such/dir/db.sqlite")
    app = make_app(missing, make_session_factory(missing), registry)
    response = client_for(app).get("/readyz")
    assert response.status_code == 503


def test_with_a_jwks_patient_data_needs_a_token_and_metadata_does_not(
    engine: Engine, session_factory: Factory, registry: TrustRegistry, tmp_path: Any
) -> None:
    import json

    from tests.security_helpers import AUDIENCE, ISSUER, claims, jwks_document, mint, rsa_key

    key = rsa_key()
    jwks = tmp_path / "jwks.json"
    jwks.write_text(json.dumps(jwks_document(key)))
    secured = client_for(
        make_app(
            engine,
            session_factory,
            registry,
            jwks=str(jwks),
            jwt_issuer=ISSUER,
            jwt_audience=AUDIENCE,
        )
    )
    [sid] = add_studies(session_factory, ALICE, [study(UID)])
    assert outcome_of(search(secured, ALICE), 401)["issue"][0]["code"] == "login"
    assert fhir_json(secured.get("/fhir/metadata"))["rest"][0]["security"]["service"]
    wrong_scope = {"Authorization": "Bearer " + mint(key, claims("system/AuditEvent.read"))}
    outcome_of(secured.get(f"/fhir/ImagingStudy/{sid}", headers=wrong_scope), 403)
    good = {"Authorization": "Bearer " + mint(key, claims())}
    assert fhir_json(secured.get(f"/fhir/ImagingStudy/{sid}", headers=good))["id"] == sid
    found = secured.get("/fhir/ImagingStudy", params={"patient.identifier": ALICE}, headers=good)
    assert match_ids(fhir_json(found)) == [sid]


def test_an_unreachable_database_is_503_not_500(registry: TrustRegistry, tmp_path: Any) -> None:
    from locator.store.db import create_db_engine, make_session_factory

    missing = create_db_engine(f"sqlite:///{tmp_path}/no/such/dir/db.sqlite")
    client = client_for(make_app(missing, make_session_factory(missing), registry))
    response = search(client, ALICE)
    assert "unavailable" in diagnostics(outcome_of(response, 503))
    assert ALICE not in response.text
