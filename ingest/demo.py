"""`locator demo`: sample ORU^R01 and MPPS sent through a running `locator serve`'s real feeds.

It speaks to the listeners as a trust's systems would: its own minimal MLLP client over a
socket (framing VT ... FS CR, one ACK awaited per message; HL7 v2.5.1 Appendix C) and
pynetdicom as the MPPS SCU (N-CREATE IN PROGRESS, then N-SET COMPLETED; DICOM PS3.4 Annex F),
calling from the AE titles of the example trusts (locator/example_trusts.toml).

Everything is deterministic (times, UIDs, control ids), so running the demo twice changes
nothing: a repeated HL7 message gets its stored ACK and an identical MPPS step gets success
again. The NHS Numbers are in NHS England's 999 test range, with a computed modulus-11 check
digit; names and birth dates are fictitious (the locator strips them from what it keeps).
The NICIP-style procedure codes are illustrative, not checked against a NICIP release.
"""

from __future__ import annotations

import socket
import uuid
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from zoneinfo import ZoneInfo

from pydicom.dataset import Dataset
from pynetdicom import AE

from locator.core.nhs_number import check_digit
from locator.trusts import TrustConfig, example_trusts

# MLLP framing (HL7 v2.5.1 Appendix C.4.3, minimal lower layer protocol)
START_BLOCK = b"\x0b"
END_BLOCK = b"\x1c"
CARRIAGE_RETURN = b"\x0d"
FRAME_END = END_BLOCK + CARRIAGE_RETURN
SEGMENT_SEPARATOR = "\r"
ACK_TIMEOUT_SECONDS = 30.0
READ_CHUNK = 65536

# HL7 table 0008 (acknowledgement codes) that mean "accepted"
ACCEPTED_ACK_CODES = frozenset({"AA", "CA"})
# HL7 table 0123 (OBR-25 result status) used by the demo
RESULT_FINAL = "F"
RESULT_PRELIMINARY = "P"
RESULT_CORRECTED = "C"
RESULT_CANCELLED = "X"

# DICOM PS3.4 F.7.2 (Performed Procedure Step Status) and PS3.7 C (DIMSE status)
# Modality Performed Procedure Step SOP Class (PS3.4 F.7.1)
MPPS_SOP_CLASS = "1.2.840.10008.3.1.2.3.3"
PPS_IN_PROGRESS = "IN PROGRESS"
PPS_COMPLETED = "COMPLETED"
DIMSE_SUCCESS = 0x0000
IMAGE_STORAGE = {
    "CT": "1.2.840.10008.5.1.4.1.1.2",  # CT Image Storage
    "MR": "1.2.840.10008.5.1.4.1.1.4",  # MR Image Storage
    "DX": "1.2.840.10008.5.1.4.1.1.1.1",  # Digital X-Ray Image Storage - For Presentation
    "US": "1.2.840.10008.5.1.4.1.1.6.1",  # Ultrasound Image Storage
}

TEST_RANGE = "999"
NICIP = "NICIP"
RECEIVING_APPLICATION = "LOCATOR"
RECEIVING_FACILITY = "NHSE"
SENDING_APPLICATION = "CRIS"
HL7_VERSION = "2.4"
LONDON = ZoneInfo("Europe/London")
UID_NAMESPACE = uuid.UUID("6f1c2b7e-1d0a-4c55-9a53-0c0de5d3e001")

PROCEDURES: dict[str, tuple[tuple[str, str], ...]] = {
    "CT": (
        ("CHEAD", "CT Head"),
        ("CCAPC", "CT Chest abdomen and pelvis with contrast"),
        ("CPULA", "CT Pulmonary angiogram"),
    ),
    "MR": (("MHEAD", "MR Head"), ("MLSPI", "MR Lumbar spine"), ("MKNEL", "MR Knee Lt")),
    "DX": (("XCHES", "XR Chest"), ("XWRIR", "XR Wrist Rt"), ("XABDO", "XR Abdomen")),
    "US": (("UABDO", "US Abdomen"), ("UPELV", "US Pelvis"), ("UTHYR", "US Thyroid")),
}


class DemoError(Exception):
    """The demo could not talk to the service (connection refused, no ACK, association failed)."""


# --------------------------------------------------------------------------- the sample data


def demo_nhs_number(serial: int) -> str:
    """The `serial`-th valid NHS Number of the 999 test range (skipping check digit 10)."""
    found = -1
    body = 0
    while True:
        first_nine = f"{TEST_RANGE}{body:06d}"
        digit = check_digit(first_nine)
        body += 1
        if digit is None or len(set(first_nine + str(digit))) == 1:
            continue
        found += 1
        if found == serial:
            return first_nine + str(digit)


def demo_uid(*parts: object) -> str:
    """A deterministic DICOM UID under the 2.25 (UUID) root (PS3.5 B.2)."""
    name = "/".join(str(p) for p in parts)
    return f"2.25.{uuid.uuid5(UID_NAMESPACE, name).int}"


@dataclass(frozen=True, slots=True)
class DemoPatient:
    nhs_number: str
    family: str
    given: str
    birth_date: str
    sex: str
    story: str

    def local_id(self, ods: str) -> str:
        return f"K{ods[-2:]}{self.nhs_number[-6:]}"


@dataclass(frozen=True, slots=True)
class DemoStudy:
    """One study: its HL7 reports (OBR-25 codes, in order) and whether MPPS is sent first."""

    patient: DemoPatient
    ods: str
    modality: str
    procedure: tuple[str, str]
    started: datetime
    serial: int
    reports: tuple[str, ...] = ()
    mpps: str | None = None  # None, PPS_IN_PROGRESS or PPS_COMPLETED
    images: int = 0

    @property
    def accession(self) -> str:
        return f"{self.ods}{self.started:%y}{self.serial:05d}"

    @property
    def study_uid(self) -> str:
        return demo_uid("study", self.ods, self.accession)


PATIENTS = (
    DemoPatient(
        demo_nhs_number(0),
        "DEMO",
        "FRANCES",
        "19580214",
        "F",
        "oncology follow-up: many studies at three trusts (try paging)",
    ),
    DemoPatient(
        demo_nhs_number(1),
        "DEMO",
        "ARTHUR",
        "19710930",
        "M",
        "a fall: CT head via MPPS and ORU, a cancelled MR, a scan in progress",
    ),
    DemoPatient(
        demo_nhs_number(2), "DEMO", "PRIYA", "19890521", "F", "ultrasound with a corrected report"
    ),
    DemoPatient(demo_nhs_number(3), "DEMO", "OWEN", "20040707", "M", "one wrist X-ray"),
)

# The frequent patient's trusts and modalities, in turn (RZZ01 CT/MR, RZZ02 CT/DX, RZZ03 US/DX).
ROTATION = (
    ("RZZ01", "CT"),
    ("RZZ02", "DX"),
    ("RZZ01", "MR"),
    ("RZZ03", "US"),
    ("RZZ01", "CT"),
    ("RZZ02", "CT"),
    ("RZZ03", "DX"),
)
MANY_STUDIES = 28


def _at(year: int, month: int, day: int, hour: int = 9, minute: int = 30) -> datetime:
    return datetime(year, month, day, hour, minute, tzinfo=LONDON)


def _many_studies(patient: DemoPatient) -> list[DemoStudy]:
    first = _at(2019, 3, 4, 10, 15)
    studies = []
    for n in range(MANY_STUDIES):
        ods, modality = ROTATION[n % len(ROTATION)]
        options = PROCEDURES[modality]
        started = first + timedelta(days=97 * n, minutes=35 * (n % 5))
        reports: tuple[str, ...] = (RESULT_FINAL,)
        if n == MANY_STUDIES - 1:
            reports = (RESULT_PRELIMINARY,)
        elif n == 9:
            reports = (RESULT_CANCELLED,)
        elif n == 15:
            reports = (RESULT_FINAL, RESULT_CORRECTED)
        mpps = PPS_COMPLETED if n >= MANY_STUDIES - 3 else None
        studies.append(
            DemoStudy(
                patient,
                ods,
                modality,
                options[n % len(options)],
                started,
                100 + n,
                reports,
                mpps,
                images=120 if mpps else 0,
            )
        )
    return studies


def demo_studies() -> list[DemoStudy]:
    """The whole sample: one patient with many studies, three with a few."""
    many, fall, scan, wrist = PATIENTS
    return [
        *_many_studies(many),
        DemoStudy(
            fall,
            "RZZ01",
            "CT",
            PROCEDURES["CT"][0],
            _at(2026, 9, 12, 22, 47),
            201,
            (RESULT_FINAL,),
            PPS_COMPLETED,
            images=64,
        ),
        DemoStudy(
            fall,
            "RZZ02",
            "MR",
            PROCEDURES["MR"][2],
            _at(2026, 10, 2, 14, 0),
            202,
            (RESULT_CANCELLED,),
        ),
        DemoStudy(
            fall,
            "RZZ02",
            "DX",
            PROCEDURES["DX"][0],
            _at(2026, 10, 20, 11, 5),
            203,
            (RESULT_PRELIMINARY,),
            PPS_COMPLETED,
            images=2,
        ),
        DemoStudy(
            fall,
            "RZZ03",
            "US",
            PROCEDURES["US"][0],
            _at(2026, 11, 3, 15, 20),
            204,
            (),
            PPS_IN_PROGRESS,
        ),
        DemoStudy(
            scan,
            "RZZ03",
            "US",
            PROCEDURES["US"][1],
            _at(2025, 6, 18, 9, 40),
            301,
            (RESULT_FINAL, RESULT_CORRECTED),
        ),
        DemoStudy(
            wrist, "RZZ01", "DX", PROCEDURES["DX"][1], _at(2023, 1, 8, 17, 25), 401, (RESULT_FINAL,)
        ),
    ]


# --------------------------------------------------------------------------- HL7 ORU^R01


def hl7_time(value: datetime) -> str:
    """HL7 TS in the trust's local time (the example trusts' timezone is Europe/London)."""
    return value.astimezone(LONDON).strftime("%Y%m%d%H%M%S")


def _obr(study: DemoStudy, result: str, status_time: datetime) -> str:
    code, display = study.procedure
    fields = [""] * 26
    fields[0] = "OBR"
    fields[1] = "1"
    fields[2] = f"OC{study.serial:06d}^ICE"  # placer order number
    fields[3] = f"{study.accession}^{SENDING_APPLICATION}"  # filler order number
    fields[4] = f"{code}^{display}^{NICIP}"
    if result != RESULT_CANCELLED:
        fields[7] = hl7_time(study.started)  # OBR-7 observation (exam) date/time
    fields[18] = study.accession  # OBR-18: the accession number (IHE practice)
    fields[22] = hl7_time(status_time)  # OBR-22 results/status change
    fields[24] = study.modality  # OBR-24 as a DICOM modality code
    fields[25] = result  # OBR-25 result status (table 0123)
    return "|".join(fields)


def build_oru(study: DemoStudy, report_index: int) -> str:
    """One ORU^R01 (v2.4, original acknowledgement mode) for the study's n-th report."""
    result = study.reports[report_index]
    patient = study.patient
    status_time = study.started + timedelta(hours=2 + 20 * report_index)
    facility = study.ods
    control_id = f"DEMO-{study.accession}-{report_index + 1}"
    cancelled = result == RESULT_CANCELLED
    segments = [
        f"MSH|^~\\&|{SENDING_APPLICATION}|{facility}|{RECEIVING_APPLICATION}|"
        f"{RECEIVING_FACILITY}|{hl7_time(status_time)}||ORU^R01^ORU_R01|{control_id}|P|"
        f"{HL7_VERSION}|||||GBR|UNICODE UTF-8",
        f"PID|1||{patient.nhs_number}^^^NHS^NH~{patient.local_id(study.ods)}^^^{study.ods}^MR"
        f"||{patient.family}^{patient.given}||{patient.birth_date}|{patient.sex}",
        f"ORC|{'OC' if cancelled else 'RE'}|OC{study.serial:06d}^ICE|"
        f"{study.accession}^{SENDING_APPLICATION}||{'CA' if cancelled else 'CM'}",
        _obr(study, result, status_time),
    ]
    if not cancelled:
        code, display = study.procedure
        segments.append(
            f"OBX|1|TX|{code}^{display}^{NICIP}||Demo report text (not kept by the locator)."
            f"||||||{result}"
        )
        segments.append(f"ZDS|{study.study_uid}^{SENDING_APPLICATION}^Application^DICOM")
    return SEGMENT_SEPARATOR.join(segments) + SEGMENT_SEPARATOR


def ack_code(ack: str) -> str:
    """MSA-1 of an acknowledgement ("" when there is no MSA segment)."""
    for segment in ack.replace("\n", "\r").split("\r"):
        if segment.startswith("MSA"):
            fields = segment.split(segment[3]) if len(segment) > 3 else []
            return fields[1] if len(fields) > 1 else ""
    return ""


class MllpClient:
    """A minimal MLLP sender: one frame out, one acknowledgement frame back."""

    def __init__(self, host: str, port: int, *, timeout: float = ACK_TIMEOUT_SECONDS) -> None:
        self.host, self.port, self.timeout = host, port, timeout
        self._sock: socket.socket | None = None
        self._buffer = b""

    def __enter__(self) -> MllpClient:
        try:
            self._sock = socket.create_connection((self.host, self.port), timeout=self.timeout)
        except OSError as exc:
            raise DemoError(f"no MLLP listener at {self.host}:{self.port} ({exc})") from exc
        return self

    def __exit__(self, *exc: object) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    def send(self, message: str) -> str:
        """Send one message and return its acknowledgement's text."""
        if self._sock is None:
            raise DemoError("the MLLP connection is not open")
        self._sock.sendall(START_BLOCK + message.encode("utf-8") + FRAME_END)
        return self._read_frame().decode("utf-8", errors="replace")

    def _read_frame(self) -> bytes:
        assert self._sock is not None
        while FRAME_END not in self._buffer:
            try:
                chunk = self._sock.recv(READ_CHUNK)
            except OSError as exc:
                raise DemoError(f"no acknowledgement from the MLLP listener ({exc})") from exc
            if not chunk:
                raise DemoError("the MLLP listener closed the connection without an ACK")
            self._buffer += chunk
        frame, self._buffer = self._buffer.split(FRAME_END, 1)
        return frame.lstrip(START_BLOCK)


# --------------------------------------------------------------------------- DICOM MPPS


def calling_ae_title(trust: TrustConfig, modality: str) -> str:
    """The trust's AE title for this modality's device (its first one when none matches)."""
    if not trust.dicom_ae_titles:
        raise DemoError(f"trust {trust.ods_code} has no DICOM AE title to call from")
    for title in trust.dicom_ae_titles:
        if modality in title[len(trust.ods_code) :]:
            return title
    return trust.dicom_ae_titles[0]


def _code_item(code: str, meaning: str, scheme: str = NICIP) -> Dataset:
    item = Dataset()
    item.CodeValue = code
    item.CodingSchemeDesignator = scheme
    item.CodeMeaning = meaning
    return item


def _patient(ds: Dataset, study: DemoStudy) -> None:
    patient = study.patient
    ds.PatientName = f"{patient.family}^{patient.given}"
    ds.PatientID = patient.nhs_number
    ds.IssuerOfPatientID = "NHS"  # interface.md: an NHS Number is typed by its issuer
    local = Dataset()
    local.PatientID = patient.local_id(study.ods)
    local.IssuerOfPatientID = study.ods
    local.TypeOfPatientID = "TEXT"
    ds.OtherPatientIDsSequence = [local]
    ds.PatientBirthDate = patient.birth_date
    ds.PatientSex = patient.sex


def n_create_dataset(study: DemoStudy, station: str) -> Dataset:
    """The N-CREATE attribute list (PS3.4 Table F.7.2-1), status IN PROGRESS."""
    code, display = study.procedure
    ds = Dataset()
    ds.SpecificCharacterSet = "ISO_IR 100"
    scheduled = Dataset()
    scheduled.StudyInstanceUID = study.study_uid
    scheduled.AccessionNumber = study.accession
    scheduled.ReferencedStudySequence = []
    scheduled.RequestedProcedureID = f"RP{study.serial:06d}"
    scheduled.RequestedProcedureDescription = display
    scheduled.ScheduledProcedureStepID = f"SPS{study.serial:06d}"
    scheduled.ScheduledProcedureStepDescription = display
    scheduled.ScheduledProtocolCodeSequence = []
    ds.ScheduledStepAttributesSequence = [scheduled]
    _patient(ds, study)
    ds.PerformedProcedureStepID = f"PPS{study.serial:06d}"
    ds.PerformedStationAETitle = station
    ds.PerformedStationName = station
    ds.PerformedLocation = f"{study.ods} imaging"
    ds.PerformedProcedureStepStartDate = study.started.strftime("%Y%m%d")
    ds.PerformedProcedureStepStartTime = study.started.strftime("%H%M%S")
    ds.PerformedProcedureStepStatus = PPS_IN_PROGRESS
    ds.PerformedProcedureStepDescription = display
    ds.PerformedProcedureTypeDescription = display
    ds.ProcedureCodeSequence = [_code_item(code, display)]
    ds.PerformedProcedureStepEndDate = ""
    ds.PerformedProcedureStepEndTime = ""
    ds.Modality = study.modality
    ds.StudyID = f"{study.serial}"
    ds.PerformedProtocolCodeSequence = []
    ds.PerformedSeriesSequence = []
    return ds


def _series(study: DemoStudy) -> list[Dataset]:
    storage = IMAGE_STORAGE.get(study.modality, IMAGE_STORAGE["CT"])
    per_series = max(1, study.images // 2)
    items = []
    for number in (1, 2):
        series = Dataset()
        series.SeriesInstanceUID = demo_uid("series", study.study_uid, number)
        series.ProtocolName = study.procedure[1]
        series.SeriesDescription = f"{study.procedure[1]} series {number}"
        series.PerformingPhysicianName = ""
        series.OperatorsName = ""
        series.RetrieveAETitle = ""
        images = []
        for index in range(per_series):
            image = Dataset()
            image.ReferencedSOPClassUID = storage
            image.ReferencedSOPInstanceUID = demo_uid("image", series.SeriesInstanceUID, index)
            images.append(image)
        series.ReferencedImageSequence = images
        series.ReferencedNonImageCompositeSOPInstanceSequence = []
        items.append(series)
    return items


def n_set_completed(study: DemoStudy) -> Dataset:
    """The final N-SET (PS3.4 F.7.2.2): COMPLETED, end time and the performed series."""
    ended = study.started + timedelta(minutes=25)
    ds = Dataset()
    ds.PerformedProcedureStepStatus = PPS_COMPLETED
    ds.PerformedProcedureStepEndDate = ended.strftime("%Y%m%d")
    ds.PerformedProcedureStepEndTime = ended.strftime("%H%M%S")
    ds.PerformedSeriesSequence = _series(study)
    return ds


def _status_of(answer: tuple[Dataset | None, Dataset | None], what: str) -> None:
    status, _ = answer
    code = getattr(status, "Status", None)
    if code != DIMSE_SUCCESS:
        shown = "no answer" if code is None else f"0x{int(code):04X}"
        raise DemoError(f"MPPS {what} refused: {shown}")


def send_mpps(
    studies: Iterable[DemoStudy],
    *,
    host: str,
    port: int,
    called_ae: str,
    trusts: dict[str, TrustConfig],
) -> int:
    """Send each study's MPPS steps, one association per calling AE title; steps sent."""
    by_caller: dict[str, list[DemoStudy]] = {}
    for study in studies:
        caller = calling_ae_title(trusts[study.ods], study.modality)
        by_caller.setdefault(caller, []).append(study)
    sent = 0
    for caller, group in by_caller.items():
        scu = AE(ae_title=caller)
        scu.add_requested_context(MPPS_SOP_CLASS)
        assoc = scu.associate(host, port, ae_title=called_ae)
        if not assoc.is_established:
            raise DemoError(f"DICOM association {caller} -> {called_ae} at {host}:{port} failed")
        try:
            for study in group:
                instance = demo_uid("mpps", study.study_uid)
                _status_of(
                    assoc.send_n_create(n_create_dataset(study, caller), MPPS_SOP_CLASS, instance),
                    "N-CREATE",
                )
                if study.mpps == PPS_COMPLETED:
                    _status_of(
                        assoc.send_n_set(n_set_completed(study), MPPS_SOP_CLASS, instance),
                        "N-SET",
                    )
                sent += 1
        finally:
            assoc.release()
    return sent


# --------------------------------------------------------------------------- the run


@dataclass(slots=True)
class DemoResult:
    messages_accepted: int = 0
    messages_refused: list[str] = field(default_factory=list)
    mpps_steps: int = 0


def oru_messages(studies: Iterable[DemoStudy]) -> Iterator[tuple[str, str]]:
    """(control id, message) for every report, in order."""
    for study in studies:
        for index in range(len(study.reports)):
            yield f"DEMO-{study.accession}-{index + 1}", build_oru(study, index)


def send_oru(studies: Iterable[DemoStudy], *, host: str, port: int, result: DemoResult) -> None:
    with MllpClient(host, port) as client:
        for control_id, message in oru_messages(studies):
            code = ack_code(client.send(message))
            if code in ACCEPTED_ACK_CODES:
                result.messages_accepted += 1
            else:
                result.messages_refused.append(f"{control_id}: {code or 'no MSA'}")


def run_demo(
    *,
    host: str,
    mllp_port: int,
    dicom_port: int,
    dicom_ae: str,
    say: Callable[[str], None] = print,
) -> DemoResult:
    """Feed the sample through the running service: MPPS first (as at the scanner), then ORU."""
    studies = demo_studies()
    trusts = {t.ods_code: t for t in example_trusts()}
    result = DemoResult()
    with_mpps = [s for s in studies if s.mpps]
    say(f"MPPS: {len(with_mpps)} procedure steps to {dicom_ae}@{host}:{dicom_port}")
    result.mpps_steps = send_mpps(
        with_mpps, host=host, port=dicom_port, called_ae=dicom_ae, trusts=trusts
    )
    reports = sum(len(s.reports) for s in studies)
    say(f"HL7: {reports} ORU^R01 messages to {host}:{mllp_port}")
    send_oru(studies, host=host, port=mllp_port, result=result)
    return result


def patient_lines() -> list[str]:
    """One line per demo patient: the NHS Number to type, and what to expect."""
    studies = demo_studies()
    lines = []
    for patient in PATIENTS:
        n = sum(1 for s in studies if s.patient == patient)
        nhs = patient.nhs_number
        studies_text = f"{n:>2} {'study' if n == 1 else 'studies'}"
        lines.append(f"  {nhs[:3]} {nhs[3:6]} {nhs[6:]}  {studies_text:<10} {patient.story}")
    return lines
