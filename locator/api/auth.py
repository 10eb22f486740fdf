"""Who is calling: bearer-token verification and scopes (stub: open mode only for now).

Interface used by the routes (kept stable while the security work fills it in):
- `Caller`: the authenticated (or open-mode) caller, with the request id.
- `require_imaging_read` / `require_audit_read`: FastAPI dependencies returning a Caller,
  raising AuthError (401) or ScopeError (403).
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass

from fastapi import Request


@dataclass(frozen=True, slots=True)
class Caller:
    subject: str | None
    client_id: str | None
    organisation: str | None
    role: str | None
    scopes: frozenset[str]
    purpose_of_use: str | None
    request_id: str
    remote_addr: str | None


def _request_id(request: Request) -> str:
    rid = getattr(request.state, "request_id", None)
    return rid if isinstance(rid, str) else str(uuid.uuid4())


def open_caller(request: Request) -> Caller:
    return Caller(
        subject="open-mode",
        client_id=None,
        organisation=None,
        role=None,
        scopes=frozenset({"system/*.read"}),
        purpose_of_use=request.headers.get("X-Purpose-Of-Use"),
        request_id=_request_id(request),
        remote_addr=request.client.host if request.client else None,
    )


def require_imaging_read(request: Request) -> Caller:
    return open_caller(request)


def require_audit_read(request: Request) -> Caller:
    return open_caller(request)
