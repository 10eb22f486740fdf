"""The audit trail end to end on both databases: allowed and refused look-ups are recorded
before the answer, read back as FHIR AuditEvent (validated with fhir.resources R4B), filtered
by patient, date, agent and holding trust; rows are append-only by trigger; no audit, no data."""

from __future__ import annotations

import base64
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from fhir.resources.R4B.auditevent import AuditEvent
from fhir.resources.R4B.bundle import Bundle
from sqlalchemy import Engine, text
from sqlalchemy.exc import DBAPIError

from tests.security_helpers import (
    AUDIENCE,
    ISSUER,
    SigningKey,
    audit_rows,
    build_app,
    claims,
    ec_key,
    jwks_document,
    mint,
    seed_study,
    serve_app,
)

ALICE = "9990000018"
BOB = "9990000026"
NHS_SYSTEM = "https://fhir.nhs.uk/Id/nhs-number"


@pytest.fixture(scope="module")
def key() -> SigningKey:
    return ec_key("audit-key")


class Api:
    def __init__(self, url: str, factory: Any, key: SigningKey) -> None:
        self.url, self.factory, self.key = url, factory, key

    def token(self, scope: str, **extra: Any) -> dict[str, str]:
        return {"Authorization": f"Bearer {mint(self.key, claims(scope, **extra))}"}

    def search(self, nhs: str, headers: dict[str, str]) -> httpx.Response:
        query = {"patient.identifier": f"{NHS_SYSTEM}|{nhs}"}
        return httpx.post(f"{self.url}/fhir/ImagingStudy/_search", data=query, headers=headers)

    def audit(self, headers: dict[str, str] | None = None, **params: str) -> httpx.Response:
        headers = headers or self.token("system/AuditEvent.rs", sub="auditor", organisation=None)
        return httpx.get(f"{self.url}/fhir/AuditEvent", params=params, headers=headers)


def start(db_url: str, tmp_path: Path, key: SigningKey, **overrides: Any) -> Any:
    jwks = tmp_path / "jwks.json"
    jwks.write_text(json.dumps(jwks_document(key)))
    app, factory = build_app(
        db_url, jwks=str(jwks), jwt_issuer=ISSUER, jwt_audience=AUDIENCE, **overrides
    )
    seed_study(factory, nhs=ALICE, trust="RZZ01", uid="1.2.826.0.1.1001")
    seed_study(factory, nhs=BOB, trust="RZZ02", uid="1.2.826.0.1.2002")
    return app, factory


@pytest.fixture
def api(db_url: str, tmp_path: Path, key: SigningKey) -> Iterator[Api]:
    app, factory = start(db_url, tmp_path, key)
    with serve_app(app) as url:
        yield Api(url, factory, key)


def test_allowed_search_is_audited_and_read_back_as_audit_event(api: Api) -> None:
    headers = {
        **api.token("user/ImagingStudy.rs"),
        "X-Purpose-Of-Use": "TREAT",
        "X-Request-ID": "req-alice-1",
    }
    found = api.search(ALICE, headers)
    assert found.status_code == 200 and found.json()["total"] == 1
    assert found.headers["X-Request-ID"] == "req-alice-1"
    [row] = [r for r in audit_rows(api.factory) if r.resource_type == "ImagingStudy"]
    assert (row.nhs_number, row.outcome, row.result_count) == (ALICE, 200, 1)
    assert (row.subject, row.client_id, row.organisation, row.role) == (
        "dr.jones@rzz02",
        "ehr-client-7",
        "RZZ02",
        "clinician",
    )
    assert (row.purpose_of_use, row.request_id, row.trust_ods) == ("TREAT", "req-alice-1", "RZZ01")

    answer = api.audit(**{"patient.identifier": f"{NHS_SYSTEM}|{ALICE}"})
    assert answer.status_code == 200, answer.text
    bundle = Bundle.model_validate(answer.json())
    assert bundle.type == "searchset" and bundle.total == 1
    event = AuditEvent.model_validate(answer.json()["entry"][0]["resource"])
    raw = answer.json()["entry"][0]["resource"]
    assert event.action == "E" and event.outcome == "0"
    assert raw["type"]["code"] == "rest" and raw["subtype"][0]["code"] == "search-type"
    requestor = raw["agent"][0]
    assert requestor["who"]["identifier"] == {"value": "dr.jones@rzz02", "system": ISSUER}
    assert requestor["altId"] == "ehr-client-7" and requestor["requestor"] is True
    assert raw["agent"][1]["who"]["identifier"]["value"] == "RZZ02"
    assert raw["purposeOfEvent"][0]["coding"][0]["code"] == "TREAT"
    patient = raw["entity"][0]["what"]["identifier"]
    assert patient == {"system": NHS_SYSTEM, "value": ALICE}
    query = base64.b64decode(raw["entity"][1]["query"]).decode()
    assert query.startswith("ImagingStudy?patient.identifier=") and ALICE not in query
    assert {"system": "https://fhir.nhs.uk/Id/ods-organization-code", "value": "RZZ01"} in [
        e["what"].get("identifier") for e in raw["entity"]
    ]
    assert raw["entity"][-1]["what"]["identifier"]["value"] == "req-alice-1"
    assert raw["source"]["observer"]["display"].startswith("locator")


@pytest.mark.parametrize(
    ("headers_for", "status", "subject"),
    [
        (lambda api: {}, 401, None),
        (lambda api: {"Authorization": "Bearer not.a.jwt"}, 401, None),
        (lambda api: api.token("user/Observation.rs"), 403, "dr.jones@rzz02"),
    ],
    ids=["no token", "bad token", "no scope"],
)
def test_refused_searches_are_audited(
    api: Api, headers_for: Any, status: int, subject: str | None
) -> None:
    headers = {**headers_for(api), "X-Request-ID": f"refused-{status}"}
    refused = api.search(BOB, headers)
    assert refused.status_code == status
    assert BOB not in refused.text
    [row] = audit_rows(api.factory)
    assert (row.nhs_number, row.outcome, row.subject, row.request_id) == (
        BOB,
        status,
        subject,
        f"refused-{status}",
    )
    assert row.result_count is None
    events = api.audit(outcome="4").json()
    Bundle.model_validate(events)
    assert events["total"] == 1
    assert events["entry"][0]["resource"]["outcomeDesc"] == f"HTTP {status}"


def test_rate_limited_look_ups_are_refused_and_audited(
    db_url: str, tmp_path: Path, key: SigningKey
) -> None:
    app, factory = start(db_url, tmp_path, key, patient_lookups_per_minute=2)
    with serve_app(app) as url:
        api = Api(url, factory, key)
        greedy = api.token("user/ImagingStudy.rs", client_id="greedy")
        assert [api.search(ALICE, greedy).status_code for _ in range(3)] == [200, 200, 429]
        limited = api.search(ALICE, greedy)
        assert limited.status_code == 429 and int(limited.headers["Retry-After"]) >= 1
        assert limited.json()["issue"][0]["code"] == "throttled"
        other = api.token("user/ImagingStudy.rs", client_id="patient-one")
        assert api.search(ALICE, other).status_code == 200
    outcomes = [(r.client_id, r.outcome) for r in audit_rows(factory)]
    assert outcomes == [
        ("greedy", 200),
        ("greedy", 200),
        ("greedy", 429),
        ("greedy", 429),
        ("patient-one", 200),
    ]


def test_audit_search_filters(api: Api) -> None:
    api.search(ALICE, api.token("user/ImagingStudy.rs", sub="alice-doctor", client_id=None))
    api.search(BOB, api.token("user/ImagingStudy.rs", sub="bob-doctor", client_id="bob-app"))
    api.search(BOB, {})  # refused: 401

    def total(**params: str) -> int:
        answer = api.audit(**params)
        assert answer.status_code == 200, answer.text
        Bundle.model_validate(answer.json())
        return int(answer.json()["total"])

    assert total(**{"patient.identifier": BOB}) == 2
    assert total(agent="alice-doctor") == 1
    assert total(agent="bob-app") == 1
    assert total(organization="RZZ02") == 1
    assert total(organization="https://fhir.nhs.uk/Id/ods-organization-code|RZZ01") == 1
    assert total(outcome="4") == 1  # the refusal (audit searches themselves are outcome 0)
    assert total(date="ge2020-01-01") >= 3
    assert total(date="lt2020-01-01") == 0
    assert api.audit(date="sa2020").status_code == 400
    assert api.audit(unknown="x").status_code == 400
    assert api.audit(**{"patient.identifier": "9990000019"}).status_code == 400


def test_a_trust_reads_only_who_looked_at_its_patients(api: Api) -> None:
    api.search(ALICE, api.token("user/ImagingStudy.rs"))  # shown RZZ01's study
    api.search(BOB, api.token("user/ImagingStudy.rs"))  # shown RZZ02's study
    rzz01 = api.token("system/AuditEvent.rs", sub="rzz01-ig", organisation="RZZ01")
    mine = api.audit(rzz01)
    assert mine.status_code == 200
    patients = [
        e["resource"]["entity"][0]["what"]["identifier"]["value"] for e in mine.json()["entry"]
    ]
    assert patients == [ALICE]
    assert api.audit(rzz01, organization="RZZ02").status_code == 403
    everyone = api.audit()  # an auditor whose token names no trust
    assert everyone.json()["total"] >= 2


def test_audit_searches_are_themselves_audited(api: Api) -> None:
    api.audit(**{"patient.identifier": ALICE})
    [row] = audit_rows(api.factory)
    assert (row.resource_type, row.nhs_number, row.subject) == ("AuditEvent", ALICE, "auditor")


def test_no_audit_no_data(
    db_url: str, backend: str, tmp_path: Path, key: SigningKey, engine: Engine
) -> None:
    app, factory = start(db_url, tmp_path, key)
    with engine.begin() as conn:  # the audit store starts refusing writes
        if backend == "sqlite":
            conn.execute(
                text(
                    "CREATE TRIGGER audit_broken BEFORE INSERT ON audit "
                    "BEGIN SELECT RAISE(ABORT, 'audit store down'); END"
                )
            )
        else:
            conn.execute(
                text(
                    "CREATE FUNCTION audit_broken() RETURNS trigger LANGUAGE plpgsql "
                    "AS $$ BEGIN RAISE EXCEPTION 'audit store down'; END $$"
                )
            )
            conn.execute(
                text(
                    "CREATE TRIGGER audit_broken BEFORE INSERT ON audit "
                    "FOR EACH ROW EXECUTE FUNCTION audit_broken()"
                )
            )
    with serve_app(app) as url:
        api = Api(url, factory, key)
        answer = api.search(ALICE, api.token("user/ImagingStudy.rs"))
        assert answer.status_code == 503
        assert answer.json()["resourceType"] == "OperationOutcome"
        assert "1.2.826.0.1.1001" not in answer.text and "RZZ01" not in answer.text
    assert audit_rows(factory) == []


def test_audit_rows_are_append_only(api: Api, backend: str, engine: Engine) -> None:
    api.search(ALICE, api.token("user/ImagingStudy.rs"))
    statements = ["UPDATE audit SET nhs_number = '9990000026'", "DELETE FROM audit"]
    if backend == "postgres":
        statements.append("TRUNCATE audit")
    for statement in statements:
        with pytest.raises(DBAPIError, match="append-only"), engine.begin() as conn:
            conn.execute(text(statement))
    [row] = audit_rows(api.factory)
    assert row.nhs_number == ALICE


def test_request_ids(api: Api) -> None:
    token = api.token("user/ImagingStudy.rs")
    given = api.search(ALICE, {**token, "X-Request-ID": "abc-123"})
    assert given.headers["X-Request-ID"] == "abc-123"
    for bad in ("has space", "x" * 101, ALICE):  # unsafe ones are replaced, never echoed
        answer = api.search(ALICE, {**token, "X-Request-ID": bad})
        assert answer.headers["X-Request-ID"] != bad
    generated = api.search(ALICE, token).headers["X-Request-ID"]
    assert [r.request_id for r in audit_rows(api.factory)][-1] == generated
    assert len({r.request_id for r in audit_rows(api.factory)}) == 5


def test_every_patient_interaction_of_the_api_is_audited(api: Api) -> None:
    seed_study(api.factory, nhs=ALICE, trust="RZZ02", uid="1.2.826.0.1.1003")
    token = api.token("user/ImagingStudy.rs")
    base = f"{api.url}/fhir"
    nhs = f"{NHS_SYSTEM}|{ALICE}"
    first = httpx.get(
        f"{base}/ImagingStudy", params={"patient.identifier": nhs, "_count": "1"}, headers=token
    )
    assert first.status_code == 200
    next_url = next(link["url"] for link in first.json()["link"] if link["relation"] == "next")
    assert ALICE not in next_url
    assert httpx.get(next_url, headers=token).status_code == 200
    counted = httpx.get(
        f"{base}/ImagingStudy",
        params={"patient.identifier": nhs, "_summary": "count"},
        headers=token,
    )
    assert counted.json()["total"] == 2
    study_id = first.json()["entry"][0]["resource"]["id"]
    assert httpx.get(f"{base}/ImagingStudy/{study_id}", headers=token).status_code == 200
    assert httpx.get(f"{base}/ImagingStudy/{'0' * 32}", headers=token).status_code == 404
    assert api.search(ALICE, token).status_code == 200
    bad = httpx.get(
        f"{base}/ImagingStudy", params={"patient.identifier": "9990000019"}, headers=token
    )
    assert bad.status_code == 400
    rows = [(r.action, r.nhs_number, r.outcome) for r in audit_rows(api.factory)]
    assert rows == [
        ("search", ALICE, 200),  # first page
        ("search", ALICE, 200),  # next page (the cursor carries the patient)
        ("search", ALICE, 200),  # _summary=count
        ("read", ALICE, 200),
        ("read", None, 404),
        ("search", ALICE, 200),  # POST _search
        ("search", None, 400),  # not a valid NHS Number: nobody's
    ]
