"""Helpers for the FHIR API tests: the app over httpx, test data through apply_notice, and
validation of every response with fhir.resources' R4B models."""

from __future__ import annotations

import itertools
import warnings
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
from fastapi import FastAPI
from fhir.resources.R4B.bundle import Bundle
from fhir.resources.R4B.capabilitystatement import CapabilityStatement
from fhir.resources.R4B.endpoint import Endpoint
from fhir.resources.R4B.imagingstudy import ImagingStudy
from fhir.resources.R4B.operationoutcome import OperationOutcome
from fhir.resources.R4B.organization import Organization
from fhir.resources.R4B.searchparameter import SearchParameter
from fhir.resources.R4B.structuredefinition import StructureDefinition
from sqlalchemy import Engine
from sqlalchemy.orm import Session, sessionmaker

from locator.api.app import create_app
from locator.config import Settings
from locator.core.nhs_number import NHS_NUMBER_SYSTEM, check_digit
from locator.core.notice import Coding, SeriesRef, StudyRef, StudyStatus
from locator.trusts import TrustRegistry
from tests.index_helpers import apply_all, notice

with warnings.catch_warnings():
    # Starlette's TestClient is an httpx.Client; its advice to move to httpx2 is not ours.
    warnings.simplefilter("ignore")
    from starlette.testclient import TestClient

NHS = NHS_NUMBER_SYSTEM
T0 = datetime(2024, 1, 10, 9, 0, tzinfo=UTC)
CT_HEAD = Coding("https://nicip.nhs.uk", "CHEAD", "CT Head")

MODELS: dict[str, Any] = {
    "Bundle": Bundle,
    "ImagingStudy": ImagingStudy,
    "Endpoint": Endpoint,
    "Organization": Organization,
    "OperationOutcome": OperationOutcome,
    "CapabilityStatement": CapabilityStatement,
    "SearchParameter": SearchParameter,
    "StructureDefinition": StructureDefinition,
}


def nhs_numbers(prefix: str = "999") -> Iterator[str]:
    """Valid NHS Numbers in the test range, in order."""
    for n in itertools.count(1):
        first_nine = f"{prefix}{n:06d}"
        digit = check_digit(first_nine)
        if digit is not None:
            yield first_nine + str(digit)


ALICE, BOB, CAROL = itertools.islice(nhs_numbers(), 3)


def make_app(
    engine: Engine,
    session_factory: sessionmaker[Session],
    registry: TrustRegistry,
    **settings: Any,
) -> FastAPI:
    values = {"cursor_secret": "test-cursor-secret", "database_url": str(engine.url)}
    values.update(settings)
    return create_app(
        Settings(**values), engine=engine, session_factory=session_factory, registry=registry
    )


def client_for(app: FastAPI) -> TestClient:
    """httpx (Starlette's TestClient is an httpx.Client) talking ASGI to the app."""
    return TestClient(app, base_url="http://locator.test", raise_server_exceptions=False)


def validate(body: dict[str, Any]) -> Any:
    """Parse a response body with the R4B model of its resourceType (raises if invalid);
    every resource inside a Bundle is validated with its own model too."""
    model = MODELS[body["resourceType"]]
    parsed = model.model_validate(body)
    for item in body.get("entry", []):
        inner = item["resource"]
        MODELS[inner["resourceType"]].model_validate(inner)
    for inner in body.get("contained", []):
        MODELS[inner["resourceType"]].model_validate(inner)
    return parsed


def fhir_json(response: httpx.Response, status: int = 200) -> dict[str, Any]:
    assert response.status_code == status, (response.status_code, response.text[:500])
    assert response.headers["content-type"].startswith(
        ("application/fhir+json", "application/json")
    )
    body: dict[str, Any] = response.json()
    validate(body)
    return body


def outcome_of(response: httpx.Response, status: int) -> dict[str, Any]:
    body = fhir_json(response, status)
    assert body["resourceType"] == "OperationOutcome"
    return body


def diagnostics(body: dict[str, Any]) -> str:
    return " ".join(i.get("diagnostics", "") for i in body["issue"])


def study(
    uid: str | None = None,
    accession: str | None = None,
    *,
    started: datetime | None = T0,
    modalities: tuple[str, ...] = ("CT",),
    status: StudyStatus = StudyStatus.AVAILABLE,
    series: tuple[SeriesRef, ...] | None = None,
    **extra: Any,
) -> StudyRef:
    return StudyRef(
        study_uid=uid,
        accession=accession,
        modalities=modalities,
        procedure=CT_HEAD,
        started=started,
        status=status,
        series=series,
        **extra,
    )


def add_studies(
    factory: sessionmaker[Session],
    nhs: str | None,
    refs: list[StudyRef],
    *,
    trust: str = "RZZ01",
    source: str = "hl7:CRIS",
    local: str | None = None,
    at: datetime | None = None,
) -> list[str]:
    """Apply one notice per study (the real path: locator.core.index.apply_notice)."""
    when = at or datetime.now(UTC)
    notices = [
        notice(ref, trust=trust, source=source, nhs=nhs, local=local, at=when + timedelta(0, 0, i))
        for i, ref in enumerate(refs)
    ]
    return [r.study_ids[0] for r in apply_all(factory, notices)]


def patient_studies(
    factory: sessionmaker[Session], nhs: str, count: int, *, trust: str = "RZZ01", prefix: str = "1"
) -> list[str]:
    """`count` studies a day apart (the newest first in the returned ids)."""
    refs = [
        study(f"1.2.826.0.1.3680043.10.{prefix}.{i}", f"{prefix}ACC{i}", started=T0 + timedelta(i))
        for i in range(count)
    ]
    return list(reversed(add_studies(factory, nhs, refs, trust=trust)))


def search(client: TestClient, nhs: str, **params: Any) -> httpx.Response:
    return client.get("/fhir/ImagingStudy", params={"patient.identifier": f"{NHS}|{nhs}", **params})


def match_ids(bundle: dict[str, Any]) -> list[str]:
    return [e["resource"]["id"] for e in bundle.get("entry", []) if e["search"]["mode"] == "match"]


def link(bundle: dict[str, Any], relation: str) -> str | None:
    return next((li["url"] for li in bundle.get("link", []) if li["relation"] == relation), None)
