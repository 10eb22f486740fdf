"""The HTTP routes: the FHIR R4 interactions under /fhir and the operations endpoints
(/healthz, /readyz, /metrics). Handlers are a few lines each; the work is in interactions.py.
"""

from __future__ import annotations

import logging
from typing import Annotated, Any
from urllib.parse import parse_qsl

from fastapi import APIRouter, Depends, Request
from fastapi.responses import Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from sqlalchemy import text
from starlette.concurrency import run_in_threadpool
from starlette.requests import ClientDisconnect

from locator.api.auth import Caller, require_imaging_read
from locator.api.capability import capability_statement
from locator.api.conformance import SEARCH_PARAMETERS, STRUCTURE_DEFINITIONS
from locator.api.interactions import (
    MAX_FORM_BYTES,
    ctx_of,
    fhir_base,
    fhir_response,
    negotiate,
    read_imaging_study,
    registry_bundle,
    run_search,
    select_trusts,
    trust_for_endpoint,
)
from locator.api.outcomes import (
    FHIR_JSON,
    BadRequestError,
    MethodNotAllowedError,
    NotFoundError,
)
from locator.api.query import (
    count_quarantined,
)
from locator.api.render import (
    dicomweb_endpoint,
    organization,
)
from locator.api.search import (
    IMAGING_STUDY_PARAMETERS,
)
from locator.api.state import FORM_CONTENT_TYPE
from locator.metrics import QUARANTINED_STUDIES
from locator.store.db import read_connection

log = logging.getLogger("locator.api")
FHIR_RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {"description": "A FHIR R4 resource (JSON)", "content": {FHIR_JSON: {}}},
    400: {"description": "OperationOutcome: the request is refused"},
    401: {"description": "OperationOutcome: a bearer token is required"},
    403: {"description": "OperationOutcome: the token lacks the scope"},
    404: {"description": "OperationOutcome: no such resource"},
    406: {"description": "OperationOutcome: only JSON is produced"},
}

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
    body = capability_statement(ctx.settings, base=fhir_base(request))
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
        try:
            body = await request.body()
        except ClientDisconnect as exc:  # nobody to answer; not a server error
            raise BadRequestError("the client disconnected before sending the form") from exc
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
