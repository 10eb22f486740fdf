"""The audit trail: who looked at which patient (stub: plain insert; the security work
completes it with AuditEvent rendering and failure handling)."""

from __future__ import annotations

from sqlalchemy import insert
from sqlalchemy.orm import Session

from locator.models import AuditRecord, utcnow


def record_access(
    session: Session,
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
) -> None:
    session.execute(
        insert(AuditRecord).values(
            recorded_at=utcnow(), request_id=request_id, action=action,
            resource_type=resource_type, query=query, nhs_number=nhs_number,
            trust_ods=trust_ods, result_count=result_count, outcome=outcome, subject=subject,
            client_id=client_id, organisation=organisation, role=role,
            purpose_of_use=purpose_of_use, remote_addr=remote_addr,
        )
    )
