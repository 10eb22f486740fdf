"""The JWKS from an HTTPS URL: fetched with httpx against a custom CA
(LOCATOR_JWKS_CA_FILE), cached, refetched on an unknown kid at most once per
`jwks_refresh_min_seconds`; an unreachable or untrusted JWKS answers 503, never "open"."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx
import pytest

from locator.api.jwks import JwksCache, JwksError, check_url
from locator.store import migrate
from locator.store.db import create_db_engine
from tests.security_helpers import (
    AUDIENCE,
    ISSUER,
    JwksServer,
    build_app,
    claims,
    ec_key,
    jwks_document,
    make_pki,
    mint,
    rsa_key,
    seed_study,
    serve_app,
)

NHS = "9990000018"
SEARCH = f"/fhir/ImagingStudy?patient.identifier={NHS}"


def _db(tmp_path: Path) -> str:
    url = f"sqlite:///{tmp_path / 'locator.db'}"
    engine = create_db_engine(url)
    migrate.upgrade(engine)
    engine.dispose()
    return url


def _get(url: str, token: str) -> int:
    return httpx.get(url + SEARCH, headers={"Authorization": f"Bearer {token}"}).status_code


def _app(tmp_path: Path, jwks_url: str, **overrides: Any) -> Any:
    app, factory = build_app(
        _db(tmp_path), jwks=jwks_url, jwt_issuer=ISSUER, jwt_audience=AUDIENCE, **overrides
    )
    seed_study(factory, nhs=NHS)
    return app


def test_jwks_over_https_with_refresh_on_unknown_kid(tmp_path: Path) -> None:
    pki = make_pki(tmp_path)
    old, new = rsa_key("2026-old"), ec_key("2026-new")
    with JwksServer(pki, jwks_document(old)) as jwks:
        app = _app(tmp_path, jwks.url, jwks_ca_file=pki.ca_file, jwks_refresh_min_seconds=0)
        with serve_app(app) as url:
            assert _get(url, mint(old, claims("user/ImagingStudy.rs"))) == 200
            assert _get(url, mint(old, claims("user/ImagingStudy.rs"))) == 200
            assert jwks.fetches == 1  # cached
            jwks.document = jwks_document(old, new)  # the token service rotates in a key
            assert _get(url, mint(new, claims("user/ImagingStudy.rs"))) == 200
            assert jwks.fetches == 2  # refreshed once for the unknown kid
            assert _get(url, mint(new, claims("user/ImagingStudy.rs"))) == 200
            assert jwks.fetches == 2


def test_unknown_kids_cannot_make_the_locator_hammer_the_token_service(tmp_path: Path) -> None:
    pki = make_pki(tmp_path)
    known = rsa_key("known")
    with JwksServer(pki, jwks_document(known)) as jwks:
        app = _app(tmp_path, jwks.url, jwks_ca_file=pki.ca_file, jwks_refresh_min_seconds=3600)
        with serve_app(app) as url:
            assert _get(url, mint(known, claims("user/ImagingStudy.rs"))) == 200
            for n in range(5):
                stranger = rsa_key(f"unknown-{n}")
                assert _get(url, mint(stranger, claims("user/ImagingStudy.rs"))) == 401
            assert jwks.fetches == 1


def test_jwks_behind_an_untrusted_certificate_is_not_used(tmp_path: Path) -> None:
    pki = make_pki(tmp_path)
    key = rsa_key("k")
    with JwksServer(pki, jwks_document(key)) as jwks:
        app = _app(tmp_path, jwks.url)  # no LOCATOR_JWKS_CA_FILE: system CAs only
        with serve_app(app) as url:
            answer = httpx.get(
                url + SEARCH,
                headers={"Authorization": f"Bearer {mint(key, claims('user/ImagingStudy.rs'))}"},
            )
            assert answer.status_code == 503
            assert answer.json()["issue"][0]["code"] == "transient"
        assert jwks.fetches == 0  # the TLS handshake failed before any request


def test_unreadable_jwks_file_answers_503(tmp_path: Path) -> None:
    app = _app(tmp_path, str(tmp_path / "missing.json"))
    key = rsa_key("k")
    with serve_app(app) as url:
        assert _get(url, mint(key, claims("user/ImagingStudy.rs"))) == 503


@pytest.mark.parametrize(
    "url", ["http://auth.example/jwks.json", "ftp://x/jwks", "http://10.0.0.1/jwks"]
)
def test_jwks_url_must_be_https_beyond_loopback(url: str) -> None:
    with pytest.raises(JwksError):
        check_url(url)


def test_plain_http_jwks_on_loopback_is_allowed() -> None:
    check_url("http://127.0.0.1:8000/jwks.json")


def test_cache_refetches_when_stale_and_keeps_keys_when_the_service_is_down() -> None:
    now = [0.0]
    key = rsa_key("k")
    documents = [b'{"keys": [' + __import__("json").dumps(key.jwk()).encode() + b"]}"]
    calls = []

    def fetch() -> bytes:
        calls.append(now[0])
        if len(calls) > 1:
            raise JwksError("down")
        return documents[0]

    cache = JwksCache(fetch, max_age=60, min_refresh_interval=10, clock=lambda: now[0])
    assert cache.find("k", "RS256") is not None
    now[0] = 61.0  # stale: refetch fails, cached keys still serve
    assert cache.find("k", "RS256") is not None
    assert len(calls) == 2
    assert cache.find("k", "ES256") is None  # bound to RS256 only
