"""The HL7 feed's error tree: table 0357 codes, where an error is, and whether it is AE or AR.

Every reader raises these; `ingest/hl7_ack.py` turns them into the ERR segment and the
acknowledgement code in one place (HL7 v2.5.1 §2.9, §2.15.5).
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import IntEnum


class ErrorCode(IntEnum):
    """HL7 table 0357 (message error condition codes)."""

    SEGMENT_SEQUENCE_ERROR = 100
    REQUIRED_FIELD_MISSING = 101
    DATA_TYPE_ERROR = 102
    TABLE_VALUE_NOT_FOUND = 103
    UNSUPPORTED_MESSAGE_TYPE = 200
    UNSUPPORTED_EVENT_CODE = 201
    UNSUPPORTED_PROCESSING_ID = 202
    UNSUPPORTED_VERSION_ID = 203
    UNKNOWN_KEY_IDENTIFIER = 204
    DUPLICATE_KEY_IDENTIFIER = 205
    APPLICATION_RECORD_LOCKED = 206
    APPLICATION_INTERNAL_ERROR = 207


ERROR_TEXT = {
    ErrorCode.SEGMENT_SEQUENCE_ERROR: "Segment sequence error",
    ErrorCode.REQUIRED_FIELD_MISSING: "Required field missing",
    ErrorCode.DATA_TYPE_ERROR: "Data type error",
    ErrorCode.TABLE_VALUE_NOT_FOUND: "Table value not found",
    ErrorCode.UNSUPPORTED_MESSAGE_TYPE: "Unsupported message type",
    ErrorCode.UNSUPPORTED_EVENT_CODE: "Unsupported event code",
    ErrorCode.UNSUPPORTED_PROCESSING_ID: "Unsupported processing id",
    ErrorCode.UNSUPPORTED_VERSION_ID: "Unsupported version id",
    ErrorCode.UNKNOWN_KEY_IDENTIFIER: "Unknown key identifier",
    ErrorCode.DUPLICATE_KEY_IDENTIFIER: "Duplicate key identifier",
    ErrorCode.APPLICATION_RECORD_LOCKED: "Application record locked",
    ErrorCode.APPLICATION_INTERNAL_ERROR: "Application internal error",
}


@dataclass(frozen=True, slots=True)
class ErrorLocation:
    """Where an error is (ERR-1 ELD / ERR-2 ERL): segment, occurrence, field, repetition."""

    segment: str
    sequence: int = 1
    field: int | None = None
    repetition: int | None = None


class Hl7Error(Exception):
    """A message we do not accept; `code` (table 0357) and `location` go into the ERR."""

    rejected = False  # AR (refused at the header) rather than AE (content error)

    def __init__(self, code: ErrorCode, text: str, location: ErrorLocation | None = None):
        super().__init__(text)
        self.code = code
        self.text = text
        self.location = location


class MessageRejectedError(Hl7Error):
    """Refused at the header: type, event, processing id, version, facility, size (AR)."""

    rejected = True


class MessageContentError(Hl7Error):
    """A content error the sender must fix (AE)."""
