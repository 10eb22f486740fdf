"""Logging set-up: every record passes through a filter that masks NHS Numbers."""

from __future__ import annotations

import logging
import sys

from locator.core.nhs_number import redact_text


class MaskNhsNumbers(logging.Filter):
    """Masks anything that looks like a valid NHS Number in the final log message."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        masked = redact_text(message)
        if masked != message:
            record.msg, record.args = masked, None
        return True


class MaskingFormatter(logging.Formatter):
    """Masks NHS Numbers in the whole formatted record: message, traceback and stack. An
    exception's text can quote data (a database error quotes its parameters)."""

    def format(self, record: logging.LogRecord) -> str:
        return redact_text(super().format(record))


def configure_logging(level: str = "INFO") -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(MaskingFormatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    handler.addFilter(MaskNhsNumbers())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access"):
        logger = logging.getLogger(name)
        logger.handlers[:] = []
        logger.propagate = True
    logging.getLogger("pynetdicom").setLevel(logging.WARNING)
    # httpx logs every request's URL at INFO: a subscription's endpoint is the subscriber's
    # business (its query may carry a token), and one line per delivery is noise.
    logging.getLogger("httpx").setLevel(logging.WARNING)
