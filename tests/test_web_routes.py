"""The page's own routes on the real app (both backends): `/` and `/web-config.json`.

What the page is told about sign-in comes from the Settings the app was created with; the
page and its files are served by the app itself, with headers that keep it self-contained.
"""

from __future__ import annotations

from pathlib import Path

from fastapi import FastAPI
from sqlalchemy import Engine
from sqlalchemy.orm import Session, sessionmaker

from locator.trusts import TrustRegistry
from locator.web.routes import DEFAULT_SCOPE
from tests.api_helpers import client_for, make_app

ISSUER = "https://login.example-trust.nhs.test/realms/clinicians"


def app_with(
    engine: Engine, session_factory: sessionmaker[Session], registry: TrustRegistry, **settings: str
) -> FastAPI:
    return make_app(engine, session_factory, registry, **settings)


def test_open_mode_needs_no_sign_in(
    engine: Engine, session_factory: sessionmaker[Session], registry: TrustRegistry
) -> None:
    with client_for(app_with(engine, session_factory, registry)) as client:
        answer = client.get("/web-config.json")
    assert answer.status_code == 200
    assert answer.json() == {"auth": False}
    assert answer.headers["cache-control"] == "no-store"


def test_auth_mode_names_the_issuer_and_client(
    engine: Engine,
    session_factory: sessionmaker[Session],
    registry: TrustRegistry,
    tmp_path: Path,
) -> None:
    jwks = tmp_path / "jwks.json"
    jwks.write_text('{"keys": []}')
    app = app_with(
        engine, session_factory, registry,
        jwks=str(jwks), jwt_issuer=ISSUER, jwt_audience="locator", oidc_client_id="ward-page",
    )  # fmt: skip
    with client_for(app) as client:
        config = client.get("/web-config.json").json()
    assert config == {
        "auth": True,
        "issuer": ISSUER,
        "client_id": "ward-page",
        "scope": DEFAULT_SCOPE,
    }
    assert "user/ImagingStudy.read" in DEFAULT_SCOPE.split()


def test_page_and_files_are_served_with_safe_headers(
    engine: Engine, session_factory: sessionmaker[Session], registry: TrustRegistry
) -> None:
    with client_for(app_with(engine, session_factory, registry)) as client:
        page = client.get("/")
        head = client.head("/")
        script = client.get("/app.js")
        style = client.get("/style.css")
        source = client.get("/routes.py")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert head.status_code == 200
    assert '<script src="app.js" defer></script>' in page.text
    assert 'for="nhs-number"' in page.text
    csp = page.headers["content-security-policy"]
    assert "script-src 'self'" in csp and "frame-ancestors 'none'" in csp
    assert page.headers["referrer-policy"] == "no-referrer"
    assert page.headers["x-frame-options"] == "DENY"
    assert script.status_code == 200 and "checkDigitMatches" in script.text
    assert style.status_code == 200 and "#005eb8" in style.text
    assert "http://" not in page.text and "https://" not in page.text  # nothing from a CDN
    assert source.status_code == 404  # the package's Python sources are not served
