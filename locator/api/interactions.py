"""FHIR interactions behind the routes: content negotiation, the audit of each patient
look-up, ImagingStudy search and read, and the registry-backed Endpoint and Organization
answers. Each is parse -> query -> audit -> render: responses are orjson bytes built from
plain dicts (render.py) over Core selects (query.py). Every search or read that touches a
patient writes its audit record (one short write transaction, `audit_access`) before the
response is sent; when that write fails, no patient data leaves (503).
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any
from urllib.parse import urlencode

from fastapi import Request
from fastapi.responses import Response
from sqlalchemy import Connection, Engine
from sqlalchemy.orm import Session, sessionmaker

from locator.api.auditing import AuditBatcher
from locator.api.auth import Caller
from locator.api.outcomes import (
    FHIR_JSON,
    ApiError,
    BadRequestError,
    IssueCode,
    IssueSeverity,
    MergedAwayError,
    NotAcceptableError,
    NotFoundError,
    UnavailableError,
    issue,
    operation_outcome,
)
from locator.api.paging import CursorCodec, CursorState, Position
from locator.api.query import (
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
from locator.audit import record_accesses
from locator.config import Settings
from locator.core.nhs_number import mask
from locator.metrics import AUDIT_WRITE_FAILURES, SEARCH_LATENCY
from locator.store.db import is_sqlite, read_connection
from locator.trusts import TrustConfig, TrustRegistry

log = logging.getLogger("locator.api")

JSON_TYPES = ("application/fhir+json", "application/json", "application/json+fhir")
JSON_FORMATS = frozenset({"json", *JSON_TYPES})
XML_FORMATS = frozenset(
    {"xml", "text/xml", "application/xml", "application/fhir+xml", "application/xml+fhir"}
)
MAX_FORM_BYTES = 16 * 1024
PATIENT_KEYS = frozenset(IMAGING_STUDY_PARAMETERS[0].keys)


# --------------------------------------------------------------------------- context


@dataclass(slots=True)
class ApiContext:
    settings: Settings
    engine: Engine
    session_factory: sessionmaker[Session]
    registry: TrustRegistry
    cursors: CursorCodec
    audit: AuditBatcher

    def trust(self, ods: str) -> TrustConfig:
        trust = self.registry.get(ods)
        if trust is None:  # a study of a trust removed from the registry
            raise UnavailableError(f"trust {ods} is not in the registry")
        return trust


@contextlib.contextmanager
def reading(engine: Engine) -> Iterator[Connection]:
    """locator.store.db.read_connection; on PostgreSQL in autocommit, since each request reads with
    one statement: no BEGIN and ROLLBACK round trips (a statement is its own snapshot)."""
    with read_connection(engine) as conn:
        if not is_sqlite(engine):
            conn.execution_options(isolation_level="AUTOCOMMIT")
        yield conn


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
        what = "XML is not produced" if fmt in XML_FORMATS else "unknown format"
        raise NotAcceptableError(f"_format={fmt}: {what}; this server produces FHIR JSON")
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
    """Write the audit record(s) of one request (one per NHS Number shown) with
    locator.audit.record_accesses, committed before this returns: a short write transaction,
    shared with concurrent requests' records (auditing.AuditBatcher).

    Raises UnavailableError (503) when the audit trail cannot be written: the caller must
    then return no patient data.
    """
    who = caller.audit_fields()
    what = {
        "action": action,
        "resource_type": resource_type,
        "query": query,
        "result_count": result_count,
        "outcome": outcome,
        "trust_ods": trust_ods,
    }
    try:
        ctx.audit.commit([{**who, **what, "nhs_number": nhs} for nhs in nhs_numbers or (None,)])
    except Exception as exc:
        AUDIT_WRITE_FAILURES.inc()
        log.error("audit write failed (request %s): %s", caller.request_id, type(exc).__name__)
        raise UnavailableError(
            "the audit trail cannot be written just now; no patient data is returned"
        ) from exc


def write_audit_records(conn: Connection, records: Sequence[dict[str, Any]]) -> None:
    """The batcher's writer: record_accesses, looked up at call time."""
    record_accesses(conn, records)


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
    with reading(ctx.engine) as conn:
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
    with reading(ctx.engine) as conn:
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
