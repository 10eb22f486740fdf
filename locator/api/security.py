"""Security wiring for the app: its state, the refusal responses, and the refusal audit.

`install_security(app, settings=..., session_factory=...)` is the one call the app factory
makes: it keeps the JWKS cache and the rate limiter on `app.state.security`, adds the request
context middleware (request id, masked access log, last-resort 500), maps the security errors
to OperationOutcome responses, and adds the smart-configuration and AuditEvent routes.

Responses (RFC 6750 §3): 401 with `WWW-Authenticate: Bearer realm="locator"` and, when a
token was sent, `error="invalid_token"`; 403 with `error="insufficient_scope"` and the scope
needed; 429 with `Retry-After`; 503 when the JWKS cannot be read. A refused patient look-up
(ImagingStudy search or read, AuditEvent search) is audited with what can be known: the
verified caller for 403/429 (never the claims of a token that failed verification), the
NHS Number asked for, the request id and the HTTP status as the outcome.
"""

from __future__ import annotations

import logging
import math
import urllib.parse
from collections.abc import Sequence

import orjson
from fastapi import FastAPI, Request
from fastapi.responses import Response
from sqlalchemy.orm import Session, sessionmaker
from starlette.concurrency import run_in_threadpool

from locator.api.audit_routes import router as audit_router
from locator.api.auth import (
    AUDIT_RESOURCE,
    REALM,
    AuthError,
    Caller,
    KeysUnavailableError,
    RateLimitedError,
    ScopeError,
    SecurityError,
    header_purpose,
    interaction_of,
    request_id_of,
    resource_of,
)
from locator.api.middleware import FHIR_JSON, RequestContextMiddleware, install_log_filter
from locator.api.smart import router as smart_router
from locator.api.state import FORM_CONTENT_TYPE, SecurityState, build_state
from locator.audit import record_access
from locator.config import Settings
from locator.core.nhs_number import NHS_NUMBER_SYSTEM, InvalidNhsNumberError, mask, parse_nhs_number
from locator.metrics import AUDIT_WRITE_FAILURES
from locator.store.db import transaction

log = logging.getLogger(__name__)

AUDITED_REFUSAL_RESOURCES = frozenset({"ImagingStudy", AUDIT_RESOURCE, "Subscription"})
PATIENT_PARAMETERS = frozenset(
    {
        "patient.identifier",
        "patient:identifier",
        "subject:identifier",
        "subject.identifier",
    }
)


def install_security(
    app: FastAPI, *, settings: Settings, session_factory: sessionmaker[Session] | None
) -> SecurityState:
    """Security state, middleware, error responses and routes (call before other routers:
    a catch-all `/fhir/{path}` route must not shadow these)."""
    state = build_state(settings, session_factory)
    app.state.security = state
    app.add_middleware(RequestContextMiddleware, access_log_enabled=settings.access_log)
    install_log_filter()
    for exc_type in (AuthError, ScopeError, RateLimitedError, KeysUnavailableError):
        app.add_exception_handler(exc_type, handle_security_error)
    app.include_router(smart_router)
    app.include_router(audit_router)
    return state


# --------------------------------------------------------------------------- responses


def _quoted(value: str) -> str:
    return value.replace("\\", "").replace('"', "'")


def www_authenticate(exc: SecurityError) -> str | None:
    if isinstance(exc, AuthError):
        parts = [f'Bearer realm="{REALM}"']
        if exc.error:
            parts.append(f'error="{exc.error}"')
            parts.append(f'error_description="{_quoted(exc.description)}"')
        return ", ".join(parts)
    if isinstance(exc, ScopeError):
        return f'Bearer realm="{REALM}", error="insufficient_scope", scope="{_quoted(exc.needed)}"'
    return None


def security_response(exc: SecurityError) -> Response:
    body = {
        "resourceType": "OperationOutcome",
        "issue": [
            {
                "severity": "error",
                "code": exc.issue_code,
                "diagnostics": exc.description,
            }
        ],
    }
    headers: dict[str, str] = {}
    challenge = www_authenticate(exc)
    if challenge:
        headers["WWW-Authenticate"] = challenge
    if isinstance(exc, RateLimitedError):
        headers["Retry-After"] = str(max(1, math.ceil(exc.retry_after)))
    return Response(
        orjson.dumps(body), status_code=exc.status, media_type=FHIR_JSON, headers=headers
    )


async def handle_security_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, SecurityError)
    if resource_of(request) in AUDITED_REFUSAL_RESOURCES:
        pairs = await request_pairs(request)
        await run_in_threadpool(audit_refused, request, exc, pairs)
    return security_response(exc)


# --------------------------------------------------------------------------- refusal audit


async def request_pairs(request: Request) -> list[tuple[str, str]]:
    """The query and (for a form POST) body parameters of a request."""
    pairs = list(request.query_params.multi_items())
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if request.method == "POST" and content_type == FORM_CONTENT_TYPE:
        try:
            form = await request.form()
        except Exception:  # an unreadable body: audit what the URL says
            return pairs
        pairs += [(k, v) for k, v in form.multi_items() if isinstance(v, str)]
    return pairs


def patient_nhs_number(pairs: Sequence[tuple[str, str]], *, accept_test: bool) -> str | None:
    """The NHS Number a request names (`[system|]value`), when it is a valid one."""
    for key, value in pairs:
        if key not in PATIENT_PARAMETERS:
            continue
        system, _, code = value.rpartition("|")
        if system not in ("", NHS_NUMBER_SYSTEM):
            continue
        try:
            return parse_nhs_number(code, accept_test_numbers=accept_test)
        except InvalidNhsNumberError:
            return None
    return None


def audited_query(request: Request, pairs: Sequence[tuple[str, str]]) -> str:
    """What was asked, as `Type?params` or `Type/id`, with NHS Numbers masked."""
    parts = [p for p in request.url.path.split("/") if p]
    if interaction_of(request) == "read":
        return "/".join(parts[1:])
    shown = [
        (k, mask(v.rpartition("|")[2]) if k in PATIENT_PARAMETERS else v)
        for k, v in pairs
        if k != "_cursor"
    ]
    return f"{resource_of(request)}?{urllib.parse.urlencode(shown, safe='|:,/')}"


def refused_caller(request: Request, exc: SecurityError) -> Caller:
    """The verified caller when there is one; else only what the request itself shows."""
    if exc.caller is not None:
        return exc.caller
    return Caller(
        subject=None,
        client_id=None,
        organisation=None,
        role=None,
        scopes=frozenset(),
        purpose_of_use=header_purpose(request),
        request_id=request_id_of(request),
        remote_addr=request.client.host if request.client else None,
    )


def audit_refused(request: Request, exc: SecurityError, pairs: Sequence[tuple[str, str]]) -> None:
    state: SecurityState | None = getattr(request.app.state, "security", None)
    if state is None or state.session_factory is None:
        return
    caller = refused_caller(request, exc)
    nhs = patient_nhs_number(pairs, accept_test=state.settings.accept_test_nhs_numbers)
    try:
        with transaction(state.session_factory) as session:
            record_access(
                session,
                action=interaction_of(request),
                resource_type=resource_of(request),
                query=audited_query(request, pairs),
                nhs_number=nhs,
                result_count=None,
                outcome=exc.status,
                **caller.audit_fields(),
            )
    except Exception as exc_write:  # the refusal stands; the failure is counted and logged
        AUDIT_WRITE_FAILURES.inc()
        log.error("audit of a refused request failed: %s", type(exc_write).__name__)


__all__ = ["install_security", "security_response"]
