"""Request context for every HTTP request: a request id, a masked access log, a last-resort
500, and the per-client rate limiter used for patient look-ups.

- Request id: a client's `X-Request-ID` is kept when it is a plain token (letters, digits,
  `._:-`, at most 100 characters, nothing that reads as an NHS Number), else a UUID is made.
  It is echoed in the response, set as `request.state.request_id`, stored in the audit, and
  added to every log record emitted while the request runs.
- Access log (`locator.access`): client, method, path and query with every NHS Number
  masked (also the URL-encoded and spaced forms, since the query is decoded before masking),
  status and time. It replaces uvicorn's access log, which logs the raw query string.
- An exception that escapes the app becomes a 500 OperationOutcome naming only the request
  id; the traceback is logged with NHS Numbers masked.
"""

from __future__ import annotations

import contextvars
import logging
import re
import threading
import time
import traceback
import urllib.parse
import uuid
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

import orjson
from starlette.datastructures import MutableHeaders
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from locator.core.nhs_number import redact_text

REQUEST_ID_HEADER = "X-Request-ID"
_REQUEST_ID_OK = re.compile(r"^[A-Za-z0-9._:\-]{1,100}$")
REQUEST_ID: contextvars.ContextVar[str | None] = contextvars.ContextVar(
    "locator_request_id", default=None
)
FHIR_JSON = "application/fhir+json"
MAX_RATE_CLIENTS = 10_000

access_log = logging.getLogger("locator.access")
log = logging.getLogger(__name__)


def accept_request_id(value: str | None) -> str:
    """The client's request id when it is safe to log and store, else a new UUID."""
    if value and _REQUEST_ID_OK.match(value) and redact_text(value) == value:
        return value
    return str(uuid.uuid4())


def masked_target(path: str, query: str) -> str:
    """The request target for a log line: decoded, NHS Numbers masked, re-encoded."""
    safe_path = redact_text(urllib.parse.unquote(path))
    if not query:
        return urllib.parse.quote(safe_path, safe="/_-.$~")
    pairs = urllib.parse.parse_qsl(query, keep_blank_values=True)
    masked = [(redact_text(k), redact_text(v)) for k, v in pairs]
    encoded = urllib.parse.urlencode(masked, quote_via=urllib.parse.quote, safe="|:/*,")
    return f"{urllib.parse.quote(safe_path, safe='/_-.$~')}?{encoded}"


def mask_exception(record: logging.LogRecord) -> None:
    """Tracebacks bypass a message-only mask (SQL errors quote their parameters): render
    them now, masked, so the formatter prints the masked text."""
    if record.exc_info and record.exc_info[0] is not None:
        text = "".join(traceback.format_exception(*record.exc_info))
        record.exc_text, record.exc_info = redact_text(text.rstrip("\n")), None
    elif record.exc_text:
        record.exc_text = redact_text(record.exc_text)
    if record.stack_info:
        record.stack_info = redact_text(record.stack_info)


class RequestIdLogFilter(logging.Filter):
    """Adds ` request_id=…` to log records emitted while a request is being served, and
    masks NHS Numbers in tracebacks."""

    def filter(self, record: logging.LogRecord) -> bool:
        mask_exception(record)
        rid = REQUEST_ID.get()
        record.request_id = rid or "-"
        if rid and record.name != access_log.name and not getattr(record, "_rid_added", False):
            record.msg, record.args = f"{record.getMessage()} request_id={rid}", None
            record._rid_added = True
        return True


class UvicornAccessMask(logging.Filter):
    """Masks the request target of uvicorn's own access log, should a runner enable it:
    its record carries the raw query string, where `%20`- or `+`-spaced NHS Numbers
    escape a plain-text mask (args: client, method, path?query, HTTP version, status)."""

    def filter(self, record: logging.LogRecord) -> bool:
        args = record.args
        if isinstance(args, tuple) and len(args) == 5 and isinstance(args[2], str):
            path, _, query = args[2].partition("?")
            record.args = (args[0], args[1], masked_target(path, query), args[3], args[4])
        return True


def install_log_filter() -> None:
    """Put the request-id filter on the root handlers and the mask on uvicorn's access
    logger (once each)."""
    for handler in logging.getLogger().handlers:
        if not any(isinstance(f, RequestIdLogFilter) for f in handler.filters):
            handler.addFilter(RequestIdLogFilter())
    uvicorn_access = logging.getLogger("uvicorn.access")
    if not any(isinstance(f, UvicornAccessMask) for f in uvicorn_access.filters):
        uvicorn_access.addFilter(UvicornAccessMask())


def internal_error_body(request_id: str) -> bytes:
    return orjson.dumps(
        {
            "resourceType": "OperationOutcome",
            "issue": [
                {
                    "severity": "error",
                    "code": "exception",
                    "diagnostics": f"internal error; quote request id {request_id}",
                }
            ],
        }
    )


class RequestContextMiddleware:
    """Pure ASGI middleware (no BaseHTTPMiddleware: streaming and speed stay intact)."""

    def __init__(self, app: ASGIApp, *, access_log_enabled: bool = True) -> None:
        self.app = app
        self.access_log_enabled = access_log_enabled

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope.get("headers") or [])
        rid = accept_request_id(
            headers.get(REQUEST_ID_HEADER.lower().encode(), b"").decode("latin-1")
        )
        scope.setdefault("state", {})["request_id"] = rid
        token = REQUEST_ID.set(rid)
        started = time.perf_counter()
        state: dict[str, Any] = {"status": 500, "started": False}

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                MutableHeaders(scope=message)[REQUEST_ID_HEADER] = rid
                state["status"], state["started"] = message["status"], True
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        except Exception as exc:
            log.error(
                "unhandled %s: %s",
                type(exc).__name__,
                redact_text("".join(traceback.format_exception(exc))),
            )
            if not state["started"]:
                await self._internal_error(send_with_id, rid)
        finally:
            if self.access_log_enabled:
                self._log(scope, state["status"], time.perf_counter() - started, rid)
            REQUEST_ID.reset(token)

    @staticmethod
    async def _internal_error(send: Send, rid: str) -> None:
        body = internal_error_body(rid)
        await send(
            {
                "type": "http.response.start",
                "status": 500,
                "headers": [
                    (b"content-type", FHIR_JSON.encode()),
                    (b"content-length", str(len(body)).encode()),
                ],
            }
        )
        await send({"type": "http.response.body", "body": body})

    @staticmethod
    def _log(scope: Scope, status: int, elapsed: float, rid: str) -> None:
        client = scope.get("client")
        query = scope.get("query_string", b"").decode("latin-1")
        access_log.info(
            '%s "%s %s" %d %.1fms request_id=%s',
            client[0] if client else "-",
            scope.get("method", "-"),
            masked_target(scope.get("path", ""), query),
            status,
            elapsed * 1000,
            rid,
        )


class RateLimiter:
    """A token bucket per client: `per_minute` look-ups, refilled evenly over a minute.

    Per process: with N API processes a client may reach N times the limit (documented);
    the buckets of the least recently seen clients are dropped beyond MAX_RATE_CLIENTS.
    """

    def __init__(self, per_minute: int, *, clock: Callable[[], float] = time.monotonic) -> None:
        self.capacity = float(max(per_minute, 1))
        self.rate = self.capacity / 60.0
        self.clock = clock
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()
        self._lock = threading.Lock()

    def acquire(self, key: str) -> float | None:
        """None when allowed (one token taken), else the seconds until one is available."""
        with self._lock:
            now = self.clock()
            tokens, at = self._buckets.pop(key, (self.capacity, now))
            tokens = min(self.capacity, tokens + (now - at) * self.rate)
            allowed = tokens >= 1.0
            if allowed:
                tokens -= 1.0
            self._buckets[key] = (tokens, now)
            if len(self._buckets) > MAX_RATE_CLIENTS:
                self._buckets.popitem(last=False)
            return None if allowed else (1.0 - tokens) / self.rate
