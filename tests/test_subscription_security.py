"""Subscriptions behind tokens, on SQLite and PostgreSQL: the Subscription scopes (SMART v1
and v2 forms) decide who may create, read, search, update and delete; a client sees and
changes only its own subscriptions; with tokens, an endpoint must be https."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.notify_helpers import FHIR_JSON, subscription
from tests.security_helpers import (
    AUDIENCE,
    ISSUER,
    SigningKey,
    audit_rows,
    build_app,
    claims,
    jwks_document,
    mint,
    rsa_key,
    serve_app,
)

PATIENT = "9990000018"
ENDPOINT = "https://127.0.0.1:9/care-record/hook"


@pytest.fixture
def served(db_url: str, tmp_path: Path) -> Iterator[tuple[str, SigningKey, Any]]:
    key = rsa_key()
    jwks = tmp_path / "jwks.json"
    jwks.write_text(json.dumps(jwks_document(key)))
    app, factory = build_app(
        db_url,
        jwks=str(jwks),
        jwt_issuer=ISSUER,
        jwt_audience=AUDIENCE,
        subscription_allowed_networks="127.0.0.0/8",
    )
    with serve_app(app) as url:
        yield url, key, factory


def auth(key: SigningKey, scope: str, client: str = "care-record-1") -> dict[str, str]:
    return {"Authorization": "Bearer " + mint(key, claims(scope, client_id=client))}


def create(url: str, headers: dict[str, str], endpoint: str = ENDPOINT) -> httpx.Response:
    return httpx.post(
        f"{url}/fhir/Subscription",
        content=json.dumps(subscription(PATIENT, endpoint)),
        headers={"Content-Type": FHIR_JSON, **headers},
    )


@pytest.mark.parametrize(
    "scope",
    [
        "system/ImagingStudy.read",
        "system/Subscription.read",
        "system/Subscription.rs",
        "user/Subscription.write",
        "system/Subscription.r",
    ],
)
def test_creating_needs_a_subscription_write_scope(
    served: tuple[str, SigningKey, Any], scope: str
) -> None:
    url, key, factory = served
    response = create(url, auth(key, scope))
    assert response.status_code == 403
    assert "insufficient_scope" in response.headers["www-authenticate"]
    assert httpx.get(f"{url}/fhir/Subscription").status_code == 401
    refused = [r for r in audit_rows(factory) if r.resource_type == "Subscription"]
    assert [(r.outcome, r.client_id) for r in refused] == [(403, "care-record-1"), (401, None)]


@pytest.mark.parametrize(
    ("write", "read"),
    [
        ("system/Subscription.write", "system/Subscription.read"),
        ("system/Subscription.cruds", "system/Subscription.rs"),
        ("system/Subscription.cud", "system/Subscription.cruds"),
    ],
)
def test_the_scopes_allow_and_a_client_sees_only_its_own(
    served: tuple[str, SigningKey, Any], write: str, read: str
) -> None:
    url, key, _factory = served
    created = create(url, auth(key, write))
    assert created.status_code == 201, created.text
    sub_id = created.json()["id"]
    mine = auth(key, read)
    got = httpx.get(f"{url}/fhir/Subscription/{sub_id}", headers=mine)
    assert got.status_code == 200 and got.json()["channel"]["endpoint"] == ENDPOINT
    listed = httpx.get(f"{url}/fhir/Subscription", headers=mine).json()
    assert [e["resource"]["id"] for e in listed.get("entry", [])] == [sub_id]
    # Reading needs the read scope; writing the write scope.
    assert (
        httpx.get(
            f"{url}/fhir/Subscription/{sub_id}", headers=auth(key, "system/Subscription.c")
        ).status_code
        == 403
    )
    if read in ("system/Subscription.read", "system/Subscription.rs"):
        assert httpx.delete(f"{url}/fhir/Subscription/{sub_id}", headers=mine).status_code == 403
    # Another client: nothing to see, nothing to change.
    theirs_read = auth(key, read, client="someone-else")
    theirs_write = auth(key, write, client="someone-else")
    assert httpx.get(f"{url}/fhir/Subscription/{sub_id}", headers=theirs_read).status_code == 404
    assert httpx.get(f"{url}/fhir/Subscription", headers=theirs_read).json()["total"] == 0
    assert (
        httpx.delete(f"{url}/fhir/Subscription/{sub_id}", headers=theirs_write).status_code == 404
    )
    put = httpx.put(
        f"{url}/fhir/Subscription/{sub_id}",
        content=json.dumps(subscription(PATIENT, ENDPOINT)),
        headers={"Content-Type": FHIR_JSON, **theirs_write},
    )
    assert put.status_code == 404
    assert (
        httpx.delete(f"{url}/fhir/Subscription/{sub_id}", headers=auth(key, write)).status_code
        == 204
    )


def test_with_tokens_an_endpoint_must_be_https(served: tuple[str, SigningKey, Any]) -> None:
    url, key, _factory = served
    response = create(url, auth(key, "system/Subscription.write"), endpoint="http://127.0.0.1:9/x")
    assert response.status_code == 422
    assert "https" in response.json()["issue"][0]["diagnostics"]


def test_a_refused_token_is_401(served: tuple[str, SigningKey, Any]) -> None:
    url, _key, _factory = served
    response = create(url, {"Authorization": "Bearer not-a-token"})
    assert response.status_code == 401
    body: dict[str, Any] = response.json()
    assert body["resourceType"] == "OperationOutcome"
