"""The API's one error tree and its one mapping to FHIR OperationOutcome responses.

Every error the API answers is an `ApiError` (or is turned into one here): its HTTP status,
its OperationOutcome issue code (FHIR R4 §3.1.5.3, value set `issue-type`) and a
diagnostics text that is safe to show. A 500 never echoes the exception: the client gets
the request id to quote, the log gets the traceback. A database that is unreachable or busy
(locator.store.db.is_transient) answers 503, not 500.
"""

from __future__ import annotations

import logging
from typing import Any

import orjson
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response
from sqlalchemy.exc import DBAPIError
from starlette.exceptions import HTTPException as StarletteHTTPException

from locator.metrics import DB_ERRORS
from locator.store.db import is_transient

log = logging.getLogger("locator.api")

FHIR_JSON = "application/fhir+json"


class IssueSeverity:
    FATAL = "fatal"
    ERROR = "error"
    WARNING = "warning"
    INFORMATION = "information"


class IssueCode:
    """FHIR R4 `issue-type` codes used by this service."""

    INVALID = "invalid"
    VALUE = "value"
    REQUIRED = "required"
    NOT_SUPPORTED = "not-supported"
    NOT_FOUND = "not-found"
    DELETED = "deleted"
    SECURITY = "security"
    LOGIN = "login"
    FORBIDDEN = "forbidden"
    EXCEPTION = "exception"
    TRANSIENT = "transient"
    TOO_COSTLY = "too-costly"
    INFORMATIONAL = "informational"


class ApiError(Exception):
    """An error answered as an OperationOutcome with `status`."""

    status: int = 500
    code: str = IssueCode.EXCEPTION

    def __init__(self, diagnostics: str, *, expression: str | None = None) -> None:
        super().__init__(diagnostics)
        self.diagnostics = diagnostics
        self.expression = expression


class BadRequestError(ApiError):
    """The request cannot be answered as asked (400)."""

    status = 400
    code = IssueCode.INVALID


class InvalidSearchError(BadRequestError):
    """A search parameter value or combination that is refused (400)."""

    code = IssueCode.VALUE


class UnsupportedParameterError(BadRequestError):
    """A parameter this server does not support, refused under `Prefer: handling=strict`."""

    code = IssueCode.NOT_SUPPORTED


class InvalidCursorError(BadRequestError):
    """A `_cursor` that is malformed, tampered with, or expired (400)."""


class UnauthenticatedError(ApiError):
    status = 401
    code = IssueCode.LOGIN


class ForbiddenError(ApiError):
    status = 403
    code = IssueCode.FORBIDDEN


class NotFoundError(ApiError):
    status = 404
    code = IssueCode.NOT_FOUND


class MergedAwayError(NotFoundError):
    """A study id that was merged into another study: 404 naming the survivor."""

    def __init__(self, study_id: str, survivor_id: str) -> None:
        super().__init__(
            f"ImagingStudy/{study_id} was merged into ImagingStudy/{survivor_id}; "
            f"use ImagingStudy/{survivor_id}",
        )
        self.survivor_id = survivor_id


class MethodNotAllowedError(ApiError):
    status = 405
    code = IssueCode.NOT_SUPPORTED


class NotAcceptableError(ApiError):
    """The client asked for a format we do not produce (XML): 406."""

    status = 406
    code = IssueCode.NOT_SUPPORTED


class UnavailableError(ApiError):
    """A dependency (database, audit store) is unavailable; no data is returned (503)."""

    status = 503
    code = IssueCode.TRANSIENT


def issue(
    severity: str, code: str, diagnostics: str, expression: str | None = None
) -> dict[str, Any]:
    item: dict[str, Any] = {"severity": severity, "code": code, "diagnostics": diagnostics}
    if expression:
        item["expression"] = [expression]
    return item


def operation_outcome(issues: list[dict[str, Any]]) -> dict[str, Any]:
    return {"resourceType": "OperationOutcome", "issue": issues}


def outcome_response(
    status: int, issues: list[dict[str, Any]], headers: dict[str, str] | None = None
) -> Response:
    return Response(
        orjson.dumps(operation_outcome(issues)),
        status_code=status,
        media_type=FHIR_JSON,
        headers=headers,
    )


def error_response(error: ApiError) -> Response:
    severity = IssueSeverity.ERROR if error.status < 500 else IssueSeverity.FATAL
    headers = {"WWW-Authenticate": "Bearer"} if error.status == 401 else None
    return outcome_response(
        error.status,
        [issue(severity, error.code, error.diagnostics, error.expression)],
        headers,
    )


_HTTP_STATUS_ERRORS: dict[int, type[ApiError]] = {
    400: BadRequestError,
    401: UnauthenticatedError,
    403: ForbiddenError,
    404: NotFoundError,
    405: MethodNotAllowedError,
    406: NotAcceptableError,
    503: UnavailableError,
}


def from_http_status(status: int, detail: str | None) -> ApiError:
    """An ApiError for a framework (or auth) HTTPException, keeping its status."""
    cls = _HTTP_STATUS_ERRORS.get(status)
    if cls is None:
        error = ApiError(detail or "request failed")
        error.status = status
        return error
    return cls(detail or _DEFAULT_TEXT.get(status, "request failed"))


_DEFAULT_TEXT = {
    401: "authentication required: send Authorization: Bearer <token>",
    403: "the token does not grant access to this interaction",
    404: "no such resource or resource type on this server",
    405: "this server is read-only: the interaction is not supported",
}


def _request_id(request: Request) -> str:
    rid = getattr(request.state, "request_id", None)
    return rid if isinstance(rid, str) else "unknown"


async def handle_api_error(_request: Request, exc: Exception) -> Response:
    assert isinstance(exc, ApiError)
    return error_response(exc)


async def handle_http_exception(_request: Request, exc: Exception) -> Response:
    assert isinstance(exc, StarletteHTTPException)
    detail = exc.detail if isinstance(exc.detail, str) and exc.status_code < 500 else None
    if exc.status_code in _DEFAULT_TEXT:
        detail = (
            _DEFAULT_TEXT[exc.status_code]
            if detail in (None, "Not Found", "Method Not Allowed")
            else detail
        )
    error = from_http_status(exc.status_code, detail)
    response = error_response(error)
    for name, value in (exc.headers or {}).items():
        response.headers[name] = value
    return response


async def handle_validation_error(_request: Request, exc: Exception) -> Response:
    assert isinstance(exc, RequestValidationError)
    where = ", ".join(".".join(str(p) for p in err.get("loc", ())) for err in exc.errors())
    return error_response(BadRequestError(f"invalid request ({where or 'body'})"))


async def handle_unexpected(request: Request, exc: Exception) -> Response:
    # Never echo internals: the log has the traceback, the client the request id to quote.
    rid = _request_id(request)
    log.error(
        "unhandled error in %s %s (request %s)", request.method, request.url.path, rid, exc_info=exc
    )
    return error_response(ApiError(f"internal error; quote request id {rid}"))


async def handle_database_error(request: Request, exc: Exception) -> Response:
    """Unreachable or busy database: 503 (transient); anything else is an internal error."""
    if not is_transient(exc):
        return await handle_unexpected(request, exc)
    rid = _request_id(request)
    DB_ERRORS.labels("api").inc()
    log.warning("database unavailable (request %s): %s", rid, type(exc).__name__)
    return error_response(UnavailableError(f"the index is unavailable; retry (request {rid})"))


def install_error_handlers(app: FastAPI) -> None:
    """The one place errors become OperationOutcomes (the security layer adds its own for
    401/403/429, with their WWW-Authenticate and Retry-After headers)."""
    app.add_exception_handler(ApiError, handle_api_error)
    app.add_exception_handler(StarletteHTTPException, handle_http_exception)
    app.add_exception_handler(RequestValidationError, handle_validation_error)
    app.add_exception_handler(DBAPIError, handle_database_error)
    app.add_exception_handler(Exception, handle_unexpected)
