"""Who is calling: bearer-token verification, SMART scopes, and the caller's identity.

- `Caller`: the authenticated (or open-mode) caller, with the request id.
- `require_imaging_read` / `require_audit_read`: FastAPI dependencies returning a Caller,
  raising AuthError (401), ScopeError (403), RateLimitedError (429) or KeysUnavailableError
  (503); `install_security` maps each to an OperationOutcome (security_errors.py).

Tokens (interface.md, Security): JWS compact JWTs (RFC 7519) signed RS256 or ES256 by a key
of the configured JWKS, verified with python-jose's cryptography backend. The header's `alg`
must be on the allowlist and equal to the algorithm the JWKS key is bound to (jwks.py);
`jwt.decode` gets that one algorithm explicitly and a constructed key object, never a string
or PEM, so no header can make it choose HMAC or `none`. `exp` is required; `nbf` is checked
when present; `iss` and `aud` are required and checked when configured; all with
`jwt_leeway_seconds` of leeway.

Scopes are SMART App Launch v1 (`user/ImagingStudy.read`) and v2 (`user/ImagingStudy.rs`)
(SMART App Launch 2.2.0 §3, "Scopes for requesting FHIR resources"); see scopes.py.

Claims read into the Caller: `sub`; client id from `client_id`, else `azp`, else `cid`;
organisation from `organisation` or `organization` (an ODS code); role from `role` or `roles`;
purpose of use from the `purpose_of_use` claim, else the `X-Purpose-Of-Use` header.
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from fastapi import Request
from jose import ExpiredSignatureError, JWTError, jwt
from jose.exceptions import JWTClaimsError

from locator.api.jwks import ALLOWED_ALGORITHMS, JwksCache, JwksError
from locator.api.scopes import Interaction, allows
from locator.api.state import security_of
from locator.config import Settings

BEARER = "bearer"
REALM = "locator"
MAX_TOKEN_CHARS = 16 * 1024
MAX_CLAIM_CHARS = 200
PURPOSE_HEADER = "X-Purpose-Of-Use"
OPEN_MODE_SUBJECT = "open-mode"
IMAGING_RESOURCES = ("ImagingStudy", "Endpoint", "Organization")
AUDIT_RESOURCE = "AuditEvent"
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


@dataclass(frozen=True, slots=True)
class Caller:
    subject: str | None
    client_id: str | None
    organisation: str | None
    role: str | None
    scopes: frozenset[str]
    purpose_of_use: str | None
    request_id: str
    remote_addr: str | None

    @property
    def rate_key(self) -> str:
        """Whom the per-client rate limit counts: the client, else the subject, else the
        network address (open mode)."""
        if self.client_id:
            return f"client:{self.client_id}"
        if self.subject and self.subject != OPEN_MODE_SUBJECT:
            return f"sub:{self.subject}"
        return f"addr:{self.remote_addr}"

    def audit_fields(self) -> dict[str, str | None]:
        """Who asked, as an audit row records it (locator.audit.audit_row's fields)."""
        return {
            "request_id": self.request_id,
            "subject": self.subject,
            "client_id": self.client_id,
            "organisation": self.organisation,
            "role": self.role,
            "purpose_of_use": self.purpose_of_use,
            "remote_addr": self.remote_addr,
        }


class SecurityError(Exception):
    """A request refused before it reached the data; mapped to an OperationOutcome."""

    status = 401
    issue_code = "login"

    def __init__(self, description: str, *, caller: Caller | None = None) -> None:
        super().__init__(description)
        self.description = description
        self.caller = caller


class AuthError(SecurityError):
    """No usable bearer token (RFC 6750 §3.1: 401, `invalid_token` when one was sent)."""

    def __init__(
        self, description: str, *, error: str | None = "invalid_token", issue_code: str = "login"
    ) -> None:
        super().__init__(description)
        self.error = error
        self.issue_code = issue_code


class ScopeError(SecurityError):
    """A valid token without the scope this interaction needs (RFC 6750 §3.1: 403)."""

    status = 403
    issue_code = "forbidden"

    def __init__(self, description: str, *, caller: Caller, needed: str) -> None:
        super().__init__(description, caller=caller)
        self.needed = needed


class RateLimitedError(SecurityError):
    """Too many patient look-ups by this client (429)."""

    status = 429
    issue_code = "throttled"

    def __init__(self, *, caller: Caller, retry_after: float) -> None:
        super().__init__("too many patient look-ups; retry later", caller=caller)
        self.retry_after = retry_after


class KeysUnavailableError(SecurityError):
    """The token service's JWKS cannot be read: nothing can be verified (503)."""

    status = 503
    issue_code = "transient"


# --------------------------------------------------------------------------- tokens


def bearer_token(request: Request) -> str:
    header = request.headers.get("Authorization")
    if not header:
        raise AuthError("a bearer token is required", error=None)
    scheme, _, token = header.partition(" ")
    token = token.strip()
    if scheme.lower() != BEARER or not token:
        raise AuthError("the Authorization header is not a bearer token", error="invalid_request")
    if len(token) > MAX_TOKEN_CHARS:
        raise AuthError("the bearer token is too long")
    return token


def _decode_options(settings: Settings) -> dict[str, Any]:
    return {
        "verify_signature": True,
        "require_exp": True,
        "verify_aud": settings.jwt_audience is not None,
        "require_aud": settings.jwt_audience is not None,
        "require_iss": settings.jwt_issuer is not None,
        "verify_at_hash": False,
        "leeway": settings.jwt_leeway_seconds,
    }


def verify_token(token: str, *, jwks: JwksCache, settings: Settings) -> dict[str, Any]:
    """The verified claims of `token`, or AuthError / KeysUnavailableError."""
    try:
        header = jwt.get_unverified_header(token)
    except JWTError as exc:
        raise AuthError("the bearer token is not a well-formed JWT") from exc
    alg = header.get("alg")
    if alg not in ALLOWED_ALGORITHMS:
        raise AuthError(f"token algorithm not allowed (allowed: {', '.join(ALLOWED_ALGORITHMS)})")
    if "crit" in header:  # RFC 7515 §4.1.11: we understand no critical extension
        raise AuthError("the token names critical header extensions")
    kid = header.get("kid")
    if kid is not None and not isinstance(kid, str):
        raise AuthError("the token's kid is not a string")
    try:
        key = jwks.find(kid, str(alg))
    except JwksError as exc:
        raise KeysUnavailableError("the token service's keys are unavailable") from exc
    if key is None:
        raise AuthError("no key of the token service matches the token's kid and algorithm")
    try:
        claims: dict[str, Any] = jwt.decode(
            token,
            key.key,
            algorithms=[key.alg],
            audience=settings.jwt_audience,
            issuer=settings.jwt_issuer,
            options=_decode_options(settings),
        )
    except ExpiredSignatureError as exc:
        raise AuthError("the token has expired", issue_code="expired") from exc
    except JWTClaimsError as exc:
        raise AuthError(f"token claims rejected: {exc}") from exc
    except JWTError as exc:
        raise AuthError("the token's signature or claims are not valid") from exc
    return claims


# --------------------------------------------------------------------------- the caller


def _claim(claims: Mapping[str, Any], *names: str) -> str | None:
    for name in names:
        value = claims.get(name)
        if isinstance(value, list) and value and all(isinstance(v, str) for v in value):
            value = ",".join(value)
        if isinstance(value, str) and value:
            return clean(value)
    return None


def clean(value: str) -> str:
    """A client-supplied string fit for the audit: no control characters, bounded."""
    return _CONTROL.sub("", value)[:MAX_CLAIM_CHARS]


def token_scopes(claims: Mapping[str, Any]) -> frozenset[str]:
    """`scope` (space-separated, RFC 8693 §4.2) or `scp` (a list, as some servers send)."""
    scope = claims.get("scope")
    if isinstance(scope, str):
        return frozenset(scope.split())
    scp = claims.get("scp")
    if isinstance(scp, list):
        return frozenset(s for s in scp if isinstance(s, str))
    if isinstance(scp, str):
        return frozenset(scp.split())
    return frozenset()


def request_id_of(request: Request) -> str:
    rid = getattr(request.state, "request_id", None)
    return rid if isinstance(rid, str) else str(uuid.uuid4())


def header_purpose(request: Request) -> str | None:
    value = request.headers.get(PURPOSE_HEADER)
    return clean(value) if value else None


def caller_from_claims(claims: Mapping[str, Any], request: Request) -> Caller:
    return Caller(
        subject=_claim(claims, "sub"),
        client_id=_claim(claims, "client_id", "azp", "cid"),
        organisation=_claim(claims, "organisation", "organization"),
        role=_claim(claims, "role", "roles"),
        scopes=token_scopes(claims),
        purpose_of_use=_claim(claims, "purpose_of_use") or header_purpose(request),
        request_id=request_id_of(request),
        remote_addr=request.client.host if request.client else None,
    )


def open_caller(request: Request) -> Caller:
    return Caller(
        subject=OPEN_MODE_SUBJECT,
        client_id=None,
        organisation=None,
        role=None,
        scopes=frozenset({"system/*.read"}),
        purpose_of_use=header_purpose(request),
        request_id=request_id_of(request),
        remote_addr=request.client.host if request.client else None,
    )


# --------------------------------------------------------------------------- dependencies


def interaction_of(request: Request) -> Interaction:
    """FHIR RESTful interaction of the request: `read` for `/Type/{id}`, else `search`."""
    parts = [p for p in request.url.path.split("/") if p]
    if len(parts) >= 3 and parts[-1] != "_search" and not parts[-1].startswith("$"):
        return "read"
    return "search"


def resource_of(request: Request) -> str:
    parts = [p for p in request.url.path.split("/") if p]
    return parts[1] if len(parts) >= 2 else ""


def authenticate(
    request: Request,
    *,
    resources: tuple[str, ...],
    contexts: tuple[str, ...],
    interaction: Interaction | None = None,
) -> Caller:
    """The caller, checked for a scope on one of `resources` for this interaction (by
    default the one the path shows: read or search)."""
    security = security_of(request)
    if security.jwks is None:
        caller = open_caller(request)
    else:
        claims = verify_token(bearer_token(request), jwks=security.jwks, settings=security.settings)
        caller = caller_from_claims(claims, request)
        interaction = interaction or interaction_of(request)
        if not any(
            allows(caller.scopes, resource=r, interaction=interaction, contexts=contexts)
            for r in resources
        ):
            letter = {"search": "rs", "read": "r"}.get(interaction, interaction[0])
            needed = f"{contexts[0]}/{resources[0]}.{letter}"
            raise ScopeError(
                f"the token lacks a scope for this interaction ({needed})",
                caller=caller,
                needed=needed,
            )
    request.state.caller = caller
    if resource_of(request) in security.rate_limited_resources:
        retry_after = security.limiter.acquire(caller.rate_key)
        if retry_after is not None:
            raise RateLimitedError(caller=caller, retry_after=retry_after)
    return caller


def require_imaging_read(request: Request) -> Caller:
    """ImagingStudy search and read, Endpoint and Organization read (interface.md scope table)."""
    own = resource_of(request)
    resources = ("ImagingStudy", own) if own in IMAGING_RESOURCES else ("ImagingStudy",)
    return authenticate(request, resources=resources, contexts=("user", "system"))


def require_audit_read(request: Request) -> Caller:
    """AuditEvent search: system-level scopes only."""
    return authenticate(request, resources=(AUDIT_RESOURCE,), contexts=("system",))
