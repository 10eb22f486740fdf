"""hl7apy where its structure knowledge counts, off the hot path (reference/feeds.md §3.1).

Three roles: (1) the reference reader of the differential test: hl7apy splits the message
and the same interpretation (ingest.hl7_oru.read_oru) turns its fields into a notice, so any
disagreement is our splitter's; (2) the validator that locates an error for an AE 207's ERR
when our reader failed unexpectedly; (3) the reader behind journal inspection
(`describe_message`). Always TOLERANT with find_groups=False (Z segments survive) after
newline normalisation (an LF-separated message otherwise parses to MSH alone), with MSH-12
mapped to a version hl7apy knows.
"""

from __future__ import annotations

import logging
import re
from datetime import datetime
from typing import Any

from ingest.hl7_errors import ErrorLocation
from ingest.hl7_oru import read_oru
from ingest.hl7_segments import (
    Delimiters,
    Hl7Message,
    header_from_fields,
    map_version,
    normalise_newlines,
)
from locator.core.notice import StudyNotice
from locator.trusts import TrustConfig

log = logging.getLogger(__name__)

_FIELD_NAME = re.compile(r"^[A-Z0-9]{3}_(\d+)$")


def _prepare(text: str) -> tuple[str, Delimiters]:
    """Newlines -> CR, MSH-12 -> a version hl7apy reads (empty -> 2.5, 2.6+ -> 2.5.1)."""
    text = normalise_newlines(text).strip("\r")
    sep = text[3] if len(text) > 3 else "|"
    fields = text.split("\r", 1)[0].split(sep)
    given = fields[1] if len(fields) > 1 else ""
    enc = [given[i] if i < len(given) else default for i, default in enumerate("^~\\&")]
    d = Delimiters(sep, enc[0], enc[1], enc[2], enc[3])
    if len(fields) > 11:
        version = map_version(fields[11].split(d.component, 1)[0]) or fields[11]
        fields[11] = version
        rest = text.split("\r", 1)
        text = sep.join(fields) + ("\r" + rest[1] if len(rest) > 1 else "")
    return text, d


def parse_with_hl7apy(text: str) -> Any:
    from hl7apy.consts import VALIDATION_LEVEL
    from hl7apy.parser import parse_message

    prepared, _ = _prepare(text)
    return parse_message(prepared, validation_level=VALIDATION_LEVEL.TOLERANT, find_groups=False)


def message_from_hl7apy(text: str) -> Hl7Message:
    """The message as hl7apy splits it, in the shape ingest.hl7_oru reads."""
    parsed = parse_with_hl7apy(text)
    _, d = _prepare(text)
    segments: list[list[str]] = []
    for segment in parsed.children:
        fields: dict[int, list[str]] = {}
        for child in segment.children:
            match = _FIELD_NAME.match(child.name)
            if match:
                fields.setdefault(int(match.group(1)), []).append(child.to_er7())
        size = max(fields, default=0) + 1
        row = [segment.name] + [""] * (size - 1)
        for n, reps in fields.items():
            row[n] = d.repetition.join(reps)
        if segment.name == "MSH":
            row[1], row[2] = d.field, d.encoding_characters
            # hl7apy keeps MSH-12 as mapped by _prepare; the header reads the original.
            original = normalise_newlines(text).strip("\r").split("\r", 1)[0].split(d.field)
            if len(original) > 11 and len(row) > 12:
                row[12] = original[11]
        segments.append(row)
    header = header_from_fields(segments[0], d)
    return Hl7Message(header, tuple(segments), text)


def read_oru_with_hl7apy(
    text: str, *, trust: TrustConfig, accept_test_numbers: bool, received_at: datetime
) -> tuple[StudyNotice, ...]:
    """The reference reader of the differential test."""
    return read_oru(
        message_from_hl7apy(text),
        trust=trust,
        accept_test_numbers=accept_test_numbers,
        received_at=received_at,
    )


def locate_error(text: str) -> ErrorLocation | None:
    """Where hl7apy finds the message broken (the segment it fails on), if anywhere."""
    try:
        parsed = parse_with_hl7apy(text)
    except Exception as exc:  # hl7apy's error tree is wide; any failure names no place
        log.debug("hl7apy could not parse the message: %s", type(exc).__name__)
        return ErrorLocation("MSH")
    seen: dict[str, int] = {}
    for segment in parsed.children:
        seen[segment.name] = seen.get(segment.name, 0) + 1
        try:
            segment.to_er7()
        except Exception:
            return ErrorLocation(segment.name, seen[segment.name])
    return None


def describe_message(text: str) -> list[tuple[str, str]]:
    """A journal copy as (field, value) lines for an operator, read by hl7apy: segment by
    segment, non-empty fields only, with hl7apy's long field names where it knows them."""
    try:
        parsed = parse_with_hl7apy(text)
    except Exception as exc:
        return [("error", f"hl7apy cannot read the message ({type(exc).__name__})")]
    lines: list[tuple[str, str]] = []
    for segment in parsed.children:
        for child in segment.children:
            label = child.name
            long_name = getattr(child, "long_name", None)
            if long_name:
                label = f"{child.name} {long_name.lower().replace('_', ' ')}"
            value = child.to_er7()
            if value:
                lines.append((label, value))
    return lines
