"""`GET /fhir/AuditEvent` (and `POST /fhir/AuditEvent/_search`): the audit trail as FHIR.

Search parameters (FHIR R4 AuditEvent search, http://hl7.org/fhir/R4/auditevent.html#search;
every given parameter must hold, unknown parameters are refused rather than ignored so an
auditor never believes a filter was applied when it was not):
- `patient.identifier` (also `patient:identifier`): `[https://fhir.nhs.uk/Id/nhs-number|]<NHS
  Number>`: look-ups of that patient;
- `date` (repeatable, prefixes eq ge gt le lt, R4 §3.1.1.4.2): when the look-up happened;
- `agent`: the token subject or client id of whoever looked;
- `organization` (locator-defined, like ImagingStudy's): `[https://fhir.nhs.uk/Id/ods-
  organization-code|]<ODS>`: look-ups that were shown studies held by that trust; this is how
  a holding trust asks "who looked at my patients";
- `outcome` (0, 4, 8) and `_count` (default 50, at most 500); newest first; `total` counts
  all matches (narrow with `date` to page through a long trail).

Needs `system/AuditEvent.read` or `.rs` (or a SMART wildcard). A token whose `organisation`
claim is a registered trust sees only look-ups that showed that trust's studies (asking for
another trust's is 403). Searches of the audit are themselves audited.
"""

from __future__ import annotations

import re
import urllib.parse
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Annotated, Any

import orjson
from fastapi import APIRouter, Depends, Request
from fastapi.responses import Response
from sqlalchemy import select
from starlette.concurrency import run_in_threadpool

from locator import __version__
from locator.api.auth import AUDIT_RESOURCE, Caller, require_audit_read
from locator.api.middleware import FHIR_JSON
from locator.api.outcomes import ForbiddenError, InvalidSearchError, UnavailableError
from locator.api.search import DatePrefix, parse_date_bound, parse_nhs_token, split_token
from locator.api.state import FORM_CONTENT_TYPE, SecurityState, security_of
from locator.audit import AuditCriteria, audit_event, record_access, search_audit
from locator.core.nhs_number import mask
from locator.metrics import AUDIT_WRITE_FAILURES
from locator.store.db import transaction
from locator.store.models import Trust

ODS_SYSTEM = "https://fhir.nhs.uk/Id/ods-organization-code"
PATIENT_KEYS = ("patient.identifier", "patient:identifier")
KNOWN_KEYS = frozenset(
    {*PATIENT_KEYS, "date", "agent", "organization", "outcome", "_count", "_format"}
)
DEFAULT_COUNT = 50
MAX_COUNT = 500
OUTCOME_CODES = frozenset({"0", "4", "8"})
_ODS = re.compile(r"^[A-Z0-9]{3,10}$")
OBSERVER = f"locator {__version__}"
TRUST = Trust.__table__  # type: ignore[attr-defined]
AuditReader = Annotated[Caller, Depends(require_audit_read)]

router = APIRouter(prefix="/fhir")


# --------------------------------------------------------------------------- parsing


def _single(pairs: Sequence[tuple[str, str]], key: str) -> str | None:
    values = [v for k, v in pairs if k == key]
    if len(values) > 1:
        raise InvalidSearchError(f"{key}: give it at most once", expression=key)
    return values[0] if values else None


def _ods(value: str) -> str:
    system, code = split_token(value)
    code = code.strip().upper()
    if system not in (None, "", ODS_SYSTEM) or not _ODS.match(code):
        raise InvalidSearchError(
            "organization: an ODS code, optionally with the ODS system", expression="organization"
        )
    return code


def _count(value: str | None) -> int:
    if value is None:
        return DEFAULT_COUNT
    if not value.isdigit() or not 1 <= int(value) <= MAX_COUNT:
        raise InvalidSearchError(f"_count: 1 to {MAX_COUNT}", expression="_count")
    return int(value)


def _dates(values: Sequence[str]) -> tuple[list[datetime], list[datetime]]:
    lower: list[datetime] = []
    upper: list[datetime] = []
    for value in values:
        bound = parse_date_bound(value, "date")
        if bound.prefix in (DatePrefix.EQ, DatePrefix.GE):
            lower.append(bound.low)
        if bound.prefix in (DatePrefix.EQ, DatePrefix.LE):
            upper.append(bound.high)
        if bound.prefix == DatePrefix.GT:
            lower.append(bound.high)
        if bound.prefix == DatePrefix.LT:
            upper.append(bound.low)
        if bound.prefix == DatePrefix.NE:
            raise InvalidSearchError("date: prefix ne is not supported here", expression="date")
    return lower, upper


def parse_audit_search(pairs: Sequence[tuple[str, str]], *, accept_test: bool) -> AuditCriteria:
    """Search parameters -> AuditCriteria, or InvalidSearchError (400)."""
    unknown = sorted({k for k, _ in pairs} - KNOWN_KEYS)
    if unknown:
        raise InvalidSearchError(f"unsupported AuditEvent parameter(s): {', '.join(unknown)}")
    patient = [(k, v) for k, v in pairs if k in PATIENT_KEYS]
    if len(patient) > 1:
        raise InvalidSearchError("name at most one patient", expression=patient[0][0])
    nhs = parse_nhs_token(patient[0][1], patient[0][0], accept_test) if patient else None
    outcome = _single(pairs, "outcome")
    if outcome is not None and outcome not in OUTCOME_CODES:
        raise InvalidSearchError("outcome: 0, 4 or 8", expression="outcome")
    organization = _single(pairs, "organization")
    lower, upper = _dates([v for k, v in pairs if k == "date"])
    return AuditCriteria(
        nhs_number=nhs,
        agent=_single(pairs, "agent"),
        trust_ods=_ods(organization) if organization else None,
        outcome=outcome,
        lower=lower,
        upper=upper,
        count=_count(_single(pairs, "_count")),
    )


# --------------------------------------------------------------------------- answering


def restrict_to_caller(
    state: SecurityState, caller: Caller, criteria: AuditCriteria
) -> AuditCriteria:
    """A trust's token sees its own patients' look-ups only."""
    org = (caller.organisation or "").upper()
    if not org or state.session_factory is None or not _ODS.match(org):
        return criteria
    with state.session_factory() as session:
        is_trust = session.execute(select(TRUST.c.ods_code).where(TRUST.c.ods_code == org)).first()
    if is_trust is None:
        return criteria
    if criteria.trust_ods not in (None, org):
        raise ForbiddenError(f"a token of {org} may only read the audit of {org}'s studies")
    return AuditCriteria(
        criteria.nhs_number,
        criteria.agent,
        org,
        criteria.outcome,
        criteria.lower,
        criteria.upper,
        criteria.count,
    )


def audited_text(pairs: Sequence[tuple[str, str]]) -> str:
    shown = [(k, mask(split_token(v)[1]) if k in PATIENT_KEYS else v) for k, v in pairs]
    return f"{AUDIT_RESOURCE}?{urllib.parse.urlencode(shown, safe='|:,/')}"


def answer(request: Request, caller: Caller, pairs: Sequence[tuple[str, str]]) -> Response:
    state = security_of(request)
    criteria = parse_audit_search(pairs, accept_test=state.settings.accept_test_nhs_numbers)
    criteria = restrict_to_caller(state, caller, criteria)
    if state.session_factory is None:
        raise UnavailableError("the audit trail is not available")
    try:
        with transaction(state.session_factory) as session:
            rows, total = search_audit(session, criteria=criteria)
            events = [
                audit_event(r, observer=OBSERVER, issuer=state.settings.jwt_issuer) for r in rows
            ]
            record_access(
                session,
                action="search",
                resource_type=AUDIT_RESOURCE,
                query=audited_text(pairs),
                nhs_number=criteria.nhs_number,
                result_count=total,
                outcome=200,
                **caller.audit_fields(),
                trust_ods=criteria.trust_ods,
            )
    except Exception as exc:
        AUDIT_WRITE_FAILURES.inc()
        raise UnavailableError("the audit trail is not available just now") from exc
    return Response(orjson.dumps(searchset(request, events, total)), media_type=FHIR_JSON)


def searchset(request: Request, events: list[dict[str, Any]], total: int) -> dict[str, Any]:
    base = str(request.base_url).rstrip("/") + "/fhir"
    return {
        "resourceType": "Bundle",
        "type": "searchset",
        "timestamp": datetime.now(UTC).isoformat(),
        "total": total,
        # the self link names no patient: the query may carry an NHS Number
        "link": [{"relation": "self", "url": f"{base}/{AUDIT_RESOURCE}"}],
        "entry": [
            {
                "fullUrl": f"{base}/{AUDIT_RESOURCE}/{e['id']}",
                "resource": e,
                "search": {"mode": "match"},
            }
            for e in events
        ],
    }


@router.get("/AuditEvent", summary="Search the audit trail (who looked at which patient)")
def search_audit_get(request: Request, caller: AuditReader) -> Response:
    return answer(request, caller, list(request.query_params.multi_items()))


@router.post("/AuditEvent/_search", summary="Search the audit trail with form parameters")
async def search_audit_post(request: Request, caller: AuditReader) -> Response:
    pairs = list(request.query_params.multi_items())
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if content_type == FORM_CONTENT_TYPE:
        form = await request.form()
        pairs += [(k, v) for k, v in form.multi_items() if isinstance(v, str)]
    return await run_in_threadpool(answer, request, caller, pairs)


def capability_resource() -> dict[str, Any]:
    """The AuditEvent entry of the CapabilityStatement's rest.resource."""
    return {
        "type": AUDIT_RESOURCE,
        "interaction": [{"code": "search-type"}],
        "searchParam": [
            {
                "name": "patient.identifier",
                "type": "token",
                "documentation": "The patient looked up (NHS Number)",
            },
            {"name": "date", "type": "date", "documentation": "When the look-up happened"},
            {
                "name": "agent",
                "type": "token",
                "documentation": "Token subject or client id of whoever looked",
            },
            {
                "name": "organization",
                "type": "token",
                "documentation": "Look-ups that were shown studies held by this trust (ODS)",
            },
            {"name": "outcome", "type": "token", "documentation": "0, 4 or 8"},
        ],
    }
