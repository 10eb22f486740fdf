"""The FastAPI application: FHIR R4 routes, health, metrics and the clinicians' page.

Each route is parse -> query -> audit -> render. Responses are orjson bytes built from plain
dicts (render.py); the database is read with Core selects (query.py). Every search or read
that touches a patient writes its audit record (one short write transaction) before the
response is sent; when that write fails, no patient data leaves (503).
"""

from __future__ import annotations

import contextlib
import importlib
import json
import logging
import re
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Annotated, Any
from urllib.parse import parse_qsl, urlencode

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.responses import Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from sqlalchemy import Engine, create_engine, text
from sqlalchemy.orm import Session, sessionmaker
from starlette.concurrency import run_in_threadpool
from starlette.staticfiles import StaticFiles
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from locator import __version__
from locator.api import auth
from locator.api.audit_routes import capability_resource as audit_capability_resource
from locator.api.auth import Caller, require_imaging_read
from locator.api.capability import capability_statement
from locator.api.conformance import SEARCH_PARAMETERS, STRUCTURE_DEFINITIONS
from locator.api.outcomes import (
    FHIR_JSON,
    ApiError,
    BadRequestError,
    IssueCode,
    IssueSeverity,
    MergedAwayError,
    MethodNotAllowedError,
    NotAcceptableError,
    NotFoundError,
    UnavailableError,
    install_error_handlers,
    issue,
    operation_outcome,
)
from locator.api.paging import CursorCodec, CursorState, Position, load_or_create_secret
from locator.api.query import (
    count_quarantined,
    count_studies,
    is_visible_row,
    read_study,
    search_studies,
    sort_value,
    survivor_of,
)
from locator.api.render import (
    DICOMWEB_SUFFIX,
    bundle,
    dicomweb_endpoint,
    dumps,
    entry,
    imaging_study,
    organization,
    outcome_entry,
)
from locator.api.search import (
    IMAGING_STUDY_PARAMETERS,
    ODS_SYSTEM,
    RESERVED_KEYS,
    SearchQuery,
    parse_nhs_token,
    parse_search,
    split_or,
    split_token,
)
from locator.api.security import install_security
from locator.api.smart import security_component
from locator.audit import record_access
from locator.config import Settings
from locator.db import read_connection, transaction
from locator.metrics import AUDIT_WRITE_FAILURES, QUARANTINED_STUDIES, SEARCH_LATENCY
from locator.nhs_number import mask
from locator.trusts import TrustConfig, TrustRegistry

log = logging.getLogger("locator.api")

JSON_TYPES = ("application/fhir+json", "application/json", "application/json+fhir")
JSON_FORMATS = frozenset({"json", *JSON_TYPES})
XML_FORMATS = frozenset(
    {"xml", "text/xml", "application/xml", "application/fhir+xml", "application/xml+fhir"}
)
FORM_CONTENT_TYPE = "application/x-www-form-urlencoded"
MAX_FORM_BYTES = 16 * 1024
PATIENT_KEYS = frozenset(IMAGING_STUDY_PARAMETERS[0].keys)
REQUEST_ID_RE = re.compile(r"^[A-Za-z0-9._:\-]{1,100}$")
WEB_FILE_SUFFIXES = (".html", ".js", ".css", ".svg", ".png", ".ico", ".json")
FHIR_RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {"description": "A FHIR R4 resource (JSON)", "content": {FHIR_JSON: {}}},
    400: {"description": "OperationOutcome: the request is refused"},
    401: {"description": "OperationOutcome: a bearer token is required"},
    403: {"description": "OperationOutcome: the token lacks the scope"},
    404: {"description": "OperationOutcome: no such resource"},
    406: {"description": "OperationOutcome: only JSON is produced"},
}


# --------------------------------------------------------------------------- context


@dataclass(slots=True)
class ApiContext:
    settings: Settings
    engine: Engine
    session_factory: sessionmaker[Session]
    registry: TrustRegistry
    cursors: CursorCodec

    def trust(self, ods: str) -> TrustConfig:
        trust = self.registry.get(ods)
        if trust is None:  # a study of a trust removed from the registry
            raise UnavailableError(f"trust {ods} is not in the registry")
        return trust


def ctx_of(request: Request) -> ApiContext:
    ctx: ApiContext = request.app.state.ctx
    return ctx


def fhir_base(request: Request) -> str:
    return str(request.base_url).rstrip("/") + "/fhir"


# --------------------------------------------------------------------------- negotiation


def negotiate(request: Request, format_param: str | None = None) -> str:
    """The response media type: FHIR JSON (or plain JSON when asked); XML gets 406."""
    fmt = (format_param or request.query_params.get("_format") or "").strip().lower()
    if fmt:
        if fmt in JSON_FORMATS:
            return "application/json" if fmt == "application/json" else FHIR_JSON
        raise NotAcceptableError(f"_format={fmt} is not supported: this server produces JSON")
    accept = request.headers.get("accept", "").lower()
    if not accept:
        return FHIR_JSON
    ranges = [part.split(";")[0].strip() for part in accept.split(",")]
    if "application/fhir+json" in ranges or "application/json+fhir" in ranges:
        return FHIR_JSON
    if "application/json" in ranges:
        return "application/json"
    if any(r in ("*/*", "application/*") for r in ranges):
        return FHIR_JSON
    raise NotAcceptableError("only application/fhir+json (or application/json) is produced")


def fhir_response(
    body: dict[str, Any],
    media_type: str,
    *,
    status: int = 200,
    headers: dict[str, str] | None = None,
) -> Response:
    return Response(dumps(body), status_code=status, media_type=media_type, headers=headers)


# --------------------------------------------------------------------------- audit


def audit_access(
    ctx: ApiContext,
    caller: Caller,
    *,
    action: str,
    query: str,
    nhs_numbers: Sequence[str | None],
    result_count: int | None,
    outcome: int,
    trust_ods: str | None = None,
    resource_type: str = "ImagingStudy",
) -> None:
    """Write the audit record(s) of one request in a short transaction of their own.

    Raises UnavailableError (503) when the audit trail cannot be written: the caller must
    then return no patient data.
    """
    try:
        with transaction(ctx.session_factory) as session:
            for nhs in nhs_numbers or (None,):
                record_access(
                    session,
                    request_id=caller.request_id,
                    action=action,
                    resource_type=resource_type,
                    query=query,
                    nhs_number=nhs,
                    result_count=result_count,
                    outcome=outcome,
                    subject=caller.subject,
                    client_id=caller.client_id,
                    organisation=caller.organisation,
                    role=caller.role,
                    purpose_of_use=caller.purpose_of_use,
                    remote_addr=caller.remote_addr,
                    trust_ods=trust_ods,
                )
    except Exception as exc:
        AUDIT_WRITE_FAILURES.inc()
        log.error("audit write failed (request %s): %s", caller.request_id, type(exc).__name__)
        raise UnavailableError(
            "the audit trail cannot be written just now; no patient data is returned"
        ) from exc


def audit_query_text(params: Sequence[tuple[str, str]]) -> str:
    """The query as audited: parameter names and values, with NHS Numbers masked."""
    shown = [(k, mask(split_token(v)[1]) if k in PATIENT_KEYS else v) for k, v in params]
    return "ImagingStudy?" + urlencode(shown, safe="|:,/")


def attempted_nhs_number(params: Sequence[tuple[str, str]], accept_test: bool) -> str | None:
    for key, value in params:
        if key in PATIENT_KEYS:
            try:
                return parse_nhs_token(value, key, accept_test)
            except ApiError:
                return None
    return None


# --------------------------------------------------------------------------- search


@dataclass(frozen=True, slots=True)
class SearchRequest:
    params: tuple[tuple[str, str], ...]
    position: Position | None
    strict: bool
    media_type: str
    base: str


def prepare_search(
    ctx: ApiContext, request: Request, pairs: Sequence[tuple[str, str]]
) -> SearchRequest:
    fmt = next((v for k, v in pairs if k == "_format"), None)
    media_type = negotiate(request, fmt)
    strict = "handling=strict" in request.headers.get("prefer", "").replace(" ", "")
    token = next((v for k, v in pairs if k == "_cursor"), None)
    if token is not None:
        state = ctx.cursors.open(token)
        params, position = state.params, state.position
    else:
        params = tuple((k, v) for k, v in pairs if k not in RESERVED_KEYS)
        position = None
    return SearchRequest(params, position, strict, media_type, fhir_base(request))


def run_search(
    ctx: ApiContext, request: Request, pairs: Sequence[tuple[str, str]], caller: Caller
) -> Response:
    started = time.perf_counter()
    try:
        prepared = prepare_search(ctx, request, pairs)
        query = parse_search(
            prepared.params,
            strict=prepared.strict,
            accept_test_numbers=ctx.settings.accept_test_nhs_numbers,
        )
    except BadRequestError as refused:
        audit_refusal(ctx, caller, pairs, refused)
        raise
    response = answer_search(ctx, prepared, query, caller)
    SEARCH_LATENCY.labels("search").observe(time.perf_counter() - started)
    return response


def audit_refusal(
    ctx: ApiContext, caller: Caller, pairs: Sequence[tuple[str, str]], refused: ApiError
) -> None:
    """Refused searches are audited too; a failing audit does not hide the 400."""
    params = [(k, v) for k, v in pairs if k not in RESERVED_KEYS]
    nhs = attempted_nhs_number(params, ctx.settings.accept_test_nhs_numbers)
    with contextlib.suppress(UnavailableError):
        audit_access(
            ctx,
            caller,
            action="search",
            query=audit_query_text(params),
            nhs_numbers=[nhs],
            result_count=None,
            outcome=refused.status,
        )


def answer_search(
    ctx: ApiContext, prepared: SearchRequest, query: SearchQuery, caller: Caller
) -> Response:
    with read_connection(ctx.engine) as conn:
        if query.summary_count:
            total: int | None = count_studies(conn, query=query, registry=ctx.registry)
            rows: Sequence[Any] = []
        else:
            rows = search_studies(
                conn,
                query=query,
                registry=ctx.registry,
                position=prepared.position,
                limit=query.count + 1,
            )
            total = None
    more = len(rows) > query.count
    rows = rows[: query.count]
    if total is None and prepared.position is None and not more:
        total = len(rows)  # the whole result is on this page: total is free
    nhs_numbers = [query.nhs_number] if query.nhs_number else sorted({r.nhs_number for r in rows})
    trusts = sorted({r.trust_ods for r in rows})
    audit_access(
        ctx,
        caller,
        action="search",
        query=audit_query_text(prepared.params),
        nhs_numbers=nhs_numbers,
        result_count=len(rows) if total is None else total,
        outcome=200,
        trust_ods=",".join(trusts)[:200] or None,
    )
    body = search_bundle(ctx, prepared, query, rows, total, more)
    return fhir_response(body, prepared.media_type)


def search_bundle(
    ctx: ApiContext,
    prepared: SearchRequest,
    query: SearchQuery,
    rows: Sequence[Any],
    total: int | None,
    more: bool,
) -> dict[str, Any]:
    base = prepared.base
    entries = [entry(base, imaging_study(r, ctx.trust(r.trust_ods)), "match") for r in rows]
    if query.include_endpoint:
        for ods in sorted({r.trust_ods for r in rows}):
            entries.append(entry(base, dicomweb_endpoint(ctx.trust(ods)), "include"))
    if query.ignored:
        entries.append(
            outcome_entry(
                operation_outcome(
                    [
                        issue(
                            IssueSeverity.WARNING,
                            IssueCode.NOT_SUPPORTED,
                            f"parameter ignored: {name}",
                        )
                        for name in query.ignored
                    ]
                )
            )
        )
    self_cursor = ctx.cursors.seal(CursorState(prepared.params, prepared.position))
    links = [("self", f"{base}/ImagingStudy?_cursor={self_cursor}")]
    if more and rows:
        last = rows[-1]
        position = Position(sort_value(query, last).isoformat(), last.id)
        token = ctx.cursors.seal(CursorState(prepared.params, position))
        links.append(("next", f"{base}/ImagingStudy?_cursor={token}"))
    return bundle(entries=entries, links=links, total=total, now=datetime.now(UTC))


# --------------------------------------------------------------------------- reads


def read_imaging_study(
    ctx: ApiContext, request: Request, study_id: str, caller: Caller
) -> Response:
    started = time.perf_counter()
    media_type = negotiate(request)
    with read_connection(ctx.engine) as conn:
        row = read_study(conn, study_id) if len(study_id) <= 64 else None
        survivor = survivor_of(conn, study_id) if row is not None and row.merged_into else None
    query = f"ImagingStudy/{study_id}"
    if row is None or not is_visible_row(row) or survivor is not None:
        audit_access(
            ctx, caller, action="read", query=query, nhs_numbers=[None], result_count=0, outcome=404
        )
        if survivor is not None:
            raise MergedAwayError(study_id, survivor)
        raise NotFoundError(f"ImagingStudy/{study_id} is not known")
    audit_access(
        ctx,
        caller,
        action="read",
        query=query,
        nhs_numbers=[row.nhs_number],
        result_count=1,
        outcome=200,
        trust_ods=row.trust_ods,
    )
    body = imaging_study(row, ctx.trust(row.trust_ods))
    SEARCH_LATENCY.labels("read").observe(time.perf_counter() - started)
    return fhir_response(body, media_type, headers={"ETag": f'W/"{row.version}"'})


def trust_for_endpoint(ctx: ApiContext, endpoint_id: str) -> TrustConfig:
    ods = endpoint_id.removesuffix(DICOMWEB_SUFFIX)
    trust = ctx.registry.get(ods) if endpoint_id.endswith(DICOMWEB_SUFFIX) else None
    if trust is None:
        raise NotFoundError(f"Endpoint/{endpoint_id} is not known")
    return trust


def ods_codes_of(value: str, *, references: bool) -> set[str]:
    """ODS codes from a token (`system|code`, `code`) or a reference (`Organization/X`)."""
    codes = set()
    for item in split_or(value):
        if references and item.startswith("Organization/"):
            codes.add(item.removeprefix("Organization/"))
            continue
        system, code = split_token(item)
        if system is None or system == ODS_SYSTEM:
            codes.add(code)
    return {c.upper() for c in codes}


def registry_bundle(request: Request, resources: list[dict[str, Any]], media_type: str) -> Response:
    base = fhir_base(request)
    body = bundle(
        entries=[entry(base, r, "match") for r in resources],
        links=[("self", str(request.url))],
        total=len(resources),
        now=datetime.now(UTC),
    )
    return fhir_response(body, media_type)


def select_trusts(
    ctx: ApiContext, request: Request, key: str, *, references: bool
) -> list[TrustConfig]:
    values = request.query_params.getlist(key)
    trusts = list(ctx.registry)
    for value in values:
        codes = ods_codes_of(value, references=references)
        trusts = [t for t in trusts if t.ods_code in codes]
    ids = request.query_params.getlist("_id")
    for value in ids:
        wanted = set(split_or(value))
        trusts = [
            t for t in trusts if t.ods_code in wanted or t.ods_code + DICOMWEB_SUFFIX in wanted
        ]
    return trusts


# --------------------------------------------------------------------------- routes

fhir = APIRouter(prefix="/fhir", responses=FHIR_RESPONSES)
ImagingReader = Annotated[Caller, Depends(require_imaging_read)]


def _search_openapi() -> dict[str, Any]:
    params = [
        {
            "name": k,
            "in": "query",
            "required": False,
            "schema": {"type": "string"},
            "description": p.documentation,
        }
        for p in IMAGING_STUDY_PARAMETERS
        for k in p.keys
    ]
    params.append(
        {
            "name": "_cursor",
            "in": "query",
            "required": False,
            "schema": {"type": "string"},
            "description": "Opaque paging cursor from a Bundle link (replaces the query)",
        }
    )
    return {"parameters": params}


@fhir.get("/metadata", summary="CapabilityStatement (no token needed)")
def get_metadata(request: Request) -> Response:
    ctx = ctx_of(request)
    media_type = negotiate(request)
    body = capability_statement(
        ctx.settings, base=fhir_base(request), extra_resources=[audit_capability_resource()]
    )
    body["rest"][0]["security"] = security_component(ctx.settings)  # smart.py
    return fhir_response(body, media_type)


@fhir.get(
    "/ImagingStudy",
    summary="Search ImagingStudy (a patient's studies)",
    openapi_extra=_search_openapi(),
)
def search_imaging_study_get(request: Request, caller: ImagingReader) -> Response:
    return run_search(ctx_of(request), request, request.query_params.multi_items(), caller)


@fhir.post(
    "/ImagingStudy/_search",
    summary="Search ImagingStudy with form-encoded parameters",
    openapi_extra={
        "requestBody": {
            "content": {"application/x-www-form-urlencoded": {"schema": {"type": "object"}}}
        }
    },
)
async def search_imaging_study_post(request: Request, caller: ImagingReader) -> Response:
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    pairs: list[tuple[str, str]] = list(request.query_params.multi_items())
    if content_type == FORM_CONTENT_TYPE:
        body = await request.body()
        if len(body) > MAX_FORM_BYTES:
            raise BadRequestError(f"search form larger than {MAX_FORM_BYTES} bytes")
        try:
            pairs += parse_qsl(body.decode("utf-8"), keep_blank_values=True)
        except (UnicodeDecodeError, ValueError) as exc:
            raise BadRequestError("the search form is not valid UTF-8 form encoding") from exc
    elif content_type:
        raise BadRequestError("send the parameters as application/x-www-form-urlencoded")
    return await run_in_threadpool(run_search, ctx_of(request), request, pairs, caller)


@fhir.get("/ImagingStudy/{study_id}", summary="Read one ImagingStudy")
def read_imaging_study_route(request: Request, study_id: str, caller: ImagingReader) -> Response:
    return read_imaging_study(ctx_of(request), request, study_id, caller)


@fhir.get("/Endpoint", summary="Search Endpoints (organization=<ODS>)")
def search_endpoint(request: Request, _caller: ImagingReader) -> Response:
    ctx = ctx_of(request)
    media_type = negotiate(request)
    trusts = select_trusts(ctx, request, "organization", references=True)
    return registry_bundle(request, [dicomweb_endpoint(t) for t in trusts], media_type)


@fhir.get("/Endpoint/{endpoint_id}", summary="Read a trust's DICOMweb Endpoint")
def read_endpoint(request: Request, endpoint_id: str, _caller: ImagingReader) -> Response:
    media_type = negotiate(request)
    trust = trust_for_endpoint(ctx_of(request), endpoint_id)
    return fhir_response(dicomweb_endpoint(trust), media_type)


@fhir.get("/Organization", summary="Search Organizations (identifier=<ODS>)")
def search_organization(request: Request, _caller: ImagingReader) -> Response:
    ctx = ctx_of(request)
    media_type = negotiate(request)
    trusts = select_trusts(ctx, request, "identifier", references=False)
    return registry_bundle(request, [organization(t) for t in trusts], media_type)


@fhir.get("/Organization/{ods}", summary="Read a trust's Organization")
def read_organization(request: Request, ods: str, _caller: ImagingReader) -> Response:
    media_type = negotiate(request)
    trust = ctx_of(request).registry.get(ods)
    if trust is None:
        raise NotFoundError(f"Organization/{ods} is not known")
    return fhir_response(organization(trust), media_type)


@fhir.get("/SearchParameter/{sp_id}", summary="Read a SearchParameter defined here")
def read_search_parameter(request: Request, sp_id: str, _caller: ImagingReader) -> Response:
    return conformance_read(request, "SearchParameter", SEARCH_PARAMETERS, sp_id)


@fhir.get("/StructureDefinition/{sd_id}", summary="Read a StructureDefinition defined here")
def read_structure_definition(request: Request, sd_id: str, _caller: ImagingReader) -> Response:
    return conformance_read(request, "StructureDefinition", STRUCTURE_DEFINITIONS, sd_id)


def conformance_read(
    request: Request, rtype: str, table: dict[str, dict[str, Any]], rid: str
) -> Response:
    media_type = negotiate(request)
    resource = table.get(rid)
    if resource is None:
        raise NotFoundError(f"{rtype}/{rid} is not known")
    return fhir_response(resource, media_type)


@fhir.api_route(
    "/{rest:path}", methods=["GET", "POST", "PUT", "PATCH", "DELETE"], include_in_schema=False
)
def fhir_fallback(request: Request, rest: str) -> Response:
    if request.method == "GET":
        raise NotFoundError(f"{rest.split('/')[0] or 'this path'} is not served here")
    raise MethodNotAllowedError(f"{request.method} is not supported: the locator is read-only")


ops = APIRouter()


@ops.get("/healthz", summary="The process is up")
def healthz() -> Response:
    return Response(b'{"status":"ok"}', media_type="application/json")


@ops.get("/readyz", summary="The database is reachable (503 otherwise)")
def readyz(request: Request) -> Response:
    try:
        with read_connection(ctx_of(request).engine) as conn:
            conn.execute(text("SELECT 1"))
    except Exception as exc:
        log.warning("readiness check failed: %s", type(exc).__name__)
        return Response(b'{"status":"unavailable"}', status_code=503, media_type="application/json")
    return Response(b'{"status":"ready"}', media_type="application/json")


@ops.get("/metrics", summary="Prometheus metrics")
def metrics(request: Request) -> Response:
    try:
        with read_connection(ctx_of(request).engine) as conn:
            QUARANTINED_STUDIES.set(count_quarantined(conn))
    except Exception as exc:
        log.warning("quarantine count failed: %s", type(exc).__name__)
    return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)


# --------------------------------------------------------------------------- app


class RequestIdMiddleware:
    """Give each request an id (the caller's X-Request-ID when well-formed) and echo it."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        given = next((v.decode("latin-1") for k, v in scope["headers"] if k == b"x-request-id"), "")
        rid = given if REQUEST_ID_RE.match(given) else str(uuid.uuid4())
        scope.setdefault("state", {})["request_id"] = rid

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                message.setdefault("headers", [])
                message["headers"] = [*message["headers"], (b"x-request-id", rid.encode())]
            await send(message)

        await self.app(scope, receive, send_with_id)


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


def auth_error_types() -> dict[type[Exception], int]:
    """The security module's errors, when it defines them (401 and 403)."""
    found: dict[type[Exception], int] = {}
    for name, status in (("AuthError", 401), ("ScopeError", 403)):
        exc_type = getattr(auth, name, None)
        if isinstance(exc_type, type) and issubclass(exc_type, Exception):
            found[exc_type] = status
    return found


def install_security_layer(
    app: FastAPI, settings: Settings, session_factory: sessionmaker[Session]
) -> bool:
    """The security work's `install_security` (token checks, request context middleware,
    its error responses, smart-configuration and AuditEvent routes), when present."""
    try:
        security = importlib.import_module("locator.api.security")
        security.install_security(app, settings=settings, session_factory=session_factory)
    except ImportError as exc:
        log.warning("security layer not installed: %s", exc)
        return False
    return True


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
    app.state.ctx = ApiContext(settings, engine, session_factory, registry, cursors)
    install_error_handlers(app, auth_error_types())
    if not install_security_layer(app, settings, session_factory):
        install_security(app, settings=settings, session_factory=session_factory)  # before fhir
    app.include_router(ops)
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
