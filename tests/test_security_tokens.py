"""Bearer tokens over HTTP against the real app: the token matrix of issue 6, SMART scopes,
the public endpoints, and the JWKS rules (keys bound to one algorithm)."""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from locator.api.jwks import bind_key
from locator.api.scopes import allows
from tests.security_helpers import (
    AUDIENCE,
    ISSUER,
    SigningKey,
    build_app,
    claims,
    ec_key,
    forge,
    forge_hs256_with_public_key,
    jwks_document,
    mint,
    rsa_key,
    seed_study,
    serve_app,
    tamper,
)

NHS = "9990000018"
SEARCH = f"/fhir/ImagingStudy?patient.identifier=https://fhir.nhs.uk/Id/nhs-number|{NHS}"


@pytest.fixture(scope="module")
def keys() -> dict[str, SigningKey]:
    return {"rsa": rsa_key("rsa-1"), "ec": ec_key("ec-1"), "stranger": rsa_key("rsa-1")}


@pytest.fixture(scope="module")
def base_url(
    keys: dict[str, SigningKey], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[str]:
    folder = tmp_path_factory.mktemp("tokens")
    jwks = folder / "jwks.json"
    jwks.write_text(json.dumps(jwks_document(keys["rsa"], keys["ec"])))
    db_url = f"sqlite:///{folder / 'locator.db'}"
    from locator.store import migrate
    from locator.store.db import create_db_engine

    engine = create_db_engine(db_url)
    migrate.upgrade(engine)
    engine.dispose()
    app, factory = build_app(db_url, jwks=str(jwks), jwt_issuer=ISSUER, jwt_audience=AUDIENCE)
    seed_study(factory, nhs=NHS)
    with serve_app(app) as url:
        yield url


Case = Callable[[dict[str, SigningKey]], str | None]


def _ok(scope: str | None, kind: str = "rsa", **extra: Any) -> Case:
    """A token signed by a JWKS key; callable claim values are evaluated when minted."""

    def make(k: dict[str, SigningKey]) -> str:
        values = {name: v() if callable(v) else v for name, v in extra.items()}
        return mint(k[kind], claims(scope, **values))  # type: ignore[arg-type]

    return make


def _ago(seconds: int) -> Callable[[], int]:
    return lambda: int(time.time()) - seconds


def _embedded(attacker: SigningKey) -> str:
    from jose import jwt

    headers = {"kid": attacker.kid, "jwk": attacker.jwk(), "jku": "https://evil.test/jwks"}
    payload = claims("user/ImagingStudy.rs")
    return str(jwt.encode(payload, attacker.private_pem.decode(), "RS256", headers=headers))


TOKEN_MATRIX: list[tuple[str, Case, int]] = [
    ("v1 user read", _ok("user/ImagingStudy.read"), 200),
    ("v2 user rs", _ok("user/ImagingStudy.rs"), 200),
    ("v2 system rs, ES256", _ok("system/ImagingStudy.rs", "ec"), 200),
    ("v1 system read", _ok("system/ImagingStudy.read"), 200),
    ("v2 search only", _ok("user/ImagingStudy.s"), 200),
    ("v2 cruds", _ok("user/ImagingStudy.cruds"), 200),
    ("v1 wildcard user/*.read", _ok("user/*.read"), 200),
    ("v2 wildcard system/*.rs", _ok("system/*.rs"), 200),
    ("v1 wildcard user/*.*", _ok("user/*.*"), 200),
    ("several scopes, one fits", _ok("openid fhirUser user/ImagingStudy.rs"), 200),
    ("scp list claim", _ok(None, scp=["system/ImagingStudy.rs"]), 200),
    ("expired, within leeway", _ok("user/ImagingStudy.rs", exp=_ago(5)), 200),
    ("v2 read only cannot search", _ok("user/ImagingStudy.r"), 403),
    ("v2 letters out of order", _ok("user/ImagingStudy.sr"), 403),
    ("v1 write only", _ok("user/ImagingStudy.write"), 403),
    ("patient context (no launch)", _ok("patient/ImagingStudy.read"), 403),
    ("missing scope: other resource", _ok("user/Observation.rs"), 403),
    ("missing scope: audit only", _ok("system/AuditEvent.rs"), 403),
    ("v2 query-constrained scope", _ok("user/ImagingStudy.rs?modality=CT"), 403),
    ("no scope claim", _ok(None), 403),
    ("expired", _ok("user/ImagingStudy.rs", exp=_ago(120)), 401),
    ("not yet valid (nbf)", _ok("user/ImagingStudy.rs", nbf=_ago(-300)), 401),
    ("no exp", _ok("user/ImagingStudy.rs", exp=None), 401),
    ("wrong iss", _ok("user/ImagingStudy.rs", iss="https://evil.test"), 401),
    ("no iss", _ok("user/ImagingStudy.rs", iss=None), 401),
    ("wrong aud", _ok("user/ImagingStudy.rs", aud="https://other.test/fhir"), 401),
    ("no aud", _ok("user/ImagingStudy.rs", aud=None), 401),
    (
        "alg none",
        lambda k: forge({"alg": "none", "typ": "JWT"}, claims("user/ImagingStudy.rs")),
        401,
    ),
    ("alg None, kid", lambda k: forge({"alg": "None", "kid": "rsa-1"}, claims("user/*.rs")), 401),
    (
        "HS256 keyed with the public PEM",
        lambda k: forge_hs256_with_public_key(k["rsa"], claims("user/ImagingStudy.rs")),
        401,
    ),
    (
        "HS256 keyed with the public JWK",
        lambda k: forge_hs256_with_public_key(
            k["rsa"], claims("user/ImagingStudy.rs"), secret=json.dumps(k["rsa"].jwk()).encode()
        ),
        401,
    ),
    (
        "HS512 keyed with the EC public PEM",
        lambda k: forge({"alg": "HS512", "kid": "ec-1"}, claims("user/*.rs"), b"x" * 64),
        401,
    ),
    ("unknown kid", lambda k: mint(k["rsa"], claims("user/ImagingStudy.rs"), kid="rsa-9"), 401),
    ("no kid (several keys)", lambda k: mint(k["ec"], claims("user/*.rs"), kid=None), 200),
    (
        "key not in the JWKS, same kid",
        lambda k: mint(k["stranger"], claims("user/ImagingStudy.rs")),
        401,
    ),
    ("attacker's key embedded in the header (jwk, jku)", lambda k: _embedded(k["stranger"]), 401),
    (
        "RS256 key named for ES256",
        lambda k: forge({"alg": "ES256", "kid": "rsa-1"}, claims("user/*.rs"), b"\0" * 64),
        401,
    ),
    (
        "tampered payload (scope)",
        lambda k: tamper(mint(k["rsa"], claims("user/Observation.rs")), scope="user/*.rs"),
        401,
    ),
    (
        "tampered payload (sub)",
        lambda k: tamper(mint(k["rsa"], claims("user/*.rs")), sub="someone-else"),
        401,
    ),
    ("truncated signature", lambda k: mint(k["rsa"], claims("user/*.rs"))[:-10], 401),
    ("not a JWT", lambda k: "not-a-token", 401),
    ("missing token", lambda k: None, 401),
]


@pytest.mark.parametrize(("name", "make", "status"), TOKEN_MATRIX, ids=[c[0] for c in TOKEN_MATRIX])
def test_token_matrix(
    base_url: str, keys: dict[str, SigningKey], name: str, make: Case, status: int
) -> None:
    token = make(keys)
    headers = {"Authorization": f"Bearer {token}"} if token is not None else {}
    response = httpx.get(base_url + SEARCH, headers=headers)
    assert response.status_code == status, response.text
    body = response.json()
    if status == 200:
        assert body["resourceType"] == "Bundle" and body["total"] == 1
        return
    assert body["resourceType"] == "OperationOutcome"
    challenge = response.headers["WWW-Authenticate"]
    assert challenge.startswith('Bearer realm="locator"')
    if status == 401 and token is not None:
        assert 'error="invalid_token"' in challenge
        assert body["issue"][0]["code"] in ("login", "expired")
    if status == 401 and token is None:
        assert "error=" not in challenge
    if status == 403:
        assert 'error="insufficient_scope"' in challenge
        assert body["issue"][0]["code"] == "forbidden"


@pytest.mark.parametrize("header", ["Basic dXNlcjpwYXNz", "Bearer", "Bearer a.b", "Token abc"])
def test_malformed_authorization_headers_get_401(base_url: str, header: str) -> None:
    response = httpx.get(base_url + SEARCH, headers={"Authorization": header})
    assert response.status_code == 401
    assert response.json()["resourceType"] == "OperationOutcome"


def test_read_needs_r_and_search_needs_s(base_url: str, keys: dict[str, SigningKey]) -> None:
    search_only = mint(keys["rsa"], claims("user/ImagingStudy.s"))
    read_only = mint(keys["rsa"], claims("user/ImagingStudy.r"))
    found = httpx.get(base_url + SEARCH, headers={"Authorization": f"Bearer {search_only}"})
    study_id = found.json()["entry"][0]["resource"]["id"]
    read_url = f"{base_url}/fhir/ImagingStudy/{study_id}"
    assert httpx.get(read_url, headers={"Authorization": f"Bearer {read_only}"}).status_code == 200
    denied = httpx.get(read_url, headers={"Authorization": f"Bearer {search_only}"})
    assert denied.status_code == 403


def test_post_search_needs_a_token_too(base_url: str, keys: dict[str, SigningKey]) -> None:
    form = {"patient.identifier": f"https://fhir.nhs.uk/Id/nhs-number|{NHS}"}
    url = base_url + "/fhir/ImagingStudy/_search"
    assert httpx.post(url, data=form).status_code == 401
    token = mint(keys["ec"], claims("system/ImagingStudy.rs"))
    response = httpx.post(url, data=form, headers={"Authorization": f"Bearer {token}"})
    assert response.status_code == 200 and response.json()["total"] == 1


@pytest.mark.parametrize("path", ["/fhir/Endpoint/RZZ01-dicomweb", "/fhir/Organization/RZZ01"])
def test_endpoint_and_organization_need_the_imaging_scope(
    base_url: str, keys: dict[str, SigningKey], path: str
) -> None:
    assert httpx.get(base_url + path).status_code == 401
    wrong = mint(keys["rsa"], claims("system/AuditEvent.rs"))
    assert (
        httpx.get(base_url + path, headers={"Authorization": f"Bearer {wrong}"}).status_code == 403
    )
    right = mint(keys["rsa"], claims("user/ImagingStudy.rs"))
    got = httpx.get(base_url + path, headers={"Authorization": f"Bearer {right}"})
    assert got.status_code in (200, 404)  # the scope let it through; the id is the API's


def test_audit_event_needs_a_system_audit_scope(base_url: str, keys: dict[str, SigningKey]) -> None:
    url = base_url + "/fhir/AuditEvent"
    for scope, status in [
        ("user/ImagingStudy.rs", 403),
        ("user/AuditEvent.rs", 403),  # audit reading is for systems (auditors), not users
        ("system/AuditEvent.read", 200),
        ("system/AuditEvent.rs", 200),
        ("system/*.read", 200),
    ]:
        token = mint(keys["rsa"], claims(scope))
        got = httpx.get(url, headers={"Authorization": f"Bearer {token}"})
        assert got.status_code == status, (scope, got.text)
    assert httpx.get(url).status_code == 401


def test_metadata_and_smart_configuration_are_public(base_url: str) -> None:
    metadata = httpx.get(base_url + "/fhir/metadata")
    assert metadata.status_code == 200
    security = metadata.json()["rest"][0]["security"]
    assert security["service"][0]["coding"][0]["code"] == "SMART-on-FHIR"
    smart = httpx.get(base_url + "/fhir/.well-known/smart-configuration")
    assert smart.status_code == 200
    config = smart.json()
    assert config["issuer"] == ISSUER
    assert "permission-v2" in config["capabilities"]
    assert "system/ImagingStudy.rs" in config["scopes_supported"]


def test_open_mode_needs_no_token(tmp_path: Path) -> None:
    from locator.store import migrate
    from locator.store.db import create_db_engine

    db_url = f"sqlite:///{tmp_path / 'open.db'}"
    engine = create_db_engine(db_url)
    migrate.upgrade(engine)
    engine.dispose()
    app, factory = build_app(db_url)
    seed_study(factory, nhs=NHS)
    with serve_app(app) as url:
        response = httpx.get(url + SEARCH)
        assert response.status_code == 200 and response.json()["total"] == 1
        smart = httpx.get(url + "/fhir/.well-known/smart-configuration").json()
        assert smart["capabilities"] == []


# --------------------------------------------------------------------------- JWKS rules


@pytest.mark.parametrize(
    ("change", "usable"),
    [
        ({}, True),
        ({"alg": "ES256"}, False),  # an RSA key may not be named for ES256
        ({"alg": "HS256"}, False),
        ({"alg": "RS512"}, False),
        ({"use": "enc"}, False),
        ({"key_ops": ["encrypt"]}, False),
        ({"d": "AQAB"}, False),  # private material published: refused
        ({"kty": "oct", "k": "c2VjcmV0"}, False),
    ],
)
def test_rsa_jwk_binding(keys: dict[str, SigningKey], change: dict[str, Any], usable: bool) -> None:
    jwk = {**keys["rsa"].jwk(), **change}
    bound = bind_key(jwk)
    assert (bound is not None) is usable
    if bound is not None:
        assert bound.alg == "RS256"


@pytest.mark.parametrize(
    ("change", "usable"),
    [({}, True), ({"crv": "P-384"}, False), ({"alg": "RS256"}, False), ({"alg": "ES384"}, False)],
)
def test_ec_jwk_binding(keys: dict[str, SigningKey], change: dict[str, Any], usable: bool) -> None:
    assert (bind_key({**keys["ec"].jwk(), **change}) is not None) is usable


def test_jwk_without_alg_is_bound_by_its_type(keys: dict[str, SigningKey]) -> None:
    jwk = keys["rsa"].jwk()
    del jwk["alg"]
    bound = bind_key(jwk)
    assert bound is not None and bound.alg == "RS256"


# --------------------------------------------------------------------------- scope rules


@pytest.mark.parametrize(
    ("scope", "resource", "interaction", "allowed"),
    [
        ("user/ImagingStudy.read", "ImagingStudy", "search", True),
        ("user/ImagingStudy.read", "ImagingStudy", "read", True),
        ("user/ImagingStudy.rs", "ImagingStudy", "read", True),
        ("user/ImagingStudy.r", "ImagingStudy", "search", False),
        ("user/ImagingStudy.s", "ImagingStudy", "read", False),
        ("user/ImagingStudy.cud", "ImagingStudy", "read", False),
        ("user/ImagingStudy.crs", "ImagingStudy", "search", True),
        ("user/ImagingStudy.rsc", "ImagingStudy", "search", False),
        ("user/ImagingStudy.rr", "ImagingStudy", "read", False),
        ("user/*.rs", "Endpoint", "read", True),
        ("user/*.write", "ImagingStudy", "read", False),
        ("system/*.*", "AuditEvent", "search", True),
        ("patient/*.rs", "ImagingStudy", "search", False),
        ("user/imagingstudy.rs", "ImagingStudy", "search", False),
        ("user/ImagingStudy.rs ", "ImagingStudy", "search", False),
        ("ImagingStudy.rs", "ImagingStudy", "search", False),
    ],
)
def test_scope_rules(scope: str, resource: str, interaction: Any, allowed: bool) -> None:
    assert allows([scope], resource=resource, interaction=interaction) is allowed


def test_capability_statement_describes_the_token_service(base_url: str) -> None:
    from fhir.resources.R4B.capabilitystatement import CapabilityStatement

    from locator.api.smart import OAUTH_URIS_EXTENSION, security_component
    from locator.config import Settings

    metadata = httpx.get(base_url + "/fhir/metadata").json()
    CapabilityStatement.model_validate(metadata)
    rest = metadata["rest"][0]
    assert "AuditEvent" in [r["type"] for r in rest["resource"]]
    assert "SMART-on-FHIR" in json.dumps(rest["security"])
    configured = Settings(
        _env_file=None,  # type: ignore[call-arg]
        jwks="/etc/jwks.json",
        token_endpoint="https://auth.locator.test/token",
    )
    component = security_component(configured)
    [oauth] = component["extension"]
    assert oauth["url"] == OAUTH_URIS_EXTENSION
    assert oauth["extension"] == [{"url": "token", "valueUri": "https://auth.locator.test/token"}]
