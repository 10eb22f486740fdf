"""ORU^R01 -> StudyNotice: a lean, pure reader of the few fields the index needs.

Bytes (or text) in, frozen values or a typed `Hl7Error` out; no I/O. Plain string splitting
on the message's own delimiters (HL7 v2.5.1 §2.5.4, §2.7), not a full parser: hl7apy costs
about 25 ms per 15-segment ORU, this about 30 µs (reference/stack-limits.md §1). hl7apy reads
the same messages in the differential test (ingest/hl7_validate.py).

Field map (reference/feeds.md §1; interface.md, Feeds and Identity rules):
- MSH-3/4 sender and facility, MSH-9 type (2 or 3 components), MSH-10 control id, MSH-11
  processing id, MSH-12 version (mapped), MSH-15/16 acknowledgement mode, MSH-18 charset.
- PID-3 (then PID-2, older feeds) CX repetitions: an NHS Number only when typed (CX.5 `NH`
  with or without a trace-status suffix, or `NHS` in CX.4 or CX.6), always checked; MR/PI or
  untyped ids are the trust's local ids (CX.4 namespace).
- Per OBR: accession (trust.accession_field: OBR-18 then OBR-3, or OBR-3 only), Study UID
  (ZDS-1, IPC-3, OBX 113014^DICOM Study^DCM or OBX-3 "Study Instance UID"), modality OBR-24
  (MODALITY_MAP), procedure OBR-4, started OBR-7, report time OBR-22, status OBR-25.
- OBX-11 `W` (table 0085: "post original as wrong") withdraws the message's patient link.
- `""` is HL7's explicit null: read as "no value", never as the two-character string.
"""

from __future__ import annotations

import functools
import hashlib
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta, timezone
from enum import IntEnum
from zoneinfo import ZoneInfo

from locator.core.nhs_number import InvalidNhsNumberError, NhsNumber, mask, parse_nhs_number
from locator.core.notice import (
    Coding,
    FeedKind,
    PatientRef,
    ReportStatus,
    StudyNotice,
    StudyRef,
    StudyStatus,
)
from locator.trusts import TrustConfig

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
OBX_WRONG_PATIENT = "W"  # HL7 table 0085
NHS_TYPE_PREFIX = "NH"  # HL7 table 0203, plus PKB-style trace-status suffixes (NH01)
NHS_AUTHORITY = "NHS"
LOCAL_ID_TYPES = ("MR", "PI", "")  # in order of preference; "" = untyped
DICOM_STUDY_CODE = "113014"  # DCM "DICOM Study" (RAD-128 style OBX)
DICOM_CODING_SCHEME = "DCM"
STUDY_UID_NAME = "study instance uid"
MAX_KEY_LENGTH = 64  # study.study_uid / study.accession columns; DICOM UI is 64 too
_UID = re.compile(r"^[0-9]+(\.[0-9]+)*$")
# The journal's copy keeps report text only as this digest (see strip_for_journal).
REDACTED_PREFIX = "redacted-sha256-"

NICIP_SYSTEM = "https://nicip.nhs.uk"
CODING_SYSTEMS = {
    "NICIP": NICIP_SYSTEM,
    "LN": "http://loinc.org",
    "SCT": "http://snomed.info/sct",
    "SNOMEDCT": "http://snomed.info/sct",
    "DCM": "http://dicom.nema.org/resources/ontology/DCM",
}

# HL7 table 0074 (Diagnostic Serv Sect ID) -> DICOM modality (PS3.3 C.7.3.1.1.1). DICOM
# defined terms pass through unchanged (checked first, so PT is PET and OT is "other",
# not table 0074's physical / occupational therapy). RAD (radiology, unspecified) names no
# modality; table 0074 codes outside imaging (LAB, HM, ...) are ignored.
MODALITY_MAP = {
    "RX": "DX",  # Radiograph: digital radiography, today's default for plain film
    "RUS": "US",  # Radiology ultrasound
    "CUS": "US",  # Cardiac ultrasound
    "OUS": "US",  # OB ultrasound
    "VUS": "US",  # Vascular ultrasound
    "NMR": "MR",  # Nuclear magnetic resonance
    "NMS": "NM",  # Nuclear medicine scan
    "CTH": "XA",  # Cardiac catheterization (angiography)
    "XRC": "RF",  # Cineradiograph (fluoroscopy)
    "EC": "ECG",  # Electrocardiac
}
DICOM_MODALITIES = frozenset(
    {
        "AR",
        "ASMT",
        "AU",
        "BDUS",
        "BI",
        "BMD",
        "CR",
        "CT",
        "CTPROTOCOL",
        "DG",
        "DOC",
        "DX",
        "ECG",
        "EEG",
        "EMG",
        "EOG",
        "EPS",
        "ES",
        "FID",
        "GM",
        "HC",
        "HD",
        "IO",
        "IOL",
        "IVOCT",
        "IVUS",
        "KER",
        "KO",
        "LEN",
        "LS",
        "MG",
        "MR",
        "M3D",
        "NM",
        "OAM",
        "OCT",
        "OP",
        "OPM",
        "OPT",
        "OPTBSV",
        "OPTENF",
        "OPV",
        "OSS",
        "OT",
        "PA",
        "PLAN",
        "POS",
        "PR",
        "PT",
        "PX",
        "REG",
        "RESP",
        "RF",
        "RG",
        "RTDOSE",
        "RTIMAGE",
        "RTINTENT",
        "RTPLAN",
        "RTRAD",
        "RTRECORD",
        "RTSEGANN",
        "RTSTRUCT",
        "RWV",
        "SEG",
        "SM",
        "SMR",
        "SR",
        "SRF",
        "STAIN",
        "TEXTUREMAP",
        "TG",
        "US",
        "VA",
        "XA",
        "XAPROTOCOL",
        "XC",
    }
)

# OBR-25 (HL7 table 0123) -> (study status, report status), as design.md orders them.
# M (corrected, not final) and N (completed, results pending) come from v2.7+ senders
# read as 2.5.1. Y and Z are query answers: a content error (AE).
RESULT_STATUS: dict[str, tuple[StudyStatus, ReportStatus | None]] = {
    "O": (StudyStatus.REGISTERED, None),
    "I": (StudyStatus.REGISTERED, None),
    "S": (StudyStatus.REGISTERED, None),
    "A": (StudyStatus.AVAILABLE, ReportStatus.PRELIMINARY),
    "P": (StudyStatus.AVAILABLE, ReportStatus.PRELIMINARY),
    "R": (StudyStatus.AVAILABLE, ReportStatus.PRELIMINARY),
    "F": (StudyStatus.AVAILABLE, ReportStatus.FINAL),
    "C": (StudyStatus.AVAILABLE, ReportStatus.CORRECTED),
    "M": (StudyStatus.AVAILABLE, ReportStatus.CORRECTED),
    "N": (StudyStatus.AVAILABLE, None),
    "X": (StudyStatus.CANCELLED, None),
}

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


def _split_segments(text: str) -> list[str]:
    return [s for s in normalise_newlines(text).split(SEGMENT_SEPARATOR) if s.strip()]


def _msh_fields(segment: str) -> list[str]:
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


def _delimiters(fields: list[str]) -> Delimiters:
    enc = fields[2]
    chars = [enc[i] if i < len(enc) else default for i, default in enumerate("^~\\&")]
    if len(set([fields[1], *chars])) != 5 or any(c.isalnum() for c in chars):
        raise MessageContentError(
            ErrorCode.DATA_TYPE_ERROR,
            "MSH-2 encoding characters are not usable",
            ErrorLocation("MSH", 1, 2),
        )
    return Delimiters(fields[1], chars[0], chars[1], chars[2], chars[3])


def _get(fields: Sequence[str], n: int) -> str:
    return fields[n] if n < len(fields) else ""


def _first(value: str, d: Delimiters) -> str:
    """First component of the first repetition, unescaped; `""` -> empty."""
    value = value.split(d.repetition, 1)[0].split(d.component, 1)[0]
    value = value.split(d.subcomponent, 1)[0]
    return "" if value == HL7_NULL else unescape(value, d).strip()


def header_from_fields(fields: Sequence[str], d: Delimiters) -> Hl7Header:
    msh9 = _get(fields, 9).split(d.component)
    return Hl7Header(
        delimiters=d,
        sending_application=_first(_get(fields, 3), d),
        sending_facility=_first(_get(fields, 4), d),
        control_id=unescape(_get(fields, 10), d).strip(),
        msh3=_get(fields, 3),
        msh4=_get(fields, 4),
        msh5=_get(fields, 5),
        msh6=_get(fields, 6),
        msh10=_get(fields, 10),
        message_type=msh9[0].strip(),
        trigger_event=(msh9[1] if len(msh9) > 1 else "").strip(),
        processing_id=_first(_get(fields, 11), d),
        version_raw=_get(fields, 12),
        accept_ack_type=_first(_get(fields, 15), d),
        application_ack_type=_first(_get(fields, 16), d),
        charset=_first(_get(fields, 18), d),
    )


def parse_message(data: bytes | str) -> Hl7Message:
    """Split a message into segments and read its MSH. Raises MessageContentError when
    there is no usable MSH."""
    text = decode_message(data) if isinstance(data, bytes) else data
    lines = _split_segments(text)
    if not lines:
        raise MessageContentError(
            ErrorCode.REQUIRED_FIELD_MISSING, "empty message", ErrorLocation("MSH")
        )
    msh = _msh_fields(lines[0])
    d = _delimiters(msh)
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


# --------------------------------------------------------------------------- body


@dataclass(slots=True)
class _OrderGroup:
    obr: list[str]
    sequence: int
    segments: list[tuple[list[str], int]] = field(default_factory=list)


@dataclass(slots=True)
class _PatientGroup:
    pid: list[str] | None
    sequence: int
    orders: list[_OrderGroup] = field(default_factory=list)
    loose: list[tuple[list[str], int]] = field(default_factory=list)
    withdrawn: bool = False


def _group(message: Hl7Message) -> list[_PatientGroup]:
    """PID starts a patient group; OBR an order group; OBX/ZDS/IPC/NTE belong to the
    preceding OBR (or to the group's first OBR when they come before any)."""
    current = _PatientGroup(None, 0)  # segments before any PID (a swapped PID/OBR)
    groups = [current]
    seen: dict[str, int] = {}
    for seg in message.segments[1:]:
        name = seg[0].strip().upper()
        seen[name] = seq = seen.get(name, 0) + 1
        if name == "PID":
            if current.pid is None:
                current.pid, current.sequence = seg, seq
            else:
                current = _PatientGroup(seg, seq)
                groups.append(current)
        elif name == "OBR":
            current.orders.append(_OrderGroup(seg, seq))
        elif current.orders:
            current.orders[-1].segments.append((seg, seq))
        else:
            current.loose.append((seg, seq))
        if name == "OBX" and _get(seg, 11).strip().upper() == OBX_WRONG_PATIENT:
            current.withdrawn = True
    for group in groups:
        if group.orders and group.loose:
            group.orders[0].segments[:0] = group.loose
    return groups


def read_oru(
    message: Hl7Message,
    *,
    trust: TrustConfig,
    accept_test_numbers: bool,
    received_at: datetime,
) -> tuple[StudyNotice, ...]:
    """The notices of one ORU^R01 (one per patient group, each with its studies)."""
    groups = [g for g in _group(message) if g.orders]
    if not groups:
        raise MessageContentError(
            ErrorCode.REQUIRED_FIELD_MISSING, "no OBR segment", ErrorLocation("OBR", 1, 18)
        )
    d = message.header.delimiters
    source = f"hl7:{message.header.sending_application}"
    notices = []
    for group in groups:
        patient = read_patient(group.pid, group.sequence, d, accept_test_numbers)
        if group.withdrawn:
            patient = PatientRef(
                patient.nhs_number, patient.local_id, patient.local_namespace, withdrawn=True
            )
        studies = tuple(_read_study(o, d, trust) for o in group.orders)
        _check_characters(source, patient, studies, group)
        notices.append(
            StudyNotice(trust.ods_code, FeedKind.HL7, source, patient, studies, received_at)
        )
    return tuple(notices)


_CONTROL = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")


def _check_characters(
    source: str, patient: PatientRef, studies: Sequence[StudyRef], group: _PatientGroup
) -> None:
    """AE 102 for a control character (a NUL, say, from `\\X00\\`) in anything the index
    keeps: it has no place in an identifier, and PostgreSQL could not store it."""
    kept: list[tuple[str | None, str, ErrorLocation]] = [
        (source, "MSH-3", ErrorLocation("MSH", 1, 3)),
        (patient.local_id, "PID-3", ErrorLocation("PID", group.sequence, 3)),
        (patient.local_namespace, "PID-3", ErrorLocation("PID", group.sequence, 3)),
    ]
    for study, order in zip(studies, group.orders, strict=True):
        seq = order.sequence
        procedure = study.procedure
        kept += [
            (study.accession, "the accession number", ErrorLocation("OBR", seq, 18)),
            (",".join(study.modalities), "OBR-24", ErrorLocation("OBR", seq, 24)),
            (procedure.code if procedure else None, "OBR-4", ErrorLocation("OBR", seq, 4)),
            (procedure.display if procedure else None, "OBR-4", ErrorLocation("OBR", seq, 4)),
        ]
    for value, what, where in kept:
        if value and _CONTROL.search(value):
            raise MessageContentError(
                ErrorCode.DATA_TYPE_ERROR, f"{what} holds a control character", where
            )


# --------------------------------------------------------------------------- patient


@dataclass(frozen=True, slots=True)
class _Cx:
    value: str
    type_code: str
    authority: str  # CX.4 namespace (or universal id)
    facility: str  # CX.6 namespace
    field: int
    repetition: int


def _cx_items(pid: list[str], field_no: int, d: Delimiters) -> Iterator[_Cx]:
    for rep, raw in enumerate(_get(pid, field_no).split(d.repetition), start=1):
        comps = raw.split(d.component)
        value = unescape(comps[0], d).strip()
        if not value or value == HL7_NULL:
            continue
        yield _Cx(
            value,
            _hd(_get(comps, 4), d),
            _hd(_get(comps, 3), d),
            _hd(_get(comps, 5), d),
            field_no,
            rep,
        )


def _hd(value: str, d: Delimiters) -> str:
    """An HD's namespace id (else its universal id), unescaped; `""` -> empty."""
    subs = value.split(d.subcomponent)
    for sub in (subs[0], _get(subs, 1)):
        sub = unescape(sub, d).strip()
        if sub and sub != HL7_NULL:
            return sub
    return ""


def _is_nhs_typed(cx: _Cx) -> bool:
    return (
        cx.type_code.upper().startswith(NHS_TYPE_PREFIX)
        or cx.authority.upper() == NHS_AUTHORITY
        or cx.facility.upper() == NHS_AUTHORITY
    )


def read_patient(
    pid: list[str] | None, sequence: int, d: Delimiters, accept_test_numbers: bool
) -> PatientRef:
    """NHS Number (typed, checked) and local id from PID-3, then PID-2 (older feeds)."""
    if pid is None:
        raise MessageContentError(
            ErrorCode.REQUIRED_FIELD_MISSING, "no PID segment", ErrorLocation("PID", 1, 3)
        )
    items = [*_cx_items(pid, 3, d), *_cx_items(pid, 2, d)]
    nhs: NhsNumber | None = None
    for cx in items:
        if not _is_nhs_typed(cx):
            continue
        number = _check_nhs(cx, sequence, accept_test_numbers)
        if nhs is not None and number != nhs:
            raise MessageContentError(
                ErrorCode.DATA_TYPE_ERROR,
                "two different NHS Numbers for one patient",
                ErrorLocation("PID", sequence, cx.field, cx.repetition),
            )
        nhs = number
    local = _local_id(items)
    if nhs is None and local is None:
        raise MessageContentError(
            ErrorCode.REQUIRED_FIELD_MISSING,
            "no usable patient identifier in PID-3",
            ErrorLocation("PID", sequence, 3),
        )
    return PatientRef(
        nhs_number=nhs,
        local_id=local.value if local else None,
        local_namespace=(local.authority or None) if local else None,
    )


def _check_nhs(cx: _Cx, sequence: int, accept_test_numbers: bool) -> NhsNumber:
    try:
        return parse_nhs_number(cx.value, accept_test_numbers=accept_test_numbers)
    except InvalidNhsNumberError as exc:
        raise MessageContentError(
            ErrorCode.DATA_TYPE_ERROR,
            f"invalid NHS Number {mask(cx.value)} in PID-{cx.field}: {exc.reason}",
            ErrorLocation("PID", sequence, cx.field, cx.repetition),
        ) from exc


def _local_id(items: list[_Cx]) -> _Cx | None:
    """The trust's local id: first MR, else PI, else untyped (PID-3 before PID-2)."""
    for wanted in LOCAL_ID_TYPES:
        for cx in items:
            if not _is_nhs_typed(cx) and cx.type_code.upper() == wanted:
                return cx
    return None


# --------------------------------------------------------------------------- study


def _read_study(order: _OrderGroup, d: Delimiters, trust: TrustConfig) -> StudyRef:
    obr, seq = order.obr, order.sequence
    accession = _accession(obr, seq, d, trust)
    uid = _study_uid(order, d)
    if accession is None and uid is None:
        raise MessageContentError(
            ErrorCode.REQUIRED_FIELD_MISSING,
            "no accession number and no Study Instance UID",
            ErrorLocation("OBR", seq, 18),
        )
    code = _first(_get(obr, 25), d).upper()
    if code and code not in RESULT_STATUS:
        raise MessageContentError(
            ErrorCode.TABLE_VALUE_NOT_FOUND,
            f"result status {code} is not accepted in a report",
            ErrorLocation("OBR", seq, 25),
        )
    status, report_status = RESULT_STATUS.get(code, (None, None))
    modality = map_modality(_first(_get(obr, 24), d))
    return StudyRef(
        study_uid=uid,
        accession=accession,
        modalities=(modality,) if modality else (),
        procedure=_procedure(_get(obr, 4), d),
        started=_time(obr, 7, seq, d, trust.zone),
        status=status,
        report_status=report_status,
        report_time=_time(obr, 22, seq, d, trust.zone),
        report_hash=report_hash(order, d) if report_status else None,
    )


def _accession(obr: list[str], seq: int, d: Delimiters, trust: TrustConfig) -> str | None:
    fields = (3,) if trust.accession_field == "OBR-3" else (18, 3)
    for n in fields:
        value = _first(_get(obr, n), d)
        if value:
            _check_length(value, ErrorLocation("OBR", seq, n), "accession number")
            return value
    return None


def _check_length(value: str, where: ErrorLocation, what: str) -> None:
    if len(value) > MAX_KEY_LENGTH:
        raise MessageContentError(
            ErrorCode.DATA_TYPE_ERROR, f"{what} longer than {MAX_KEY_LENGTH} characters", where
        )


def _study_uid(order: _OrderGroup, d: Delimiters) -> str | None:
    for seg, seq in order.segments:
        name = seg[0].strip().upper()
        found = None
        if name == "ZDS":
            found = (_first(_get(seg, 1), d), ErrorLocation("ZDS", seq, 1))
        elif name == "IPC":
            found = (_first(_get(seg, 3), d), ErrorLocation("IPC", seq, 3))
        elif name == "OBX" and is_study_uid_obx(_get(seg, 3), d):
            found = (_first(_get(seg, 5), d), ErrorLocation("OBX", seq, 5))
        if found and found[0]:
            uid, where = found
            if not _UID.match(uid) or len(uid) > MAX_KEY_LENGTH:
                raise MessageContentError(
                    ErrorCode.DATA_TYPE_ERROR, "Study Instance UID is not a valid DICOM UID", where
                )
            return uid
    return None


def is_study_uid_obx(obx3: str, d: Delimiters) -> bool:
    """OBX-3 `113014^DICOM Study^DCM` (RAD-128) or named "Study Instance UID" (RAD-28)."""
    comps = [unescape(c, d).strip() for c in obx3.split(d.repetition, 1)[0].split(d.component)]
    if comps[0] == DICOM_STUDY_CODE and _get(comps, 2).upper() in (DICOM_CODING_SCHEME, ""):
        return True
    return any(c.lower() == STUDY_UID_NAME for c in comps[:2])


def map_modality(code: str) -> str | None:
    """OBR-24 -> a DICOM modality: DICOM terms as they are, table 0074 via MODALITY_MAP."""
    code = code.strip().upper()
    if code in DICOM_MODALITIES:
        return code
    return MODALITY_MAP.get(code)


def _procedure(obr4: str, d: Delimiters) -> Coding | None:
    comps = obr4.split(d.repetition, 1)[0].split(d.component)
    code, display = unescape(comps[0], d).strip(), unescape(_get(comps, 1), d).strip()
    if not code or code == HL7_NULL:
        return None
    scheme = unescape(_get(comps, 2), d).strip().upper()
    return Coding(
        system=CODING_SYSTEMS.get(scheme),
        code=code,
        display=display if display and display != HL7_NULL else None,
    )


_DTM = re.compile(
    r"^(\d{4})(?:(\d{2})(?:(\d{2})(?:(\d{2})(?:(\d{2})(?:(\d{2})(?:\.(\d{1,4}))?)?)?)?)?)?"
    r"([+-]\d{4})?$"
)


def parse_hl7_time(value: str, zone: ZoneInfo) -> datetime:
    """An HL7 DTM/TS (first component) as an aware datetime. Without an offset the trust's
    zone applies: a time repeated at the autumn change is the first (summer-time)
    occurrence, a time in the spring gap is read with the offset before the change
    (zoneinfo fold=0 both ways; 01:30 on the spring day is 01:30 GMT). Raises ValueError."""
    m = _DTM.match(value.strip())
    if not m:
        raise ValueError("not an HL7 date/time")
    year, month, day, hour, minute, second, frac, offset = m.groups()
    micro = int((frac or "0").ljust(6, "0")[:6])
    naive = datetime(
        int(year),
        int(month or 1),
        int(day or 1),
        int(hour or 0),
        int(minute or 0),
        int(second or 0),
        micro,
    )
    if offset is None:
        return naive.replace(tzinfo=zone, fold=0).astimezone(UTC)
    sign = -1 if offset[0] == "-" else 1
    delta = timedelta(hours=int(offset[1:3]), minutes=int(offset[3:5]))
    if delta >= timedelta(hours=24):
        raise ValueError("offset out of range")
    return naive.replace(tzinfo=timezone(sign * delta)).astimezone(UTC)


def _time(obr: list[str], n: int, seq: int, d: Delimiters, zone: ZoneInfo) -> datetime | None:
    value = _first(_get(obr, n), d)
    if not value:
        return None
    try:
        return parse_hl7_time(value, zone)
    except ValueError as exc:
        raise MessageContentError(
            ErrorCode.DATA_TYPE_ERROR,
            f"OBR-{n} is not a valid date/time",
            ErrorLocation("OBR", seq, n),
        ) from exc


def report_hash(order: _OrderGroup, d: Delimiters) -> str:
    """SHA-256 over what distinguishes one version of a report from another: OBR-25,
    OBR-22 and each OBX's code, status and value (the value by its digest, so the
    journal's stripped copy replays to the same hash) and each NTE's digest."""
    h = hashlib.sha256()
    for n in (25, 22):
        h.update(_first(_get(order.obr, n), d).encode() + b"\x1f")
    for seg, _seq in order.segments:
        name = seg[0].strip().upper()
        if name == "OBX":
            parts = (
                _first(_get(seg, 3), d),
                _first(_get(seg, 11), d),
                content_digest(unescape(_get(seg, 5), d)),
            )
        elif name == "NTE":
            parts = ("NTE", "", content_digest(unescape(_get(seg, 3), d)))
        else:
            continue
        h.update("\x1f".join(parts).encode("utf-8", "surrogatepass") + b"\x1e")
    return h.hexdigest()


@functools.lru_cache(maxsize=32)
def content_digest(text: str) -> str:
    """The stand-in the journal keeps for a removed value; a stand-in maps to itself.
    (Cached for a message's few values: report_hash and strip_for_journal both ask.)"""
    if text.startswith(REDACTED_PREFIX):
        return text
    digest = hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()[:32]
    return REDACTED_PREFIX + digest


# --------------------------------------------------------------------------- journal copy

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
    lines = _split_segments(text)
    try:
        msh = _msh_fields(lines[0]) if lines else []
        d = _delimiters(msh) if msh else None
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
    if name == "OBX" and not is_study_uid_obx(_get(fields, 3), d):
        digested = (5,)
    out = list(fields)
    for n in digested:
        if n < len(out) and out[n]:
            out[n] = content_digest(unescape(out[n], d))
    return out
