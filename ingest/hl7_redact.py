"""What the journal keeps of an HL7 message: identifiers, codes and times; no report text.

interface.md, Feeds: Journal; design.md's privacy rule. The raw bytes are hashed as received
(the journal's SHA-256); this copy replaces report text by a digest (so a replay hashes the
report as the original did) and drops demographics beyond identifiers (names, birth date,
address, phones).
"""

from __future__ import annotations

import functools
import hashlib
from collections.abc import Sequence

from ingest.hl7_errors import MessageContentError
from ingest.hl7_fields import is_study_uid_obx
from ingest.hl7_segments import (
    SEGMENT_SEPARATOR,
    Delimiters,
    Hl7Message,
    delimiters_of,
    field_at,
    msh_fields,
    split_segments,
    unescape,
)

# The journal's copy keeps report text only as this digest (see strip_for_journal).
REDACTED_PREFIX = "redacted-sha256-"


@functools.lru_cache(maxsize=32)
def content_digest(text: str) -> str:
    """The stand-in the journal keeps for a removed value; a stand-in maps to itself.
    (Cached for a message's few values: report_hash and strip_for_journal both ask.)"""
    if text.startswith(REDACTED_PREFIX):
        return text
    digest = hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()[:32]
    return REDACTED_PREFIX + digest


# What the journal may keep of a message (interface.md, Feeds: Journal): identifiers, codes,
# times and statuses. PID keeps its identifier fields only (set id, PID-2/3/4 ids, PID-18
# account, PID-32 identity reliability); names, birth date, address, phones and the rest go.
# Report text goes: every OBX-5 except a Study UID, NTE-3, OBR-13 (clinical information) and
# OBR-31 (reason for study) are replaced by their digest, so a replay hashes as the original.
PID_KEPT_FIELDS = frozenset({1, 2, 3, 4, 18, 32})
DROPPED_SEGMENTS = frozenset(
    {
        "NK1",
        "PD1",
        "GT1",
        "IN1",
        "IN2",
        "IN3",
        "AL1",
        "DG1",
        "DRG",
        "PR1",
        "ROL",
        "ACC",
        "UB1",
        "UB2",
    }
)
KEPT_Z_SEGMENTS = frozenset({"ZDS"})
DIGESTED_FIELDS = {"OBR": (13, 31), "NTE": (3,)}


def strip_for_journal(text: str, message: Hl7Message | None = None) -> str:
    """The message as the journal keeps it: no report text, no demographics. `message`:
    `text` as parse_message read it (its segments are used, not split again)."""
    if message is not None:
        return _strip_segments(message.segments, message.header.delimiters)
    lines = split_segments(text)
    try:
        msh = msh_fields(lines[0]) if lines else []
        d = delimiters_of(msh) if msh else None
    except MessageContentError:
        d = None
    if d is None:
        return f"[not an HL7 message: {len(text)} characters, content not kept]"
    return _strip_segments([msh] + [line.split(d.field) for line in lines[1:]], d)


def _strip_segments(segments: Sequence[list[str]], d: Delimiters) -> str:
    """MSH as it came (`["MSH", separator, MSH-2, ...]`), then each segment stripped."""
    kept = [d.field.join(["MSH", *segments[0][2:]])]
    for fields in segments[1:]:
        name = fields[0].strip().upper()
        if name in DROPPED_SEGMENTS or (name.startswith("Z") and name not in KEPT_Z_SEGMENTS):
            continue
        kept.append(d.field.join(_strip_fields(name, fields, d)))
    return SEGMENT_SEPARATOR.join(kept)


def _strip_fields(name: str, fields: list[str], d: Delimiters) -> list[str]:
    if name == "PID":
        return [v if i == 0 or i in PID_KEPT_FIELDS else "" for i, v in enumerate(fields)]
    digested: tuple[int, ...] = DIGESTED_FIELDS.get(name, ())
    if name == "OBX" and not is_study_uid_obx(field_at(fields, 3), d):
        digested = (5,)
    out = list(fields)
    for n in digested:
        if n < len(out) and out[n]:
            out[n] = content_digest(unescape(out[n], d))
    return out
