"""FHIR R4 Subscription (rest-hook) for one patient's ImagingStudies: create, read, search by
status, update, delete (interface.md, Subscriptions; docs/subscriptions.md).

- `criteria` is exactly `ImagingStudy?patient.identifier=https://fhir.nhs.uk/Id/nhs-number|N`
  with a valid NHS Number: one patient, nothing broader.
- `channel.type` `rest-hook`; `channel.endpoint` https (http only to loopback in open mode),
  resolving only to allowed addresses (locator.notify.addresses); `channel.payload` absent or
  `application/fhir+json`; `channel.header` lines `Name: value`; optional `end`.
- A new or updated subscription is `requested` (or `off` when the client says so); the
  deliverer's handshake makes it `active` or `error`. `error` is the server's to set.
- Scopes: `system/Subscription.write` (or v2 `c`/`u`/`d`) to create, update, delete;
  `system/Subscription.read` (or v2 `r`/`s`) to read and search. A client sees and changes only
  its own subscriptions (the token's client id, else its subject): another's answers 404.
- Creating or updating a subscription is a patient look-up: audited like a search (who,
  which NHS Number, when, outcome), in the transaction that stores it.
"""

from __future__ import annotations

import json
import re
import urllib.parse
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import Response
from sqlalchemy import Connection, delete, insert, select, update
from starlette.concurrency import run_in_threadpool

from locator.api.auth import OPEN_MODE_SUBJECT, Caller, authenticate
from locator.api.interactions import ctx_of, fhir_base, fhir_response, negotiate
from locator.api.outcomes import ApiError, BadRequestError, IssueCode, NotFoundError
from locator.api.query import read_study
from locator.api.render import bundle, entry, imaging_study, instant
from locator.api.scopes import Interaction
from locator.audit import record_access
from locator.core.nhs_number import (
    NHS_NUMBER_SYSTEM,
    InvalidNhsNumberError,
    mask,
    parse_nhs_number,
)
from locator.notify.addresses import EndpointRefusedError, parse_networks, resolve
from locator.notify.deliverer import NotifiedStudy, StudyReader
from locator.notify.sender import EVENT_HEADER, FHIR_JSON, RESERVED_HEADERS
from locator.store.db import transaction
from locator.store.models import subscription_outbox_table, subscription_table
from locator.trusts import TrustRegistry

SUBSCRIPTION = subscription_table
OUTBOX = subscription_outbox_table
RESOURCE = "Subscription"
CRITERIA_PREFIX = f"ImagingStudy?patient.identifier={NHS_NUMBER_SYSTEM}|"
REST_HOOK = "rest-hook"
STATUSES = ("requested", "active", "error", "off")
CLIENT_STATUSES = frozenset({"requested", "active", "off"})
DEFAULT_REASON = "Notify of new or changed imaging studies of one patient"
MAX_BODY_BYTES = 64 * 1024
MAX_HEADERS = 10
MAX_HEADER_CHARS = 4096
_HEADER_NAME = re.compile(r"^[!#$%&'*+.^_`|~0-9A-Za-z-]+$")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


class UnprocessableError(ApiError):
    """A well-formed Subscription that breaks a rule of this server (422)."""

    status = 422
    code = IssueCode.VALUE


@dataclass(frozen=True, slots=True)
class Draft:
    """A Subscription as the client asked for it, checked."""

    status: str
    nhs_number: str
    endpoint: str
    payload: str | None
    headers: tuple[str, ...]
    reason: str | None
    end_at: datetime | None


# --------------------------------------------------------------------------- parsing


def _text(value: Any, where: str) -> str:
    if not isinstance(value, str) or not value.strip():
        raise BadRequestError(f"{where} must be a non-empty string", expression=where)
    return value.strip()


def parse_criteria(value: Any, *, accept_test: bool) -> str:
    criteria = urllib.parse.unquote(_text(value, "Subscription.criteria"))
    if not criteria.startswith(CRITERIA_PREFIX):
        raise UnprocessableError(
            f"criteria must be {CRITERIA_PREFIX}<NHS Number>: one patient's ImagingStudies",
            expression="Subscription.criteria",
        )
    try:
        return parse_nhs_number(criteria[len(CRITERIA_PREFIX) :], accept_test_numbers=accept_test)
    except InvalidNhsNumberError as exc:
        raise UnprocessableError(
            f"criteria: not a valid NHS Number ({exc})", expression="Subscription.criteria"
        ) from exc


def parse_headers(value: Any) -> tuple[str, ...]:
    if value is None:
        return ()
    if not isinstance(value, list) or len(value) > MAX_HEADERS:
        raise BadRequestError(
            f"channel.header must be a list of at most {MAX_HEADERS} strings",
            expression="Subscription.channel.header",
        )
    lines = []
    for line in value:
        if not isinstance(line, str) or len(line) > MAX_HEADER_CHARS or _CONTROL.search(line):
            raise BadRequestError("channel.header: a line is not a printable string")
        name, colon, rest = line.partition(":")
        name = name.strip()
        if not colon or not _HEADER_NAME.match(name):
            raise BadRequestError("channel.header lines are `Name: value`")
        if name.lower() in RESERVED_HEADERS or name.lower().startswith("x-locator-"):
            raise UnprocessableError(f"channel.header may not set {name}")
        lines.append(f"{name}: {rest.strip()}")
    return tuple(lines)


def parse_payload(value: Any) -> str | None:
    if value is None:
        return None
    payload = _text(value, "Subscription.channel.payload").split(";")[0].strip().lower()
    if payload != FHIR_JSON:
        raise UnprocessableError(
            f"channel.payload must be absent or {FHIR_JSON}",
            expression="Subscription.channel.payload",
        )
    return FHIR_JSON


def parse_end(value: Any) -> datetime | None:
    if value is None:
        return None
    try:
        end = datetime.fromisoformat(_text(value, "Subscription.end").replace("Z", "+00:00"))
    except ValueError as exc:
        raise BadRequestError("end must be a FHIR instant", expression="Subscription.end") from exc
    if end.tzinfo is None:
        raise BadRequestError("end must carry a time zone", expression="Subscription.end")
    return end.astimezone(UTC)


def parse_subscription(body: Any, *, accept_test: bool, open_mode: bool) -> Draft:
    """A Subscription resource from the client, checked (no network look-up here)."""
    if not isinstance(body, dict) or body.get("resourceType") != RESOURCE:
        raise BadRequestError("the body must be a Subscription resource")
    channel = body.get("channel")
    if not isinstance(channel, dict):
        raise BadRequestError("Subscription.channel is required")
    if channel.get("type") != REST_HOOK:
        raise UnprocessableError(
            "channel.type must be rest-hook", expression="Subscription.channel.type"
        )
    endpoint = _text(channel.get("endpoint"), "Subscription.channel.endpoint")
    status = body.get("status", "requested")
    if status not in CLIENT_STATUSES:
        raise UnprocessableError(
            "status must be requested, active or off (error is set by the server)",
            expression="Subscription.status",
        )
    reason = body.get("reason")
    return Draft(
        status="off" if status == "off" else "requested",
        nhs_number=parse_criteria(body.get("criteria"), accept_test=accept_test),
        endpoint=endpoint,
        payload=parse_payload(channel.get("payload")),
        headers=parse_headers(channel.get("header")),
        reason=_text(reason, "Subscription.reason") if reason is not None else None,
        end_at=parse_end(body.get("end")),
    )


async def read_body(request: Request) -> Any:
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if content_type not in (FHIR_JSON, "application/json", "application/json+fhir"):
        raise BadRequestError("send the Subscription as application/fhir+json")
    raw = b""
    async for chunk in request.stream():
        raw += chunk
        if len(raw) > MAX_BODY_BYTES:
            raise BadRequestError(f"the body is over {MAX_BODY_BYTES} bytes")
    try:
        return json.loads(raw)
    except ValueError as exc:
        raise BadRequestError("the body is not JSON") from exc


# --------------------------------------------------------------------------- rendering


def criteria_of(nhs_number: str) -> str:
    return CRITERIA_PREFIX + nhs_number


def subscription_resource(row: Any) -> dict[str, Any]:
    channel: dict[str, Any] = {"type": REST_HOOK, "endpoint": row.endpoint}
    if row.payload:
        channel["payload"] = row.payload
    headers = json.loads(row.headers)
    if headers:
        channel["header"] = headers
    res: dict[str, Any] = {
        "resourceType": RESOURCE,
        "id": row.id,
        "meta": {"versionId": str(row.version), "lastUpdated": instant(row.updated_at)},
        "status": row.status,
        "reason": row.reason or DEFAULT_REASON,
        "criteria": criteria_of(row.nhs_number),
        "channel": channel,
    }
    if row.end_at is not None:
        res["end"] = instant(row.end_at)
    if row.error:
        res["error"] = row.error
    return res


# --------------------------------------------------------------------------- storage


def owner_of(caller: Caller) -> str:
    return caller.client_id or caller.subject or OPEN_MODE_SUBJECT


def _values(draft: Draft, now: datetime) -> dict[str, Any]:
    return {
        "status": draft.status,
        "nhs_number": draft.nhs_number,
        "endpoint": draft.endpoint,
        "payload": draft.payload,
        "headers": json.dumps(list(draft.headers)),
        "reason": draft.reason,
        "end_at": draft.end_at,
        "error": None,
        "updated_at": now,
        "attempts": 0,
        "failing_since": None,
        "next_attempt_at": None,
    }


def load_own(conn: Connection, sub_id: str, owner: str) -> Any:
    row = conn.execute(
        select(SUBSCRIPTION).where(SUBSCRIPTION.c.id == sub_id, SUBSCRIPTION.c.owner == owner)
    ).first()
    if row is None:
        raise NotFoundError(f"Subscription/{sub_id} is not known")
    return row


def audit_lookup(session: Any, caller: Caller, *, draft: Draft, outcome: int, what: str) -> None:
    """Storing a subscription looks a patient up: audited like a search, in its transaction."""
    record_access(
        session,
        action="search",
        resource_type=RESOURCE,
        query=f"{what} criteria={CRITERIA_PREFIX}{mask(draft.nhs_number)}",
        nhs_number=draft.nhs_number,
        result_count=None,
        outcome=outcome,
        **caller.audit_fields(),
    )


# --------------------------------------------------------------------------- interactions


def require_subscription(request: Request, interaction: Interaction) -> Caller:
    return authenticate(
        request, resources=(RESOURCE,), contexts=("system",), interaction=interaction
    )


def check_endpoint(request: Request, draft: Draft) -> None:
    settings = ctx_of(request).settings
    try:
        resolve(
            draft.endpoint,
            networks=parse_networks(settings.subscription_allowed_networks),
            open_mode=not settings.jwks,
        )
    except EndpointRefusedError as exc:
        raise UnprocessableError(str(exc), expression="Subscription.channel.endpoint") from exc


def _draft(request: Request, body: Any) -> Draft:
    settings = ctx_of(request).settings
    draft = parse_subscription(
        body, accept_test=settings.accept_test_nhs_numbers, open_mode=not settings.jwks
    )
    check_endpoint(request, draft)
    return draft


def create(request: Request, caller: Caller, body: Any) -> dict[str, Any]:
    draft = _draft(request, body)
    now = datetime.now(UTC)
    sub_id = uuid.uuid4().hex
    with transaction(ctx_of(request).session_factory) as session:
        values = {**_values(draft, now), "id": sub_id, "owner": owner_of(caller), "version": 1}
        session.connection().execute(insert(SUBSCRIPTION).values(created_at=now, **values))
        audit_lookup(session, caller, draft=draft, outcome=201, what="create")
        row = load_own(session.connection(), sub_id, owner_of(caller))
    return subscription_resource(row)


def replace(request: Request, caller: Caller, sub_id: str, body: Any) -> dict[str, Any]:
    if isinstance(body, dict) and body.get("id") not in (None, sub_id):
        raise BadRequestError("the resource's id differs from the URL's")
    draft = _draft(request, body)
    now = datetime.now(UTC)
    owner = owner_of(caller)
    with transaction(ctx_of(request).session_factory) as session:
        conn = session.connection()
        old = load_own(conn, sub_id, owner)
        if old.nhs_number != draft.nhs_number:  # notifications owed to the old patient go
            conn.execute(delete(OUTBOX).where(OUTBOX.c.subscription_id == sub_id))
        conn.execute(
            update(SUBSCRIPTION)
            .where(SUBSCRIPTION.c.id == sub_id)
            .values(version=SUBSCRIPTION.c.version + 1, **_values(draft, now))
        )
        audit_lookup(session, caller, draft=draft, outcome=200, what="update")
        row = load_own(conn, sub_id, owner)
    return subscription_resource(row)


def remove(request: Request, caller: Caller, sub_id: str) -> None:
    with transaction(ctx_of(request).session_factory) as session:
        conn = session.connection()
        load_own(conn, sub_id, owner_of(caller))
        conn.execute(delete(OUTBOX).where(OUTBOX.c.subscription_id == sub_id))
        conn.execute(delete(SUBSCRIPTION).where(SUBSCRIPTION.c.id == sub_id))


def read_one(request: Request, caller: Caller, sub_id: str) -> dict[str, Any]:
    with ctx_of(request).session_factory() as session:
        return subscription_resource(load_own(session.connection(), sub_id, owner_of(caller)))


def search(request: Request, caller: Caller) -> dict[str, Any]:
    statuses: set[str] = set()
    for key, value in request.query_params.multi_items():
        if key == "status":
            for status in value.split(","):
                if status not in STATUSES:
                    raise BadRequestError(f"status: one of {', '.join(STATUSES)}")
                statuses.add(status)
        elif key != "_format":
            raise BadRequestError(f"Subscription search supports status only, not {key}")
    stmt = select(SUBSCRIPTION).where(SUBSCRIPTION.c.owner == owner_of(caller))
    if statuses:
        stmt = stmt.where(SUBSCRIPTION.c.status.in_(sorted(statuses)))
    with ctx_of(request).session_factory() as session:
        rows = list(session.connection().execute(stmt.order_by(SUBSCRIPTION.c.created_at)))
    base = fhir_base(request)
    entries = [entry(base, subscription_resource(row), "match") for row in rows]
    return bundle(
        entries=entries,
        links=[("self", str(request.url))],
        total=len(rows),
        now=datetime.now(UTC),
    )


def _location(request: Request, resource: dict[str, Any]) -> dict[str, str]:
    version = resource["meta"]["versionId"]
    return {
        "Location": f"{fhir_base(request)}/{RESOURCE}/{resource['id']}/_history/{version}",
        "ETag": f'W/"{version}"',
    }


# --------------------------------------------------------------------------- routes

router = APIRouter(prefix="/fhir", tags=["Subscription"])


@router.post("/Subscription", status_code=201, summary="Subscribe to one patient's imaging")
async def create_subscription(request: Request) -> Response:
    caller = require_subscription(request, "create")
    media_type = negotiate(request)
    body = await read_body(request)
    resource = await run_in_threadpool(create, request, caller, body)
    return fhir_response(resource, media_type, status=201, headers=_location(request, resource))


@router.get("/Subscription", summary="The caller's subscriptions, by status")
async def search_subscriptions(request: Request) -> Response:
    caller = require_subscription(request, "search")
    media_type = negotiate(request)
    return fhir_response(await run_in_threadpool(search, request, caller), media_type)


@router.get("/Subscription/{sub_id}", summary="One of the caller's subscriptions")
async def read_subscription(request: Request, sub_id: str) -> Response:
    caller = require_subscription(request, "read")
    media_type = negotiate(request)
    resource = await run_in_threadpool(read_one, request, caller, sub_id)
    return fhir_response(
        resource, media_type, headers={"ETag": f'W/"{resource["meta"]["versionId"]}"'}
    )


@router.put("/Subscription/{sub_id}", summary="Change (or re-activate) a subscription")
async def update_subscription(request: Request, sub_id: str) -> Response:
    caller = require_subscription(request, "update")
    media_type = negotiate(request)
    body = await read_body(request)
    resource = await run_in_threadpool(replace, request, caller, sub_id, body)
    return fhir_response(resource, media_type, headers=_location(request, resource))


@router.delete("/Subscription/{sub_id}", status_code=204, summary="Unsubscribe")
async def delete_subscription(request: Request, sub_id: str) -> Response:
    caller = require_subscription(request, "delete")
    await run_in_threadpool(remove, request, caller, sub_id)
    return Response(status_code=204)


# --------------------------------------------------------------------------- the deliverer's reads


def study_reader(registry: TrustRegistry) -> StudyReader:
    """The deliverer's view of studies (locator.notify.deliverer.StudyReader): the
    ImagingStudy as a read would render it now, and whose it is."""

    def read(conn: Connection, study_ids: Sequence[str]) -> dict[str, NotifiedStudy]:
        found = {}
        for study_id in dict.fromkeys(study_ids):
            row = read_study(conn, study_id)
            if row is None:
                continue
            trust = registry.get(row.trust_ods)
            resource = imaging_study(row, trust) if trust is not None else None
            found[study_id] = NotifiedStudy(
                row.nhs_number, row.trust_ods, row.merged_into, resource
            )
        return found

    return read


__all__ = ["EVENT_HEADER", "router", "study_reader", "subscription_resource"]
