"""The audit trail: who looked at which patient, and reading it back as FHIR AuditEvent.

Rows are append-only: database triggers (migration 0001) refuse UPDATE and DELETE (and
TRUNCATE on PostgreSQL), so not even a bug or an operator's stray statement rewrites history.

Columns as written by the API: `action` is the FHIR interaction (`search` | `read`),
`resource_type` the type asked for, `query` what was asked (`ImagingStudy?…` or
`ImagingStudy/<id>`, NHS Numbers masked in it: the number itself is in `nhs_number`),
`outcome` the HTTP status answered, `trust_ods` the holding trusts of the studies shown
(comma-separated ODS codes), `result_count` how many matched.

Rendering follows FHIR R4 AuditEvent (http://hl7.org/fhir/R4/auditevent.html) in the shape
of the IHE Basic Audit Log Patterns (BALP) "RESTful query" and "read" events: type `rest`,
subtype the interaction, action E (search) or R (read), outcome 0 / 4 / 8, the requesting
agent, the locator as observer, and entities for the patient, the query, the holding trusts
and the request id.
"""

from __future__ import annotations

import base64
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from sqlalchemy import ColumnElement, Connection, and_, func, insert, literal, or_, select
from sqlalchemy.orm import Session

from locator.core.nhs_number import NHS_NUMBER_SYSTEM
from locator.store.models import AuditRecord, audit_table, utcnow

ODS_SYSTEM = "https://fhir.nhs.uk/Id/ods-organization-code"
AUDIT_EVENT_TYPE = "http://terminology.hl7.org/CodeSystem/audit-event-type"
RESTFUL_INTERACTION = "http://hl7.org/fhir/restful-interaction"
ENTITY_TYPE = "http://terminology.hl7.org/CodeSystem/audit-entity-type"
OBJECT_ROLE = "http://terminology.hl7.org/CodeSystem/object-role"
SOURCE_TYPE = "http://terminology.hl7.org/CodeSystem/security-source-type"
NETWORK_TYPE_IP = "2"  # R4 network-type: IP address
ACT_REASON = "http://terminology.hl7.org/CodeSystem/v3-ActReason"
BALP_ENTITY_TYPE = "https://profiles.ihe.net/ITI/BALP/CodeSystem/BasicAuditEntityType"
ROLE_CLASS = "http://terminology.hl7.org/CodeSystem/v3-RoleClass"


class AuditOutcome:
    """R4 audit-event-outcome codes."""

    SUCCESS = "0"
    MINOR_FAILURE = "4"  # the request was refused (HTTP 4xx)
    SERIOUS_FAILURE = "8"  # the service failed (HTTP 5xx)


ACTION_CODE = {"search": "E", "read": "R"}  # audit-event-action: E execute (a query), R read
SUBTYPE = {"search": ("search-type", "search type"), "read": ("read", "read")}
PURPOSE_OF_USE_CODES = frozenset(
    {
        "TREAT",
        "ETREAT",
        "CAREMGT",
        "HPAYMT",
        "HOPERAT",
        "HRESCH",
        "PATRQT",
        "PUBHLTH",
        "HSYSADMIN",
        "HQUALIMP",
        "HLEGAL",
        "PATADMIN",
        "TRAIN",
        "FAMRQT",
        "PWATRNY",
        "SUPNWK",
        "COC",
        "BTG",
    }
)


def audit_row(
    *,
    request_id: str,
    action: str,
    resource_type: str,
    query: str,
    nhs_number: str | None,
    result_count: int | None,
    outcome: int,
    subject: str | None = None,
    client_id: str | None = None,
    organisation: str | None = None,
    role: str | None = None,
    purpose_of_use: str | None = None,
    remote_addr: str | None = None,
    trust_ods: str | None = None,
) -> dict[str, Any]:
    """One audit row, recorded now."""
    return {
        "recorded_at": utcnow(),
        "request_id": request_id,
        "action": action,
        "resource_type": resource_type,
        "query": query,
        "nhs_number": nhs_number,
        "trust_ods": trust_ods,
        "result_count": result_count,
        "outcome": outcome,
        "subject": subject,
        "client_id": client_id,
        "organisation": organisation,
        "role": role,
        "purpose_of_use": purpose_of_use,
        "remote_addr": remote_addr,
    }


def record_access(session: Session, **record: Any) -> None:
    """Append one audit row (audit_row's fields) in the caller's transaction (the edge
    commits it). A Core INSERT on the session's connection: the ORM's bulk path costs three
    times as much on the per-request hot path."""
    session.connection().execute(_INSERT_AUDIT, audit_row(**record))


def record_accesses(conn: Connection, records: Sequence[dict[str, Any]]) -> None:
    """Append audit rows (audit_row's fields) with one statement in the caller's
    transaction: the API's group commit writes every waiting request's rows at once."""
    conn.execute(_INSERT_AUDIT, [audit_row(**record) for record in records])


_INSERT_AUDIT = insert(audit_table).inline()  # no RETURNING: it can be pipelined


# --------------------------------------------------------------------------- reading


@dataclass(frozen=True, slots=True)
class AuditCriteria:
    """An AuditEvent search: every given criterion must hold (dates are [lower, upper))."""

    nhs_number: str | None = None
    agent: str | None = None
    trust_ods: str | None = None
    outcome: str | None = None
    lower: Sequence[datetime] = field(default=())
    upper: Sequence[datetime] = field(default=())
    count: int = 50


def _conditions(criteria: AuditCriteria) -> list[ColumnElement[bool]]:
    conds: list[ColumnElement[bool]] = []
    col = AuditRecord.__table__.c  # type: ignore[attr-defined]
    if criteria.nhs_number:
        conds.append(col.nhs_number == criteria.nhs_number)
    if criteria.agent:
        conds.append(or_(col.subject == criteria.agent, col.client_id == criteria.agent))
    if criteria.trust_ods:
        # trust_ods holds comma-separated ODS codes (validated alphanumeric by the caller)
        padded = literal(",") + col.trust_ods + literal(",")
        conds.append(padded.like(f"%,{criteria.trust_ods},%"))
    if criteria.outcome is not None:
        conds.append(_outcome_condition(col.outcome, criteria.outcome))
    conds += [col.recorded_at >= bound for bound in criteria.lower]
    conds += [col.recorded_at < bound for bound in criteria.upper]
    return conds


def _outcome_condition(column: Any, code: str) -> ColumnElement[bool]:
    if code == AuditOutcome.SUCCESS:
        return and_(column >= 0, column < 400)
    if code == AuditOutcome.MINOR_FAILURE:
        return and_(column >= 400, column < 500)
    if code == AuditOutcome.SERIOUS_FAILURE:
        return column >= 500  # type: ignore[no-any-return]
    return literal(False)


def search_audit(session: Session, *, criteria: AuditCriteria) -> tuple[list[AuditRecord], int]:
    """The newest `count` matching rows and how many match in all."""
    conds = _conditions(criteria)
    table = AuditRecord.__table__  # type: ignore[attr-defined]
    rows = (
        session.execute(
            select(AuditRecord)
            .where(*conds)
            .order_by(table.c.recorded_at.desc(), table.c.id.desc())
            .limit(criteria.count)
        )
        .scalars()
        .all()
    )
    total = session.execute(select(func.count()).select_from(table).where(*conds)).scalar_one()
    return list(rows), int(total)


# --------------------------------------------------------------------------- rendering


def fhir_outcome(status: int) -> str:
    """An HTTP status as R4 audit-event-outcome."""
    if status < 400:
        return AuditOutcome.SUCCESS
    return AuditOutcome.MINOR_FAILURE if status < 500 else AuditOutcome.SERIOUS_FAILURE


def _codeable(text: str) -> dict[str, Any]:
    if text.upper() in PURPOSE_OF_USE_CODES:
        return {"coding": [{"system": ACT_REASON, "code": text.upper()}], "text": text}
    return {"text": text}


def _requestor(row: AuditRecord, issuer: str | None) -> dict[str, Any]:
    who: dict[str, Any] = {"display": row.subject or "unknown (no verified token)"}
    if row.subject:
        who["identifier"] = {"value": row.subject, **({"system": issuer} if issuer else {})}
    agent: dict[str, Any] = {"who": who, "requestor": True}
    if row.client_id:
        agent["altId"] = row.client_id
    if row.role:
        agent["role"] = [{"text": row.role}]
    if row.remote_addr:
        agent["network"] = {"address": row.remote_addr, "type": NETWORK_TYPE_IP}
    if row.purpose_of_use:
        agent["purposeOfUse"] = [_codeable(row.purpose_of_use)]
    return agent


def _organisation_agent(ods: str) -> dict[str, Any]:
    return {
        "type": {
            "coding": [{"system": ROLE_CLASS, "code": "PROV", "display": "healthcare provider"}]
        },
        "who": {"identifier": {"system": ODS_SYSTEM, "value": ods}},
        "requestor": False,
    }


def _entities(row: AuditRecord) -> list[dict[str, Any]]:
    entities: list[dict[str, Any]] = []
    if row.nhs_number:
        entities.append(
            {
                "what": {"identifier": {"system": NHS_NUMBER_SYSTEM, "value": row.nhs_number}},
                "type": {"system": ENTITY_TYPE, "code": "1", "display": "Person"},
                "role": {"system": OBJECT_ROLE, "code": "1", "display": "Patient"},
            }
        )
    query = {
        "what": {"display": row.resource_type},
        "type": {"system": ENTITY_TYPE, "code": "2", "display": "System Object"},
        "role": {"system": OBJECT_ROLE, "code": "24", "display": "Query"},
        "description": row.query,
        "detail": [{"type": "result-count", "valueString": str(row.result_count)}]
        if row.result_count is not None
        else [],
    }
    if row.action == "search":
        query["query"] = base64.b64encode(row.query.encode()).decode("ascii")
    if not query["detail"]:
        del query["detail"]
    entities.append(query)
    for ods in filter(None, (row.trust_ods or "").split(",")):
        entities.append(
            {
                "what": {"identifier": {"system": ODS_SYSTEM, "value": ods}},
                "type": {"system": ENTITY_TYPE, "code": "3", "display": "Organization"},
                "description": "holding trust of studies in the result",
            }
        )
    entities.append(
        {
            "what": {"identifier": {"value": row.request_id}},
            "type": {"system": BALP_ENTITY_TYPE, "code": "XrequestId"},
        }
    )
    return entities


def audit_event(row: AuditRecord, *, observer: str, issuer: str | None = None) -> dict[str, Any]:
    """One audit row as a FHIR R4 AuditEvent (a plain dict)."""
    subtype_code, subtype_display = SUBTYPE.get(row.action, (row.action, row.action))
    agents = [_requestor(row, issuer)]
    if row.organisation:
        agents.append(_organisation_agent(row.organisation))
    event: dict[str, Any] = {
        "resourceType": "AuditEvent",
        "id": str(row.id),
        "type": {"system": AUDIT_EVENT_TYPE, "code": "rest", "display": "RESTful Operation"},
        "subtype": [
            {"system": RESTFUL_INTERACTION, "code": subtype_code, "display": subtype_display}
        ],
        "action": ACTION_CODE.get(row.action, "E"),
        "recorded": row.recorded_at.isoformat(),
        "outcome": fhir_outcome(row.outcome),
        "outcomeDesc": f"HTTP {row.outcome}",
        "agent": agents,
        "source": {
            "observer": {"display": observer},
            "type": [{"system": SOURCE_TYPE, "code": "4", "display": "Application Server"}],
        },
        "entity": _entities(row),
    }
    if row.purpose_of_use:
        event["purposeOfEvent"] = [_codeable(row.purpose_of_use)]
    return event
