"""HL7 v2 segment reading: bytes to segments and fields, delimiters, escapes, the MSH header.

Plain string splitting on the message's own delimiters (HL7 v2.5.1 §2.5.4, §2.7), not a full
parser: hl7apy costs about 25 ms per 15-segment ORU, this about 30 µs
(reference/stack-limits.md §1); hl7apy reads the same messages in the differential test
(ingest/hl7_validate.py). MSH-18 decides the character set, else UTF-8 with a Latin-1
fallback; LF and CRLF separators are read as CR; `""` is HL7's explicit null ("no value").
Header fields: MSH-3/4 sender and facility, MSH-9 type (2 or 3 components), MSH-10 control
id, MSH-11 processing id, MSH-12 version (mapped), MSH-15/16 acknowledgement mode, MSH-18
charset. `check_header` applies interface.md's header refusals (AR).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from ingest.hl7_errors import ErrorCode, ErrorLocation, MessageContentError, MessageRejectedError

HL7_NULL = '""'
SEGMENT_SEPARATOR = "\r"
DEFAULT_VERSION = "2.5"
SUPPORTED_VERSIONS = frozenset({"2.3", "2.3.1", "2.4", "2.5", "2.5.1"})
# interface.md: 2.6-2.8.x are read as 2.5.1 (their ORU^R01 fields we use are unchanged).
LATER_VERSIONS = frozenset({"2.6", "2.7", "2.7.1", "2.8", "2.8.1", "2.8.2"})
READ_AS_LATER = "2.5.1"
MESSAGE_TYPE_ORU = "ORU"
TRIGGER_R01 = "R01"
PROCESSING_PRODUCTION = "P"

# HL7 table 0211 character sets -> Python codecs (others are tried as codec names).
CHARSETS = {
    "ASCII": "ascii",
    "8859/1": "latin-1",
    "8859/2": "iso8859-2",
    "8859/15": "iso8859-15",
    "ISO IR6": "ascii",
    "ISO IR100": "latin-1",
    "ISO IR192": "utf-8",
    "UNICODE UTF-8": "utf-8",
    "UNICODE": "utf-8",
    "CP1252": "cp1252",
    "WINDOWS-1252": "cp1252",
}


@dataclass(frozen=True, slots=True)
class Delimiters:
    field: str = "|"
    component: str = "^"
    repetition: str = "~"
    escape: str = "\\"
    subcomponent: str = "&"

    @property
    def encoding_characters(self) -> str:
        return self.component + self.repetition + self.escape + self.subcomponent


@dataclass(frozen=True, slots=True)
class Hl7Header:
    """The MSH fields the listener, the journal and the ACK need (raw strings)."""

    delimiters: Delimiters
    sending_application: str  # MSH-3.1, unescaped
    sending_facility: str  # MSH-4.1, unescaped
    control_id: str  # MSH-10
    msh3: str = ""  # raw fields, echoed as received in the ACK
    msh4: str = ""
    msh5: str = ""
    msh6: str = ""
    msh10: str = ""
    message_type: str = ""  # MSH-9.1
    trigger_event: str = ""  # MSH-9.2
    processing_id: str = ""  # MSH-11.1
    version_raw: str = ""  # MSH-12 as received
    accept_ack_type: str = ""  # MSH-15
    application_ack_type: str = ""  # MSH-16
    charset: str = ""  # MSH-18 (first repetition)

    @property
    def enhanced(self) -> bool:
        """Enhanced acknowledgement mode: MSH-15 or MSH-16 valued (HL7 v2.5.1 §2.9.3)."""
        return bool(self.accept_ack_type or self.application_ack_type)

    @property
    def version(self) -> str | None:
        """The version we read the message as, or None when unsupported (interface.md)."""
        return map_version(self.version_raw.split(self.delimiters.component, 1)[0])


@dataclass(frozen=True, slots=True)
class Hl7Message:
    """A message split into segments; `segments[i][n]` is field n of segment i (HL7
    numbering: for MSH, [1] is the field separator and [2] the encoding characters)."""

    header: Hl7Header
    segments: tuple[list[str], ...]
    text: str = field(repr=False, default="")


def map_version(version: str) -> str | None:
    """MSH-12.1 -> the version we read: empty -> 2.5, 2.6-2.8.x -> 2.5.1, else None."""
    version = version.strip()
    if not version:
        return DEFAULT_VERSION
    if version in SUPPORTED_VERSIONS:
        return version
    if version in LATER_VERSIONS:
        return READ_AS_LATER
    return None


# --------------------------------------------------------------------------- text


def normalise_newlines(text: str) -> str:
    """LF and CRLF segment separators -> CR (reference/feeds.md §7.2)."""
    if "\n" in text:
        text = text.replace("\r\n", "\r").replace("\n", "\r")
    return text


def declared_charset(raw: bytes) -> str:
    """MSH-18 read from the raw bytes (MSH is ASCII in every charset we accept)."""
    end = raw.find(b"\r")
    first = raw[: end if end >= 0 else len(raw)].split(b"\n", 1)[0].decode("latin-1")
    if not first.startswith("MSH") or len(first) < 4:
        return ""
    fields = first.split(first[3])
    if len(fields) < 18:
        return ""
    comp, rep = (fields[1] + "^~")[0], (fields[1] + "^~")[1]
    return fields[17].split(rep, 1)[0].split(comp, 1)[0].strip()


def decode_message(raw: bytes) -> str:
    """MSH-18 where given, else UTF-8, with Latin-1 as the last resort (never fails)."""
    codec = CHARSETS.get(declared_charset(raw).upper())
    for name in (codec, "utf-8"):
        if name is None:
            continue
        try:
            return raw.decode(name)
        except (UnicodeDecodeError, LookupError):
            continue
    return raw.decode("latin-1")


def unescape(value: str, delims: Delimiters) -> str:
    """HL7 escape sequences (v2.5.1 §2.7.4) for the delimiters and hex; formatting
    commands (\\.br\\ and friends) are kept as they are."""
    esc = delims.escape
    if not esc or esc not in value:
        return value
    out: list[str] = []
    parts = value.split(esc)
    out.append(parts[0])
    i = 1
    while i < len(parts):
        if i + 1 >= len(parts):  # a lone escape character: keep it
            out.append(esc + parts[i])
            break
        out.append(_escape_value(parts[i], delims))
        out.append(parts[i + 1])
        i += 2
    return "".join(out)


def _escape_value(seq: str, d: Delimiters) -> str:
    simple = {"F": d.field, "S": d.component, "T": d.subcomponent, "R": d.repetition, "E": d.escape}
    if seq in simple:
        return simple[seq]
    if seq[:1] == "X" and len(seq) % 2 == 1:
        try:
            return bytes.fromhex(seq[1:]).decode("latin-1")
        except ValueError:
            pass
    return d.escape + seq + d.escape


# --------------------------------------------------------------------------- header


def split_segments(text: str) -> list[str]:
    return [s for s in normalise_newlines(text).split(SEGMENT_SEPARATOR) if s.strip()]


def msh_fields(segment: str) -> list[str]:
    if not segment.startswith("MSH") or len(segment) < 8:
        raise MessageContentError(
            ErrorCode.REQUIRED_FIELD_MISSING,
            "the message does not start with an MSH segment",
            ErrorLocation("MSH"),
        )
    sep = segment[3]
    if sep.isalnum() or sep in " \r\n":
        raise MessageContentError(
            ErrorCode.DATA_TYPE_ERROR, "MSH-1 is not a field separator", ErrorLocation("MSH", 1, 1)
        )
    parts = segment.split(sep)
    return ["MSH", sep, *parts[1:]]


def delimiters_of(fields: list[str]) -> Delimiters:
    enc = fields[2]
    chars = [enc[i] if i < len(enc) else default for i, default in enumerate("^~\\&")]
    if len(set([fields[1], *chars])) != 5 or any(c.isalnum() for c in chars):
        raise MessageContentError(
            ErrorCode.DATA_TYPE_ERROR,
            "MSH-2 encoding characters are not usable",
            ErrorLocation("MSH", 1, 2),
        )
    return Delimiters(fields[1], chars[0], chars[1], chars[2], chars[3])


def field_at(fields: Sequence[str], n: int) -> str:
    return fields[n] if n < len(fields) else ""


def first_value(value: str, d: Delimiters) -> str:
    """First component of the first repetition, unescaped; `""` -> empty."""
    value = value.split(d.repetition, 1)[0].split(d.component, 1)[0]
    value = value.split(d.subcomponent, 1)[0]
    return "" if value == HL7_NULL else unescape(value, d).strip()


def header_from_fields(fields: Sequence[str], d: Delimiters) -> Hl7Header:
    msh9 = field_at(fields, 9).split(d.component)
    return Hl7Header(
        delimiters=d,
        sending_application=first_value(field_at(fields, 3), d),
        sending_facility=first_value(field_at(fields, 4), d),
        control_id=unescape(field_at(fields, 10), d).strip(),
        msh3=field_at(fields, 3),
        msh4=field_at(fields, 4),
        msh5=field_at(fields, 5),
        msh6=field_at(fields, 6),
        msh10=field_at(fields, 10),
        message_type=msh9[0].strip(),
        trigger_event=(msh9[1] if len(msh9) > 1 else "").strip(),
        processing_id=first_value(field_at(fields, 11), d),
        version_raw=field_at(fields, 12),
        accept_ack_type=first_value(field_at(fields, 15), d),
        application_ack_type=first_value(field_at(fields, 16), d),
        charset=first_value(field_at(fields, 18), d),
    )


def parse_message(data: bytes | str) -> Hl7Message:
    """Split a message into segments and read its MSH. Raises MessageContentError when
    there is no usable MSH."""
    text = decode_message(data) if isinstance(data, bytes) else data
    lines = split_segments(text)
    if not lines:
        raise MessageContentError(
            ErrorCode.REQUIRED_FIELD_MISSING, "empty message", ErrorLocation("MSH")
        )
    msh = msh_fields(lines[0])
    d = delimiters_of(msh)
    segments = tuple([msh] + [line.split(d.field) for line in lines[1:]])
    return Hl7Message(header_from_fields(msh, d), segments, text)


def check_header(header: Hl7Header) -> None:
    """Header-level refusals (AR), in the order of interface.md: type, event, processing
    id, version. Facility binding is the listener's (it knows the connection)."""
    if header.message_type != MESSAGE_TYPE_ORU:
        raise MessageRejectedError(
            ErrorCode.UNSUPPORTED_MESSAGE_TYPE,
            f"message type {header.message_type or '(empty)'} is not accepted (ORU^R01 only)",
            ErrorLocation("MSH", 1, 9),
        )
    if header.trigger_event != TRIGGER_R01:
        raise MessageRejectedError(
            ErrorCode.UNSUPPORTED_EVENT_CODE,
            f"event {header.trigger_event or '(empty)'} is not accepted (ORU^R01 only)",
            ErrorLocation("MSH", 1, 9),
        )
    if header.processing_id != PROCESSING_PRODUCTION:
        raise MessageRejectedError(
            ErrorCode.UNSUPPORTED_PROCESSING_ID,
            f"processing id {header.processing_id or '(empty)'} is not accepted (P only)",
            ErrorLocation("MSH", 1, 11),
        )
    if header.version is None:
        raise MessageRejectedError(
            ErrorCode.UNSUPPORTED_VERSION_ID,
            "version is outside 2.3 to 2.8.x",
            ErrorLocation("MSH", 1, 12),
        )
    if not header.control_id:
        raise MessageContentError(
            ErrorCode.REQUIRED_FIELD_MISSING,
            "MSH-10 control id missing",
            ErrorLocation("MSH", 1, 10),
        )
