"""The API's security state: one home for what every route and check reads.

`install_security` (locator.api.security) builds it once per app and keeps it on
`app.state.security`; the token checks (locator.api.auth) and the routes read it through
`security_of(request)`. Nothing here imports a route, so the security modules form no circle.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from fastapi import Request
from sqlalchemy.orm import Session, sessionmaker

from locator.api.jwks import JwksCache
from locator.api.middleware import RateLimiter
from locator.config import Settings

PATIENT_LOOKUP_RESOURCES = frozenset({"ImagingStudy"})
FORM_CONTENT_TYPE = "application/x-www-form-urlencoded"


@dataclass(slots=True)
class SecurityState:
    settings: Settings
    jwks: JwksCache | None
    limiter: RateLimiter
    session_factory: sessionmaker[Session] | None
    rate_limited_resources: frozenset[str] = field(default=PATIENT_LOOKUP_RESOURCES)


def build_state(settings: Settings, session_factory: sessionmaker[Session] | None) -> SecurityState:
    jwks = JwksCache.from_settings(settings) if settings.jwks else None
    return SecurityState(
        settings, jwks, RateLimiter(settings.patient_lookups_per_minute), session_factory
    )


def security_of(request: Request) -> SecurityState:
    state: SecurityState | None = getattr(request.app.state, "security", None)
    if state is None:
        raise RuntimeError("install_security() was not called for this app")
    return state


__all__ = ["FORM_CONTENT_TYPE", "SecurityState", "build_state", "security_of"]
