"""Field conventions: where England's feeds put identifiers, codes and times (HL7 v2 types).

Reference/feeds.md §1; interface.md, Feeds and Identity rules:
- PID-3 (then PID-2, older feeds) CX repetitions: an NHS Number only when typed (CX.5 `NH`
  with or without a trace-status suffix, or `NHS` in CX.4 or CX.6), always checked; MR/PI or
  untyped ids are the trust's local ids (CX.4 namespace).
- Study UID in OBX `113014^DICOM Study^DCM` or OBX-3 "Study Instance UID"; modality codes of
  HL7 table 0074 mapped to DICOM (MODALITY_MAP); procedure codes with their coding systems;
  result status per table 0123 (RESULT_STATUS); DTM/TS times in the trust's zone.
Pure functions of fields and delimiters: no message structure here (that is hl7_oru's).
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta, timezone
from zoneinfo import ZoneInfo

from ingest.hl7_errors import ErrorCode, ErrorLocation, MessageContentError
from ingest.hl7_segments import HL7_NULL, Delimiters, field_at, unescape
from locator.core.nhs_number import InvalidNhsNumberError, NhsNumber, mask, parse_nhs_number
from locator.core.notice import Coding, PatientRef, ReportStatus, StudyStatus

NHS_TYPE_PREFIX = "NH"  # HL7 table 0203, plus PKB-style trace-status suffixes (NH01)
NHS_AUTHORITY = "NHS"
LOCAL_ID_TYPES = ("MR", "PI", "")  # in order of preference; "" = untyped
DICOM_STUDY_CODE = "113014"  # DCM "DICOM Study" (RAD-128 style OBX)
DICOM_CODING_SCHEME = "DCM"
STUDY_UID_NAME = "study instance uid"
MAX_KEY_LENGTH = 64  # study.study_uid / study.accession columns; DICOM UI is 64 too
UID_PATTERN = re.compile(r"^[0-9]+(\.[0-9]+)*$")

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

# --------------------------------------------------------------------------- patient


@dataclass(frozen=True, slots=True)
class Cx:
    value: str
    type_code: str
    authority: str  # CX.4 namespace (or universal id)
    facility: str  # CX.6 namespace
    field: int
    repetition: int


def cx_items(pid: list[str], field_no: int, d: Delimiters) -> Iterator[Cx]:
    for rep, raw in enumerate(field_at(pid, field_no).split(d.repetition), start=1):
        comps = raw.split(d.component)
        value = unescape(comps[0], d).strip()
        if not value or value == HL7_NULL:
            continue
        yield Cx(
            value,
            hd_value(field_at(comps, 4), d),
            hd_value(field_at(comps, 3), d),
            hd_value(field_at(comps, 5), d),
            field_no,
            rep,
        )


def hd_value(value: str, d: Delimiters) -> str:
    """An HD's namespace id (else its universal id), unescaped; `""` -> empty."""
    subs = value.split(d.subcomponent)
    for sub in (subs[0], field_at(subs, 1)):
        sub = unescape(sub, d).strip()
        if sub and sub != HL7_NULL:
            return sub
    return ""


def is_nhs_typed(cx: Cx) -> bool:
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
    items = [*cx_items(pid, 3, d), *cx_items(pid, 2, d)]
    nhs: NhsNumber | None = None
    for cx in items:
        if not is_nhs_typed(cx):
            continue
        number = check_nhs(cx, sequence, accept_test_numbers)
        if nhs is not None and number != nhs:
            raise MessageContentError(
                ErrorCode.DATA_TYPE_ERROR,
                "two different NHS Numbers for one patient",
                ErrorLocation("PID", sequence, cx.field, cx.repetition),
            )
        nhs = number
    local = local_id_of(items)
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


def check_nhs(cx: Cx, sequence: int, accept_test_numbers: bool) -> NhsNumber:
    try:
        return parse_nhs_number(cx.value, accept_test_numbers=accept_test_numbers)
    except InvalidNhsNumberError as exc:
        raise MessageContentError(
            ErrorCode.DATA_TYPE_ERROR,
            f"invalid NHS Number {mask(cx.value)} in PID-{cx.field}: {exc.reason}",
            ErrorLocation("PID", sequence, cx.field, cx.repetition),
        ) from exc


def local_id_of(items: list[Cx]) -> Cx | None:
    """The trust's local id: first MR, else PI, else untyped (PID-3 before PID-2)."""
    for wanted in LOCAL_ID_TYPES:
        for cx in items:
            if not is_nhs_typed(cx) and cx.type_code.upper() == wanted:
                return cx
    return None


# --------------------------------------------------------------------------- codes and times


def is_study_uid_obx(obx3: str, d: Delimiters) -> bool:
    """OBX-3 `113014^DICOM Study^DCM` (RAD-128) or named "Study Instance UID" (RAD-28)."""
    comps = [unescape(c, d).strip() for c in obx3.split(d.repetition, 1)[0].split(d.component)]
    if comps[0] == DICOM_STUDY_CODE and field_at(comps, 2).upper() in (DICOM_CODING_SCHEME, ""):
        return True
    return any(c.lower() == STUDY_UID_NAME for c in comps[:2])


def map_modality(code: str) -> str | None:
    """OBR-24 -> a DICOM modality: DICOM terms as they are, table 0074 via MODALITY_MAP."""
    code = code.strip().upper()
    if code in DICOM_MODALITIES:
        return code
    return MODALITY_MAP.get(code)


def procedure_of(obr4: str, d: Delimiters) -> Coding | None:
    comps = obr4.split(d.repetition, 1)[0].split(d.component)
    code, display = unescape(comps[0], d).strip(), unescape(field_at(comps, 1), d).strip()
    if not code or code == HL7_NULL:
        return None
    scheme = unescape(field_at(comps, 2), d).strip().upper()
    return Coding(
        system=CODING_SYSTEMS.get(scheme),
        code=code,
        display=display if display and display != HL7_NULL else None,
    )


DTM_PATTERN = re.compile(
    r"^(\d{4})(?:(\d{2})(?:(\d{2})(?:(\d{2})(?:(\d{2})(?:(\d{2})(?:\.(\d{1,4}))?)?)?)?)?)?"
    r"([+-]\d{4})?$"
)


def parse_hl7_time(value: str, zone: ZoneInfo) -> datetime:
    """An HL7 DTM/TS (first component) as an aware datetime. Without an offset the trust's
    zone applies: a time repeated at the autumn change is the first (summer-time)
    occurrence, a time in the spring gap is read with the offset before the change
    (zoneinfo fold=0 both ways; 01:30 on the spring day is 01:30 GMT). Raises ValueError."""
    m = DTM_PATTERN.match(value.strip())
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


def check_length(value: str, where: ErrorLocation, what: str) -> None:
    if len(value) > MAX_KEY_LENGTH:
        raise MessageContentError(
            ErrorCode.DATA_TYPE_ERROR, f"{what} longer than {MAX_KEY_LENGTH} characters", where
        )


CONTROL_CHARACTER = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")
