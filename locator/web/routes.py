"""Routes the clinicians' page needs besides its static files.

`GET /web-config.json` tells the page (locator/web/app.js) whether the FHIR API wants a bearer
token and, when it does, where to get one: the OpenID Connect issuer (its discovery document at
`<issuer>/.well-known/openid-configuration`, OpenID Connect Discovery 1.0 §4) and the page's
client id. Nothing here is secret: a public client uses PKCE (RFC 7636), not a client secret.
"""

from __future__ import annotations

from importlib import resources
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import HTMLResponse, JSONResponse

from locator.config import Settings

router = APIRouter()

WEB_CONFIG_PATH = "/web-config.json"
# SMART on FHIR v1 scope for a clinician reading imaging studies (interface.md, Security).
DEFAULT_SCOPE = "openid user/ImagingStudy.read"
NO_STORE = {"Cache-Control": "no-store"}
PAGE_FILE = "index.html"
# The page is a client of the API on the same origin; sign-in may call the issuer's
# discovery and token endpoints (connect-src); nothing is framed, nothing leaks a Referer.
PAGE_HEADERS = {
    "Cache-Control": "no-cache",
    "Content-Security-Policy": (
        "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
        "connect-src 'self' http: https:; object-src 'none'; base-uri 'none'; "
        "form-action 'self'; frame-ancestors 'none'"
    ),
    "Referrer-Policy": "no-referrer",
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
}


def app_settings(request: Request) -> Settings | None:
    """The Settings the API app was created with (`create_app` keeps them in app.state.ctx)."""
    ctx = getattr(request.app.state, "ctx", None)
    settings = getattr(ctx, "settings", None)
    return settings if isinstance(settings, Settings) else None


def web_config(settings: Settings | None) -> dict[str, Any]:
    """What the page needs to know about authentication (nothing when the API runs open)."""
    if settings is None or not settings.jwks:
        return {"auth": False}
    return {
        "auth": True,
        "issuer": settings.jwt_issuer,
        "client_id": settings.oidc_client_id,
        "scope": DEFAULT_SCOPE,
    }


def page_html() -> str:
    return resources.files("locator.web").joinpath(PAGE_FILE).read_text(encoding="utf-8")


@router.api_route("/", methods=["GET", "HEAD"], include_in_schema=False)
def get_page() -> HTMLResponse:
    """The page itself (its script and stylesheet are the static files mounted at `/`)."""
    return HTMLResponse(page_html(), headers=PAGE_HEADERS)


@router.get(WEB_CONFIG_PATH, include_in_schema=False)
def get_web_config(request: Request) -> JSONResponse:
    return JSONResponse(web_config(app_settings(request)), headers=NO_STORE)
