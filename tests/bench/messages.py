"""Feed messages for the ingest benchmark, built from synthetic studies.

The ORU^R01 is the 15-segment radiology message of shared/reference/stack-limits.md §1: MSH
(v2.4), PID (NHS Number typed NH with assigning authority NHS, plus an MRN), PV1, ORC, OBR,
nine OBX (one ST with the Study Instance UID coded 113014^DICOM Study^DCM, seven TX report
lines, one CE) and NTE, about 2 KB. The MPPS pair is a realistic IN PROGRESS N-CREATE and a
COMPLETED N-SET with two series of ten referenced images (stack-limits.md §6).
"""

from __future__ import annotations

from datetime import datetime, timedelta

from pydicom.dataset import Dataset
from pydicom.uid import generate_uid

from tests.bench.datagen import RIS_APP, SyntheticStudy

VT, FS, CR = b"\x0b", b"\x1c", b"\x0d"  # MLLP frame: VT message FS CR (HL7 v2 MLLP, §2)
REPORT_LINES = (
    "CLINICAL DETAILS: persistent symptoms, please assess and compare with previous imaging.",
    "TECHNIQUE: standard departmental protocol; images reviewed on the diagnostic workstation.",
    "FINDINGS: no focal abnormality is seen within the examined region on this study today.",
    "The appearances are within normal limits for age with no interval change from before.",
    "No fracture, collection, mass lesion or other acute abnormality is demonstrated here.",
    "Incidental minor degenerative change only, of no clinical significance at this time.",
    "CONCLUSION: normal examination. No further imaging is required at this stage, thanks.",
)
REPORT_TAIL = "(synthetic report text: never stored by the locator)"
CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"


def _hl7_time(value: datetime) -> str:
    return value.strftime("%Y%m%d%H%M%S")


def oru_message(study: SyntheticStudy, *, control_id: str) -> str:
    """The 15-segment ORU^R01 for a study's final report (segments separated by CR)."""
    code, display = study.procedure.code, study.procedure.display or ""
    proc = f"{code}^{display}^NICIP"
    acc = study.accession
    started = _hl7_time(study.started)
    reported = _hl7_time(study.started + timedelta(hours=2))
    segments = [
        f"MSH|^~\\&|{RIS_APP}|{study.trust_ods}|FINDIT|NHSE|{reported}||ORU^R01^ORU_R01|"
        f"{control_id}|P|2.4|||AL|NE|GBR|UNICODE UTF-8",
        f"PID|1||{study.nhs_number}^^^NHS^NH~{study.mrn}^^^{study.trust_ods}^MR||"
        "TESTPATIENT^ALICE^^^MS||19700101|F|||1 TEST STREET^^LEEDS^^LS1 1AA||0113 000 0000"
        "||||||||||||||||NSTS01",
        f"PV1|1|O|RAD^^^{study.trust_ods}||||C123456^REFERRER^RACHEL|||||||||||V{acc}",
        f"ORC|RE|OC{acc}^ICE|{acc}^{RIS_APP}||CM",
        f"OBR|1|OC{acc}^ICE|{acc}^{RIS_APP}|{proc}|||{started}|||||||||||{acc}|RP{acc}|SPS1||"
        f"{reported}||{study.modality}|F|||||||C123456&REPORTER&ROBIN",
        f"OBX|1|ST|113014^DICOM Study^DCM||{study.study_uid}||||||F",
        *(
            f"OBX|{i + 2}|TX|{proc}||{line} {REPORT_TAIL}||||||F"
            for i, line in enumerate(REPORT_LINES)
        ),
        "OBX|9|CE|18782-3^Radiology Study observation^LN||NORM^Normal^L||||||F",
        "NTE|1||Report verified and authorised electronically by the reporting radiologist.",
    ]
    return "\r".join(segments) + "\r"


def mllp_frame(message: str) -> bytes:
    return VT + message.encode("utf-8") + FS + CR


def _code(value: str, scheme: str, meaning: str) -> Dataset:
    item = Dataset()
    item.CodeValue, item.CodingSchemeDesignator, item.CodeMeaning = value, scheme, meaning
    return item


def mpps_create(study: SyntheticStudy, *, station_ae: str) -> Dataset:
    """The N-CREATE attribute list (PS3.4 Table F.7.2-1), IN PROGRESS."""
    step = Dataset()
    step.StudyInstanceUID = study.study_uid
    step.ReferencedStudySequence = []
    step.AccessionNumber = study.accession
    step.RequestedProcedureID = f"RP{study.accession}"
    step.RequestedProcedureDescription = study.procedure.display
    step.ScheduledProcedureStepID = "SPS1"
    step.ScheduledProcedureStepDescription = study.procedure.display
    step.ScheduledProtocolCodeSequence = []
    ds = Dataset()
    ds.SpecificCharacterSet = "ISO_IR 192"
    ds.ScheduledStepAttributesSequence = [step]
    ds.PatientName = "TESTPATIENT^ALICE"
    ds.PatientID = study.nhs_number
    ds.IssuerOfPatientID = "NHS"
    ds.PatientBirthDate = "19700101"
    ds.PatientSex = "F"
    ds.PerformedProcedureStepID = f"PPS{study.accession}"
    ds.PerformedStationAETitle = station_ae
    ds.PerformedStationName = station_ae
    ds.PerformedLocation = "RADIOLOGY"
    ds.PerformedProcedureStepStartDate = study.started.strftime("%Y%m%d")
    ds.PerformedProcedureStepStartTime = study.started.strftime("%H%M%S")
    ds.PerformedProcedureStepStatus = "IN PROGRESS"
    ds.PerformedProcedureStepDescription = study.procedure.display
    ds.PerformedProcedureTypeDescription = ""
    ds.ProcedureCodeSequence = [_code(study.procedure.code, "NICIP", study.procedure.display or "")]
    ds.PerformedProcedureStepEndDate = None
    ds.PerformedProcedureStepEndTime = None
    ds.Modality = study.modality
    ds.StudyID = "1"
    ds.PerformedProtocolCodeSequence = []
    ds.PerformedSeriesSequence = []
    return ds


def mpps_set_completed(study: SyntheticStudy, *, series: int = 2, images: int = 10) -> Dataset:
    """The final N-SET: COMPLETED with the performed series and their images."""
    items = []
    for number in range(series):
        item = Dataset()
        item.SeriesInstanceUID = (
            study.series[number].uid if number < len(study.series) else generate_uid()
        )
        item.ProtocolName = study.procedure.display
        item.PerformingPhysicianName = ""
        item.OperatorsName = "RADIOGRAPHER^RAY"
        item.SeriesDescription = f"Series {number + 1}"
        item.RetrieveAETitle = "PACS"
        refs = []
        for _ in range(images):
            ref = Dataset()
            ref.ReferencedSOPClassUID = CT_IMAGE_STORAGE
            ref.ReferencedSOPInstanceUID = generate_uid()
            refs.append(ref)
        item.ReferencedImageSequence = refs
        item.ReferencedNonImageCompositeSOPInstanceSequence = []
        items.append(item)
    ds = Dataset()
    ds.PerformedProcedureStepStatus = "COMPLETED"
    end = study.started + timedelta(minutes=20)
    ds.PerformedProcedureStepEndDate = end.strftime("%Y%m%d")
    ds.PerformedProcedureStepEndTime = end.strftime("%H%M%S")
    ds.PerformedSeriesSequence = items
    return ds
