"""The clinicians' page with authentication on (`locator serve --jwks`), in a real browser.

A tiny OpenID Connect provider runs in the test: a discovery document, an authorization
endpoint that approves at once (redirecting back with a code) and a token endpoint that checks
the PKCE verifier (RFC 7636, S256) before issuing an RS256 access token. `locator serve` gets
the provider's JWKS as a file (`--jwks`), its issuer and an audience; the page learns the
issuer and client id from /web-config.json.
"""

from __future__ import annotations

import base64
import hashlib
import http.server
import json
import secrets
import threading
import time
import urllib.parse
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import httpx
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from jose import jwt
from playwright.sync_api import Browser, Page, expect

from ingest.demo import PATIENTS, run_demo
from locator.core.nhs_number import NHS_NUMBER_SYSTEM
from tests.test_demo import ServeProcess, serve
from tests.test_web_support import launch_browser, new_context, watch

pytestmark = pytest.mark.browser

CLIENT_ID = "clinician-page"
AUDIENCE = "https://locator.test/fhir"
READ_SCOPE = "user/ImagingStudy.read"
KID = "test-key-1"
_, FALL, _, _ = PATIENTS
RESULTS_HEADING = f"Imaging for NHS Number {FALL.nhs_number[:3]} {FALL.nhs_number[3:6]} "


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _int(value: int) -> str:
    return b64url(value.to_bytes((value.bit_length() + 7) // 8, "big"))


@dataclass
class IdentityProvider:
    """Discovery, an auto-approving /authorize and a PKCE-checking /token."""

    key: rsa.RSAPrivateKey = field(
        default_factory=lambda: rsa.generate_private_key(public_exponent=65537, key_size=2048)
    )
    codes: dict[str, dict[str, str]] = field(default_factory=dict)
    authorize_requests: list[dict[str, str]] = field(default_factory=list)
    token_requests: list[dict[str, str]] = field(default_factory=list)
    issuer: str = ""

    def jwks(self) -> dict[str, Any]:
        numbers = self.key.public_key().public_numbers()
        return {"keys": [{"kty": "RSA", "kid": KID, "use": "sig", "alg": "RS256",
                          "n": _int(numbers.n), "e": _int(numbers.e)}]}  # fmt: skip

    def mint(self, scope: str, *, lifetime: int = 600) -> str:
        now = int(time.time())
        claims = {"iss": self.issuer, "aud": AUDIENCE, "sub": "dr-example", "scope": scope,
                  "client_id": CLIENT_ID, "iat": now, "exp": now + lifetime}  # fmt: skip
        pem = self.key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        return str(jwt.encode(claims, pem.decode(), algorithm="RS256", headers={"kid": KID}))

    def discovery(self) -> dict[str, Any]:
        return {
            "issuer": self.issuer,
            "authorization_endpoint": f"{self.issuer}/authorize",
            "token_endpoint": f"{self.issuer}/token",
            "jwks_uri": f"{self.issuer}/jwks",
            "response_types_supported": ["code"],
            "code_challenge_methods_supported": ["S256"],
        }

    def authorize(self, query: dict[str, str]) -> tuple[int, str]:
        """Approve at once: 302 back to the client with a code bound to the PKCE challenge."""
        self.authorize_requests.append(query)
        ok = (
            query.get("response_type") == "code"
            and query.get("client_id") == CLIENT_ID
            and query.get("code_challenge_method") == "S256"
            and query.get("state")
            and query.get("code_challenge")
            and query.get("redirect_uri")
        )
        if not ok:
            return 400, ""
        code = secrets.token_urlsafe(16)
        self.codes[code] = query
        back = urllib.parse.urlencode({"code": code, "state": query["state"]})
        return 302, f"{query['redirect_uri']}?{back}"

    def token(self, form: dict[str, str]) -> tuple[int, dict[str, Any]]:
        self.token_requests.append(form)
        asked = self.codes.pop(form.get("code", ""), None)
        verifier = form.get("code_verifier", "")
        if (
            asked is None
            or form.get("grant_type") != "authorization_code"
            or form.get("client_id") != CLIENT_ID
            or form.get("redirect_uri") != asked["redirect_uri"]
            or b64url(hashlib.sha256(verifier.encode()).digest()) != asked["code_challenge"]
        ):
            return 400, {"error": "invalid_grant"}
        scope = " ".join(s for s in asked.get("scope", "").split() if s != "openid")
        token = self.mint(scope)
        return 200, {"access_token": token, "token_type": "Bearer", "expires_in": 600}


def provider_handler(idp: IdentityProvider) -> type[http.server.BaseHTTPRequestHandler]:
    class Handler(http.server.BaseHTTPRequestHandler):
        def log_message(self, *args: Any) -> None:
            pass

        def _json(self, status: int, body: dict[str, Any]) -> None:
            data = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Access-Control-Allow-Origin", "*")  # the page calls from its origin
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self) -> None:
            url = urllib.parse.urlsplit(self.path)
            if url.path == "/.well-known/openid-configuration":
                self._json(200, idp.discovery())
            elif url.path == "/authorize":
                status, location = idp.authorize(dict(urllib.parse.parse_qsl(url.query)))
                self.send_response(status)
                if location:
                    self.send_header("Location", location)
                self.send_header("Content-Length", "0")
                self.end_headers()
            else:
                self._json(404, {"error": "not_found"})

        def do_POST(self) -> None:
            length = int(self.headers.get("Content-Length", "0"))
            form = dict(urllib.parse.parse_qsl(self.rfile.read(length).decode()))
            if self.path == "/token":
                self._json(*idp.token(form))
            else:
                self._json(404, {"error": "not_found"})

    return Handler


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    yield from launch_browser()


@pytest.fixture(scope="module")
def idp() -> Iterator[IdentityProvider]:
    provider = IdentityProvider()
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), provider_handler(provider))
    provider.issuer = f"http://127.0.0.1:{server.server_address[1]}"
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield provider
    server.shutdown()
    server.server_close()


@pytest.fixture(scope="module")
def service(
    browser: Browser, idp: IdentityProvider, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ServeProcess]:
    tmp = tmp_path_factory.mktemp("web-auth")
    jwks = tmp / "jwks.json"
    jwks.write_text(json.dumps(idp.jwks()))
    extra = ["--jwks", str(jwks), "--issuer", idp.issuer, "--audience", AUDIENCE]
    with serve(tmp, extra=extra, LOCATOR_OIDC_CLIENT_ID=CLIENT_ID) as running:
        result = run_demo(
            host="127.0.0.1", mllp_port=running.ports["mllp"], dicom_port=running.ports["dicom"],
            dicom_ae="LOCATOR", say=lambda _: None,
        )  # fmt: skip
        assert not result.messages_refused
        yield running


@pytest.fixture
def page(browser: Browser, service: ServeProcess) -> Iterator[Page]:
    context = new_context(browser)
    tab = context.new_page()
    errors, _ = watch(tab)
    yield tab
    context.close()
    assert not errors


def search(page: Page) -> None:
    page.get_by_label("NHS Number").fill(FALL.nhs_number)
    page.get_by_role("button", name="Search").click()


def test_web_config_names_the_issuer_and_the_api_wants_a_token(
    service: ServeProcess, idp: IdentityProvider
) -> None:
    with httpx.Client(base_url=service.base_url) as client:
        config = client.get("/web-config.json").json()
        refused = client.post(
            "/fhir/ImagingStudy/_search",
            data={"patient.identifier": f"{NHS_NUMBER_SYSTEM}|{FALL.nhs_number}"},
        )
    assert config["auth"] is True
    assert config["issuer"] == idp.issuer
    assert config["client_id"] == CLIENT_ID
    assert READ_SCOPE in config["scope"].split()
    assert refused.status_code == 401


def test_sign_in_with_authorization_code_and_pkce(
    page: Page, service: ServeProcess, idp: IdentityProvider
) -> None:
    page.goto(service.base_url + "/")
    expect(page.get_by_role("heading", name="Sign in to search")).to_be_visible()
    expect(page.get_by_label("NHS Number")).to_be_hidden()
    before = len(idp.token_requests)
    page.get_by_role("button", name="Sign in").click()
    expect(page.get_by_label("NHS Number")).to_be_visible()

    expect(page).to_have_url(service.base_url + "/")  # code and state gone from the address bar
    asked = idp.authorize_requests[-1]
    assert asked["redirect_uri"] == service.base_url + "/"
    assert READ_SCOPE in asked["scope"].split()
    assert len(asked["code_challenge"]) == 43  # base64url of a SHA-256 digest
    assert len(idp.token_requests) == before + 1 and not idp.codes
    stored = page.evaluate("sessionStorage.getItem('locator.token')")
    assert stored and json.loads(stored)["access_token"].count(".") == 2
    assert page.evaluate("localStorage.length") == 0

    search(page)
    expect(page.get_by_role("heading", name=RESULTS_HEADING, exact=False)).to_be_visible()
    expect(page.locator("#timeline > li")).to_have_count(4)

    page.get_by_role("button", name="Sign out").click()
    expect(page.get_by_role("button", name="Sign in")).to_be_visible()
    assert page.evaluate("sessionStorage.getItem('locator.token')") is None


def test_token_handed_in_by_the_launching_system(
    page: Page, service: ServeProcess, idp: IdentityProvider
) -> None:
    token = idp.mint(READ_SCOPE)
    page.goto(f"{service.base_url}/#access_token={token}&nhs-number={FALL.nhs_number}")
    expect(page.get_by_role("heading", name=RESULTS_HEADING, exact=False)).to_be_visible()
    expect(page).to_have_url(service.base_url + "/")  # the fragment is removed at once
    expect(page.locator("#timeline > li")).to_have_count(4)
    expect(page.get_by_role("button", name="Sign in")).to_be_hidden()


def test_not_authorised_and_expired_token_states(
    page: Page, service: ServeProcess, idp: IdentityProvider
) -> None:
    page.goto(f"{service.base_url}/#access_token={idp.mint('openid profile')}")
    search(page)
    expect(page.locator("#status")).to_contain_text(
        "You are not authorised to search imaging records"
    )
    expect(page.locator("#results")).to_be_hidden()

    page.goto(f"{service.base_url}/#access_token={idp.mint(READ_SCOPE, lifetime=-3600)}")
    search(page)
    expect(page.locator("#status")).to_contain_text("You are not signed in")
    expect(page.get_by_role("button", name="Sign in")).to_be_visible()
    assert page.evaluate("sessionStorage.getItem('locator.token')") is None


def test_state_mismatch_is_refused(page: Page, service: ServeProcess) -> None:
    page.goto(f"{service.base_url}/?code=forged&state=not-ours")
    expect(page.locator("#status")).to_contain_text("Sign-in failed")
    expect(page).to_have_url(service.base_url + "/")
    assert page.evaluate("sessionStorage.getItem('locator.token')") is None
    expect(page.get_by_role("button", name="Sign in")).to_be_visible()
