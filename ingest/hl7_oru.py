"""ORU^R01 -> StudyNotice: which studies one report message describes, for which patient.

Bytes in, frozen notices or a typed `Hl7Error` out; no I/O. The segments come from
ingest/hl7_segments.py, the fields' meaning from ingest/hl7_fields.py; this module owns the
message's structure (HL7 v2.5.1 §7.3.1: PID starts a patient group, OBR an order group, and
OBX/ZDS/IPC/NTE belong to the preceding OBR) and what each order says about its study:
- accession (trust.accession_field: OBR-18 then OBR-3, or OBR-3 only), Study UID (ZDS-1,
  IPC-3, OBX 113014^DICOM Study^DCM or OBX-3 "Study Instance UID"), modality OBR-24,
  procedure OBR-4, started OBR-7, report time OBR-22, status OBR-25, a report hash;
- OBX-11 `W` (table 0085: "post original as wrong") withdraws the message's patient link.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from zoneinfo import ZoneInfo

from ingest.hl7_errors import ErrorCode, ErrorLocation, MessageContentError
from ingest.hl7_fields import (
    CONTROL_CHARACTER,
    MAX_KEY_LENGTH,
    RESULT_STATUS,
    UID_PATTERN,
    check_length,
    is_study_uid_obx,
    map_modality,
    parse_hl7_time,
    procedure_of,
    read_patient,
)
from ingest.hl7_redact import content_digest
from ingest.hl7_segments import Delimiters, Hl7Message, field_at, first_value, unescape
from locator.core.notice import FeedKind, PatientRef, StudyNotice, StudyRef
from locator.trusts import TrustConfig

OBX_WRONG_PATIENT = "W"  # HL7 table 0085


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
        if name == "OBX" and field_at(seg, 11).strip().upper() == OBX_WRONG_PATIENT:
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
        if value and CONTROL_CHARACTER.search(value):
            raise MessageContentError(
                ErrorCode.DATA_TYPE_ERROR, f"{what} holds a control character", where
            )


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
    code = first_value(field_at(obr, 25), d).upper()
    if code and code not in RESULT_STATUS:
        raise MessageContentError(
            ErrorCode.TABLE_VALUE_NOT_FOUND,
            f"result status {code} is not accepted in a report",
            ErrorLocation("OBR", seq, 25),
        )
    status, report_status = RESULT_STATUS.get(code, (None, None))
    modality = map_modality(first_value(field_at(obr, 24), d))
    return StudyRef(
        study_uid=uid,
        accession=accession,
        modalities=(modality,) if modality else (),
        procedure=procedure_of(field_at(obr, 4), d),
        started=_time(obr, 7, seq, d, trust.zone),
        status=status,
        report_status=report_status,
        report_time=_time(obr, 22, seq, d, trust.zone),
        report_hash=report_hash(order, d) if report_status else None,
    )


def _accession(obr: list[str], seq: int, d: Delimiters, trust: TrustConfig) -> str | None:
    fields = (3,) if trust.accession_field == "OBR-3" else (18, 3)
    for n in fields:
        value = first_value(field_at(obr, n), d)
        if value:
            check_length(value, ErrorLocation("OBR", seq, n), "accession number")
            return value
    return None


def _study_uid(order: _OrderGroup, d: Delimiters) -> str | None:
    for seg, seq in order.segments:
        name = seg[0].strip().upper()
        found = None
        if name == "ZDS":
            found = (first_value(field_at(seg, 1), d), ErrorLocation("ZDS", seq, 1))
        elif name == "IPC":
            found = (first_value(field_at(seg, 3), d), ErrorLocation("IPC", seq, 3))
        elif name == "OBX" and is_study_uid_obx(field_at(seg, 3), d):
            found = (first_value(field_at(seg, 5), d), ErrorLocation("OBX", seq, 5))
        if found and found[0]:
            uid, where = found
            if not UID_PATTERN.match(uid) or len(uid) > MAX_KEY_LENGTH:
                raise MessageContentError(
                    ErrorCode.DATA_TYPE_ERROR, "Study Instance UID is not a valid DICOM UID", where
                )
            return uid
    return None


def _time(obr: list[str], n: int, seq: int, d: Delimiters, zone: ZoneInfo) -> datetime | None:
    value = first_value(field_at(obr, n), d)
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
        h.update(first_value(field_at(order.obr, n), d).encode() + b"\x1f")
    for seg, _seq in order.segments:
        name = seg[0].strip().upper()
        if name == "OBX":
            parts = (
                first_value(field_at(seg, 3), d),
                first_value(field_at(seg, 11), d),
                content_digest(unescape(field_at(seg, 5), d)),
            )
        elif name == "NTE":
            parts = ("NTE", "", content_digest(unescape(field_at(seg, 3), d)))
        else:
            continue
        h.update("\x1f".join(parts).encode("utf-8", "surrogatepass") + b"\x1e")
    return h.hexdigest()
