"""`GET /fhir/.well-known/smart-configuration` (public) and the CapabilityStatement's
security component: how a client gets a token for the locator.

SMART App Launch 2.2.0 §2.1 ("Conformance", the smart-configuration document) at the FHIR
base. The locator is a resource server only: the token service (its `issuer`,
`token_endpoint`, JWKS) is the deployment's, named by settings. The client pattern it
expects is SMART Backend Services (client_credentials with a private_key_jwt assertion)
for systems, and user-level tokens from the deployment's authorisation server for people.
"""

from __future__ import annotations

from typing import Any

import orjson
from fastapi import APIRouter, Request
from fastapi.responses import Response

from locator.api.jwks import ALLOWED_ALGORITHMS, is_url
from locator.api.scopes import supported_scopes
from locator.api.state import security_of
from locator.config import Settings

SECURITY_SERVICE_SYSTEM = "http://terminology.hl7.org/CodeSystem/restful-security-service"
OAUTH_URIS_EXTENSION = "http://fhir-registry.smarthealthit.org/StructureDefinition/oauth-uris"
CAPABILITIES = ["permission-v1", "permission-v2", "client-confidential-asymmetric"]

router = APIRouter(prefix="/fhir")


def token_endpoint(settings: Settings) -> str | None:
    if settings.token_endpoint:
        return settings.token_endpoint
    return None


def smart_configuration(settings: Settings) -> dict[str, Any]:
    """The smart-configuration document (SMART App Launch 2.2.0 §2.1.2)."""
    config: dict[str, Any] = {
        "capabilities": CAPABILITIES if settings.jwks else [],
        "grant_types_supported": ["client_credentials"],
        "scopes_supported": supported_scopes(),
        "token_endpoint_auth_methods_supported": ["private_key_jwt"],
        "token_endpoint_auth_signing_alg_values_supported": list(ALLOWED_ALGORITHMS),
        "code_challenge_methods_supported": ["S256"],
    }
    endpoint = token_endpoint(settings)
    if endpoint:
        config["token_endpoint"] = endpoint
    if settings.jwt_issuer:
        config["issuer"] = settings.jwt_issuer
    if settings.jwks and is_url(settings.jwks):
        config["jwks_uri"] = settings.jwks
    if not settings.jwks:
        config["description"] = "open mode (loopback only): no token is required"
    return config


def security_component(settings: Settings) -> dict[str, Any]:
    """CapabilityStatement.rest.security (FHIR R4 §capabilitystatement; SMART App Launch
    2.2.0 §2.2 for the oauth-uris extension)."""
    if not settings.jwks:
        return {
            "cors": False,
            "description": (
                "OPEN MODE: no token is required because the API is bound to loopback only. "
                "Every patient look-up is audited."
            ),
        }
    component: dict[str, Any] = {
        "cors": False,
        "service": [
            {
                "coding": [{"system": SECURITY_SERVICE_SYSTEM, "code": "SMART-on-FHIR"}],
                "text": "OAuth 2.0 bearer tokens (JWT, RS256 or ES256) with SMART v1/v2 scopes",
            }
        ],
        "description": (
            "Every request except metadata and .well-known/smart-configuration needs "
            "Authorization: Bearer <JWT> signed by a key of the token service's JWKS, "
            "with matching iss and aud. Scopes: user/ or system/ ImagingStudy.read or .rs "
            "(and SMART wildcards) for ImagingStudy, Endpoint and Organization; "
            "system/AuditEvent.read or .rs for AuditEvent. Every patient look-up is audited."
        ),
    }
    endpoint = token_endpoint(settings)
    if endpoint:
        component["extension"] = [
            {
                "url": OAUTH_URIS_EXTENSION,
                "extension": [{"url": "token", "valueUri": endpoint}],
            }
        ]
    return component


@router.get(
    "/.well-known/smart-configuration",
    summary="SMART configuration: how to get a token (no token needed)",
)
def get_smart_configuration(request: Request) -> Response:
    body = smart_configuration(security_of(request).settings)
    return Response(orjson.dumps(body), media_type="application/json")
