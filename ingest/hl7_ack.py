"""HL7 v2 acknowledgements: the one place where an outcome becomes AA/AE/AR or CA/CE/CR.

HL7 v2.5.1 §2.9 (original and enhanced acknowledgement modes), §2.14.1 (MSA), §2.14.5 (ERR),
tables 0008 and 0357. The ACK swaps MSH-3/4 with MSH-5/6, echoes MSH-10 in MSA-2, keeps the
sender's delimiters and echoes MSH-12 (the mapped value when empty; interface.md, Feeds).
ERR takes the form of the version the message is read as: ERR-1 (ELD) for 2.3-2.4, ERR-2/3/4/8
for 2.5 and later, both when the version is unknown. MSA-3 carries the text for old senders.
Enhanced mode gets exactly one CA/CE/CR after commit; no separate application ACK is sent and
NE/ER/SU are not honoured (a documented deviation: a sender always learns the outcome).
"""

from __future__ import annotations

import functools
import itertools
import os
import time
from datetime import UTC, datetime
from enum import StrEnum

from ingest.hl7_errors import ERROR_TEXT, ErrorLocation, Hl7Error
from ingest.hl7_segments import DEFAULT_VERSION, Delimiters, Hl7Header

ACK_MESSAGE_TYPE = "ACK"
HL7_ERROR_TABLE = "HL70357"
SEVERITY_ERROR = "E"  # HL7 table 0516
ERR1_VERSIONS = frozenset({"2.3", "2.3.1", "2.4"})
MSA_TEXT_MAX = 80  # MSA-3 is ST(80) in v2.3-2.4
_ACK_IDS = itertools.count(1)
_ACK_PREFIX = f"L{os.getpid() % 100000:05d}"


class AckCode(StrEnum):
    """HL7 table 0008."""

    AA = "AA"  # original mode: accepted
    AE = "AE"  # original mode: error (content), the sender must fix it
    AR = "AR"  # original mode: rejected (header: type, version, facility, size)
    CA = "CA"  # enhanced mode: commit accept
    CE = "CE"  # enhanced mode: commit error
    CR = "CR"  # enhanced mode: commit reject


def ack_code(error: Hl7Error | None, *, enhanced: bool) -> AckCode:
    if error is None:
        return AckCode.CA if enhanced else AckCode.AA
    if error.rejected:
        return AckCode.CR if enhanced else AckCode.AR
    return AckCode.CE if enhanced else AckCode.AE


def escape(text: str, d: Delimiters) -> str:
    """HL7 escape sequences for our own text (v2.5.1 §2.7.4)."""
    out = text.replace(d.escape, f"{d.escape}E{d.escape}")
    for char, code in (
        (d.field, "F"),
        (d.component, "S"),
        (d.subcomponent, "T"),
        (d.repetition, "R"),
    ):
        out = out.replace(char, f"{d.escape}{code}{d.escape}")
    return out.replace("\r", " ").replace("\n", " ")


def hl7_timestamp(now: datetime) -> str:
    return _hl7_second(int(now.timestamp()))


@functools.lru_cache(maxsize=4)
def _hl7_second(second: int) -> str:
    """A second's HL7 timestamp (UTC): an ACK's MSH-7, formatted once a second."""
    return datetime.fromtimestamp(second, UTC).strftime("%Y%m%d%H%M%S+0000")


def next_ack_control_id() -> str:
    """Unique within this process and across restarts (time-based), at most 20 characters."""
    return f"{_ACK_PREFIX}{int(time.time()):x}{next(_ACK_IDS):x}"[:20]


def build_ack(
    header: Hl7Header | None,
    *,
    error: Hl7Error | None = None,
    now: datetime | None = None,
) -> str:
    """The acknowledgement of one message (segments joined by CR, not framed)."""
    d = header.delimiters if header else Delimiters()
    enhanced = header.enhanced if header else False
    code = ack_code(error, enhanced=enhanced)
    version_raw = (header.version_raw if header else "") or DEFAULT_VERSION
    trigger = (header.trigger_event if header else "") or "R01"
    f = d.field
    msh = f.join(
        [
            "MSH",
            d.encoding_characters,
            header.msh5 if header else "",
            header.msh6 if header else "",
            header.msh3 if header else "",
            header.msh4 if header else "",
            hl7_timestamp(now or datetime.now(UTC)),
            "",
            d.component.join([ACK_MESSAGE_TYPE, trigger, ACK_MESSAGE_TYPE]),
            next_ack_control_id(),
            (header.processing_id if header else "") or "P",
            version_raw,
        ]
    )
    control = header.msh10 if header else ""
    text = escape(error.text, d)[:MSA_TEXT_MAX] if error else ""
    segments = [msh, f.join(["MSA", code.value, control, text]).rstrip(f)]
    if error is not None:
        read_as = header.version if header else None
        segments.append(err_segment(error, d, read_as))
    return "\r".join(segments)


def err_segment(error: Hl7Error, d: Delimiters, version: str | None) -> str:
    """ERR in the form of the version: ERR-1 (2.3-2.4), ERR-2/3/4/8 (2.5+), or both."""
    f, c, s = d.field, d.component, d.subcomponent
    name = escape(ERROR_TEXT[error.code], d)
    where = error.location or ErrorLocation("MSH")
    message = escape(error.text, d)
    eld = c.join(
        [
            where.segment,
            str(where.sequence),
            _num(where.field),
            s.join([str(int(error.code)), name, HL7_ERROR_TABLE]),
        ]
    ).rstrip(c)
    if version in ERR1_VERSIONS:
        return f.join(["ERR", eld])
    erl = c.join(
        [where.segment, str(where.sequence), _num(where.field), _num(where.repetition)]
    ).rstrip(c)
    cwe = c.join([str(int(error.code)), name, HL7_ERROR_TABLE])
    err1 = eld if version is None else ""
    return f.join(["ERR", err1, erl, cwe, SEVERITY_ERROR, "", "", "", message])


def _num(value: int | None) -> str:
    return "" if value is None else str(value)
