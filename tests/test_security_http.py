"""HTTP privacy: the access log masks NHS Numbers in every form a URL can carry them,
request ids reach log lines, and a 500 carries no internals."""

from __future__ import annotations

import logging
import urllib.parse
from pathlib import Path

import httpx
import pytest
from fastapi import FastAPI

from locator.api.middleware import RateLimiter, RequestContextMiddleware, masked_target
from locator.core.nhs_number import redact_text
from locator.logs import MaskNhsNumbers
from locator.store import migrate
from locator.store.db import create_db_engine
from tests.security_helpers import build_app, serve_app

NHS = "9990000018"


@pytest.mark.parametrize(
    ("path", "query"),
    [
        ("/fhir/ImagingStudy", f"patient.identifier=https://fhir.nhs.uk/Id/nhs-number|{NHS}"),
        (
            "/fhir/ImagingStudy",
            f"patient.identifier=https%3A%2F%2Ffhir.nhs.uk%2FId%2Fnhs-number%7C{NHS}",
        ),
        ("/fhir/ImagingStudy", "patient.identifier=999%20000%200018"),
        ("/fhir/ImagingStudy", "patient.identifier=999+000+0018"),
        ("/fhir/ImagingStudy", "subject:identifier=999-000-0018&_count=5"),
        ("/fhir/Patient/9990000018", ""),
        ("/fhir/Patient/999%200000018", ""),
    ],
)
def test_access_log_target_is_masked(path: str, query: str) -> None:
    line = masked_target(path, query)
    decoded = urllib.parse.unquote_plus(line)
    assert redact_text(decoded) == decoded, line  # nothing left that reads as an NHS Number
    assert "******0018" in decoded  # the masked form keeps the last four digits


def _run_app(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> list[str]:
    url = f"sqlite:///{tmp_path / 'locator.db'}"
    engine = create_db_engine(url)
    migrate.upgrade(engine)
    engine.dispose()
    app, _ = build_app(url)
    with caplog.at_level(logging.INFO), serve_app(app) as base:
        httpx.get(
            f"{base}/fhir/ImagingStudy",
            params={"patient.identifier": f"https://fhir.nhs.uk/Id/nhs-number|{NHS}"},
            headers={"X-Request-ID": "trace-me-1"},
        )
        httpx.get(f"{base}/fhir/ImagingStudy?patient.identifier=999+000+0018")
        httpx.post(f"{base}/fhir/ImagingStudy/_search", data={"patient.identifier": NHS})
    return [caplog.handler.format(r) for r in caplog.records if not r.name.startswith("httpx")]


def test_access_log_lines_carry_request_ids_and_no_nhs_number(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    lines = _run_app(tmp_path, caplog)
    access = [line for line in lines if "/fhir/ImagingStudy" in line]
    assert len(access) == 3, lines
    assert any("request_id=trace-me-1" in line for line in access)
    masker = MaskNhsNumbers()
    for line in lines:
        record = logging.LogRecord("t", logging.INFO, __file__, 0, line, None, None)
        masker.filter(record)
        assert record.getMessage() == line, f"unmasked NHS Number in: {line}"
        assert NHS not in line and "999 000 0018" not in line and "999+000+0018" not in line


def test_unhandled_errors_answer_500_without_internals(caplog: pytest.LogCaptureFixture) -> None:
    inner = FastAPI()

    @inner.get("/boom")
    def boom() -> None:
        raise RuntimeError(f"secret internals for patient {NHS} at /srv/locator/db.py")

    inner.add_middleware(RequestContextMiddleware)
    with caplog.at_level(logging.ERROR), serve_app(inner) as base:
        answer = httpx.get(base + "/boom", headers={"X-Request-ID": "boom-1"})
    assert answer.status_code == 500
    body = answer.json()
    assert body["resourceType"] == "OperationOutcome"
    assert "boom-1" in body["issue"][0]["diagnostics"]
    assert "secret" not in answer.text and NHS not in answer.text and "srv" not in answer.text
    logged = "\n".join(r.getMessage() for r in caplog.records)
    assert "RuntimeError" in logged and NHS not in logged


def test_rate_limiter_refills_over_a_minute() -> None:
    now = [0.0]
    limiter = RateLimiter(60, clock=lambda: now[0])
    assert all(limiter.acquire("a") is None for _ in range(60))
    wait = limiter.acquire("a")
    assert wait is not None and 0 < wait <= 1.0
    assert limiter.acquire("b") is None  # per client
    now[0] = 1.0
    assert limiter.acquire("a") is None
    assert limiter.acquire("a") is not None


def test_tracebacks_are_masked_by_the_installed_filter() -> None:
    import io

    from locator.api.middleware import RequestIdLogFilter

    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.addFilter(RequestIdLogFilter())
    logger = logging.getLogger("test.tracebacks")
    logger.addHandler(handler)
    try:
        raise ValueError(f"INSERT failed, parameters ('{NHS}', '999 000 0026')")
    except ValueError:
        logger.exception("write failed")
    finally:
        logger.removeHandler(handler)
    text = stream.getvalue()
    assert "ValueError" in text and "******0018" in text
    assert redact_text(text) == text
