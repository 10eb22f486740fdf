"""The FastAPI application factory: security layer, routes, the clinicians' page, and the
OpenAPI document (`locator openapi`, committed as openapi/openapi.json).

Route order matters: the security work's routes (smart-configuration, AuditEvent) first,
then the FHIR routes (whose catch-all answers unknown types and writes), then the page's
routes, and the page's static files mounted at `/` last.
"""

from __future__ import annotations

import json
import logging
from typing import Any

from fastapi import FastAPI
from sqlalchemy import Engine, create_engine
from sqlalchemy.orm import Session, sessionmaker
from starlette.staticfiles import StaticFiles

from locator import __version__
from locator.api.auditing import AuditBatcher
from locator.api.interactions import ApiContext, write_audit_records
from locator.api.outcomes import install_error_handlers
from locator.api.paging import CursorCodec, load_or_create_secret
from locator.api.routes import fhir, ops
from locator.api.security import install_security
from locator.api.subscriptions import router as subscriptions
from locator.config import Settings
from locator.trusts import TrustRegistry

log = logging.getLogger("locator.api")
WEB_FILE_SUFFIXES = (".html", ".js", ".css", ".svg", ".png", ".ico", ".json")


class WebFiles(StaticFiles):
    """The page's static files only (never the package's Python sources)."""

    def lookup_path(self, path: str) -> tuple[str, Any]:
        if path and not path.endswith(WEB_FILE_SUFFIXES) and "." in path.rsplit("/", 1)[-1]:
            return "", None
        return super().lookup_path(path)


def mount_web(app: FastAPI) -> None:
    try:
        from locator.web.routes import router as web_router

        app.include_router(web_router)
    except ImportError as exc:
        log.warning("clinicians' page routes unavailable: %s", exc)
    try:
        app.mount("/", WebFiles(packages=[("locator", "web")], html=True), name="web")
    except (RuntimeError, AssertionError, OSError) as exc:
        log.warning("clinicians' page not mounted: %s", exc)


def create_app(
    settings: Settings,
    *,
    engine: Engine,
    session_factory: sessionmaker[Session],
    registry: TrustRegistry,
) -> FastAPI:
    """The app; no database access happens until the first request."""
    secret = settings.cursor_secret
    cursors = CursorCodec(
        (lambda: secret) if secret else (lambda: load_or_create_secret(session_factory)),
        settings.cursor_ttl_seconds,
    )
    app = FastAPI(
        title="Locator FHIR API",
        version=__version__,
        description="Which NHS trust holds which imaging studies, per NHS Number (FHIR R4).",
    )
    audit = AuditBatcher(engine, write_audit_records)
    app.state.ctx = ApiContext(settings, engine, session_factory, registry, cursors, audit)
    install_error_handlers(app)
    # The security work's layer: request context middleware (request id, masked access log),
    # token checks' error responses, smart-configuration and AuditEvent routes (before ours).
    install_security(app, settings=settings, session_factory=session_factory)
    app.include_router(ops)
    app.include_router(subscriptions)  # before fhir: its catch-all refuses writes
    app.include_router(fhir)
    mount_web(app)
    return app


def openapi_document() -> str:
    """The OpenAPI document of the app, as stable pretty JSON (committed as openapi.json)."""
    engine = create_engine("sqlite://")
    app = create_app(
        Settings(_env_file=None, cursor_secret="openapi"),
        engine=engine,
        session_factory=sessionmaker(engine),
        registry=TrustRegistry([]),
    )
    return json.dumps(app.openapi(), indent=2, sort_keys=True, ensure_ascii=False)


__all__ = ["create_app", "openapi_document"]
