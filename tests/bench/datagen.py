"""Realistic synthetic data for the benchmarks: trusts with their feeds, patients with valid
NHS Numbers from the 999 test range, and studies spread over ten years.

The mix follows the shape of English imaging activity (NHS England Diagnostic Imaging
Dataset: plain radiography is about half of all tests, then ultrasound, CT and MR): DX/CR 45%,
US 20%, CT 15%, MR 10%, MG 5%, NM/RF/PT 5%. Studies per patient are skewed: most patients
have 1-3, a few have 40 or more. About 5% of studies are known only from the report feed
(no Study UID, no series), ~3% are registered or cancelled. Everything is seeded: the same
arguments give the same data.

One `SyntheticStudy` feeds every consumer: `notices_of` for the bulk loader, the ORU text and
MPPS datasets in `messages.py`, and the DICOM instances loaded into Orthanc in `fanout.py`.
"""

from __future__ import annotations

import random
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from locator.core.nhs_number import NhsNumber, check_digit
from locator.core.notice import (
    Coding,
    FeedKind,
    PatientRef,
    ReportStatus,
    SeriesRef,
    StudyNotice,
    StudyRef,
    StudyStatus,
)
from locator.trusts import TrustConfig

NICIP_SYSTEM = "https://nicip.nhs.uk"
TEST_RANGE_FIRST = 999_000_000  # first nine digits of the 999 test range
TEST_RANGE_LAST = 999_999_998  # 9999999999 is a placeholder

# (modality, share, procedures (NICIP-style code, display), series range, instances range)
MODALITY_MIX: tuple[
    tuple[str, float, tuple[tuple[str, str], ...], tuple[int, int], tuple[int, int]], ...
] = (
    (
        "DX",
        0.37,
        (
            ("XCHES", "XR Chest"),
            ("XKNEL", "XR Knee Lt"),
            ("XABDO", "XR Abdomen"),
            ("XHANR", "XR Hand Rt"),
            ("XLSPI", "XR Lumbar spine"),
        ),
        (1, 3),
        (1, 2),
    ),
    ("CR", 0.08, (("XCHES", "XR Chest"), ("XPELV", "XR Pelvis")), (1, 2), (1, 2)),
    (
        "US",
        0.20,
        (
            ("UABDO", "US Abdomen"),
            ("UOBST", "US Obstetric"),
            ("UPELV", "US Pelvis"),
            ("UNECK", "US Neck"),
        ),
        (1, 2),
        (8, 60),
    ),
    (
        "CT",
        0.15,
        (
            ("CHEAD", "CT Head"),
            ("CCHAPC", "CT Chest abdomen pelvis with contrast"),
            ("CTHOR", "CT Thorax"),
            ("CABDO", "CT Abdomen"),
        ),
        (2, 6),
        (40, 400),
    ),
    (
        "MR",
        0.10,
        (
            ("MBRAI", "MR Brain"),
            ("MKNEL", "MR Knee Lt"),
            ("MLSPI", "MR Lumbar spine"),
            ("MPROS", "MR Prostate"),
        ),
        (4, 12),
        (20, 200),
    ),
    ("MG", 0.05, (("XMAMB", "Mammography bilateral"),), (4, 4), (1, 1)),
    ("NM", 0.02, (("NBONE", "NM Bone scan whole body"),), (1, 3), (1, 10)),
    ("RF", 0.02, (("FBASW", "Fluoroscopy barium swallow"),), (1, 3), (5, 40)),
    ("PT", 0.01, (("PWBOD", "PET-CT whole body"),), (3, 5), (200, 600)),
)

# (share of patients, (low, high) studies each): mean about 3.6 studies per patient.
STUDIES_PER_PATIENT = (
    (0.45, (1, 1)),
    (0.20, (2, 2)),
    (0.12, (3, 3)),
    (0.12, (4, 6)),
    (0.08, (7, 15)),
    (0.025, (16, 39)),
    (0.005, (40, 100)),
)

YEARS = 10
END = datetime(2026, 11, 1, tzinfo=UTC)
RIS_APP = "CRIS"


@dataclass(frozen=True, slots=True)
class SyntheticStudy:
    trust_ods: str
    nhs_number: NhsNumber
    mrn: str
    study_uid: str | None
    accession: str
    started: datetime
    modality: str
    procedure: Coding
    series: tuple[SeriesRef, ...]
    report_status: ReportStatus | None
    status: StudyStatus
    pps_uid: str | None  # the MPPS step (None: report feed only)
    received_at: datetime


def valid_nhs_numbers(start: int = TEST_RANGE_FIRST) -> Iterator[NhsNumber]:
    """Every valid 999-range NHS Number in order (about 909,000 of them)."""
    for prefix in range(start, TEST_RANGE_LAST + 1):
        first_nine = str(prefix)
        digit = check_digit(first_nine)
        if digit is not None:
            yield NhsNumber(first_nine + str(digit))


def ods_code(index: int) -> str:
    return f"ZZ{index:03d}"  # fictitious: no ODS code starts with ZZ


def make_trusts(count: int, *, dicomweb_urls: list[str] | None = None) -> list[TrustConfig]:
    """`count` trusts, each with a RIS facility and four modality AE titles."""
    trusts = []
    for i in range(count):
        ods = ods_code(i)
        host = f"pacs.{ods.lower()}.example"
        trusts.append(
            TrustConfig(
                ods_code=ods,
                name=f"Synthetic Trust {i:03d} NHS Foundation Trust",
                viewer_url=f"https://{host}/iid?requestType=STUDY&studyUID={{study_uid}}",
                viewer_url_by_accession=(
                    f"https://{host}/iid?requestType=STUDY&accessionNumber={{accession}}"
                ),
                dicomweb_url=dicomweb_urls[i] if dicomweb_urls else f"https://{host}/dicom-web",
                hl7_sending_facilities=(ods,),
                dicom_ae_titles=tuple(f"{ods}{m}1" for m in ("CT", "MR", "DX", "US")),
                accession_system=f"urn:locator:accession:{ods}",
            )
        )
    return trusts


def _uid(rng: random.Random) -> str:
    return f"2.25.{rng.getrandbits(122)}"


def _weighted(rng: random.Random, shares: list[float]) -> int:
    x = rng.random() * sum(shares)
    for i, share in enumerate(shares):
        x -= share
        if x < 0:
            return i
    return len(shares) - 1


class Generator:
    """Seeded patients and studies over `trusts`; `studies(n)` yields exactly n studies.

    Patients take the valid test-range NHS Numbers in order. Once the range is used up
    (about 3.3 million studies from its start) the numbers are taken again from the start:
    a further study goes to a patient already made, as another episode (another home trust
    and local id), so past that size patients have more studies each (about 11 at 10
    million); `patients` lists each patient once."""

    def __init__(
        self,
        trusts: list[TrustConfig],
        *,
        seed: int = 1,
        nhs_start: int = 0,
        accession_start: int = 0,
    ) -> None:
        self.trusts = [t.ods_code for t in trusts]
        self.rng = random.Random(seed)
        self.numbers = self._numbers(TEST_RANGE_FIRST + nhs_start)
        self.wrapped = False
        self.patients: list[NhsNumber] = []
        self._accession = accession_start
        self._mix_shares = [m[1] for m in MODALITY_MIX]
        self._spp_shares = [s[0] for s in STUDIES_PER_PATIENT]

    def studies(self, count: int) -> Iterator[SyntheticStudy]:
        made = 0
        while made < count:
            nhs = next(self.numbers)
            if not self.wrapped:
                self.patients.append(nhs)
            low, high = STUDIES_PER_PATIENT[_weighted(self.rng, self._spp_shares)][1]
            wanted = min(self.rng.randint(low, high), count - made)
            home = self.rng.randrange(len(self.trusts))
            mrn = f"M{self.rng.randrange(10**7):07d}"
            for _ in range(wanted):
                yield self._study(nhs, mrn, home)
            made += wanted

    def _numbers(self, start: int) -> Iterator[NhsNumber]:
        yield from valid_nhs_numbers(start)
        self.wrapped = True
        while True:
            yield from valid_nhs_numbers(TEST_RANGE_FIRST)

    def _study(self, nhs: NhsNumber, mrn: str, home: int) -> SyntheticStudy:
        rng = self.rng
        # 85% at the patient's home trust, the rest anywhere (referrals, A&E elsewhere).
        trust = self.trusts[home if rng.random() < 0.85 else rng.randrange(len(self.trusts))]
        modality, _, procedures, series_range, instance_range = MODALITY_MIX[
            _weighted(rng, self._mix_shares)
        ]
        code, display = rng.choice(procedures)
        # Activity grows over the decade: later years are denser (sqrt skew).
        age = timedelta(days=YEARS * 365 * (1 - rng.random() ** 0.7))
        started = (END - age).replace(microsecond=0)
        self._accession += 1
        accession = f"{trust}{self._accession:09d}"
        report_only = rng.random() < 0.05
        roll = rng.random()
        status = StudyStatus.AVAILABLE
        report: ReportStatus | None = ReportStatus.FINAL
        if roll < 0.02:
            status, report = StudyStatus.REGISTERED, None
        elif roll < 0.03:
            status, report = StudyStatus.CANCELLED, None
        elif roll < 0.06:
            report = ReportStatus.PRELIMINARY
        elif roll < 0.10:
            report = None
        series: tuple[SeriesRef, ...] = ()
        if not report_only and status is StudyStatus.AVAILABLE:
            series = tuple(
                SeriesRef(
                    uid=_uid(rng),
                    modality=modality,
                    number_of_instances=rng.randint(*instance_range),
                )
                for _ in range(rng.randint(*series_range))
            )
        return SyntheticStudy(
            trust_ods=trust,
            nhs_number=nhs,
            mrn=mrn,
            study_uid=None if report_only else _uid(rng),
            accession=accession,
            started=started,
            modality=modality,
            procedure=Coding(NICIP_SYSTEM, code, display),
            series=series,
            report_status=report,
            status=status,
            pps_uid=None if report_only else _uid(rng),
            received_at=started + timedelta(minutes=rng.randint(5, 600)),
        )


def notices_of(study: SyntheticStudy) -> tuple[StudyNotice, ...]:
    """The notices the two feeds would have sent about the study (for the bulk loader)."""
    patient = PatientRef(
        nhs_number=study.nhs_number, local_id=study.mrn, local_namespace=study.trust_ods
    )
    notices = []
    if study.pps_uid is not None:
        mpps_status = (
            StudyStatus.AVAILABLE
            if study.series
            else StudyStatus.CANCELLED
            if study.status is StudyStatus.CANCELLED
            else StudyStatus.REGISTERED
        )
        notices.append(
            StudyNotice(
                trust_ods=study.trust_ods,
                feed=FeedKind.MPPS,
                source=f"mpps:{study.pps_uid}",
                patient=patient,
                received_at=study.started + timedelta(minutes=1),
                studies=(
                    StudyRef(
                        study_uid=study.study_uid,
                        accession=study.accession,
                        modalities=(study.modality,),
                        procedure=study.procedure,
                        started=study.started,
                        status=mpps_status,
                        series=study.series,
                        series_version=1,
                    ),
                ),
            )
        )
    if study.report_status is not None or study.pps_uid is None:
        notices.append(
            StudyNotice(
                trust_ods=study.trust_ods,
                feed=FeedKind.HL7,
                source=f"hl7:{RIS_APP}",
                patient=patient,
                received_at=study.received_at,
                studies=(
                    StudyRef(
                        study_uid=study.study_uid,
                        accession=study.accession,
                        modalities=(study.modality,),
                        procedure=study.procedure,
                        started=study.started,
                        status=study.status,
                        report_status=study.report_status,
                        report_time=study.received_at,
                        report_hash=f"{zlib.crc32(study.accession.encode()):08x}",
                    ),
                ),
            )
        )
    return tuple(notices)
