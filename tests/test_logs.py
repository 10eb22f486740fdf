"""NHS Numbers never reach a log line in clear, tracebacks included."""

from __future__ import annotations

import io
import logging

from locator.logs import MaskingFormatter, MaskNhsNumbers


def _capture() -> tuple[logging.Logger, io.StringIO]:
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(MaskingFormatter("%(levelname)s %(message)s"))
    handler.addFilter(MaskNhsNumbers())
    logger = logging.getLogger("test.logs.masking")
    logger.handlers[:] = [handler]
    logger.propagate = False
    logger.setLevel(logging.DEBUG)
    return logger, stream


def test_messages_arguments_and_tracebacks_are_masked() -> None:
    logger, stream = _capture()
    logger.info("looked up %s", "9434765919")
    try:
        raise RuntimeError("INSERT failed with parameters ('943 476 5919', 'x')")
    except RuntimeError:
        logger.exception("database error for 9990000018")
    text = stream.getvalue()
    assert "9434765919" not in text and "943 476 5919" not in text and "9990000018" not in text
    assert text.count("******5919") >= 2 and "******0018" in text
    assert "RuntimeError" in text  # the traceback itself is kept
