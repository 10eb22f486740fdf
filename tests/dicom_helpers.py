"""A modality for tests and benchmarks: pynetdicom as the MPPS SCU (the independent client).

`mpps_create` / `mpps_set` build realistic N-CREATE and N-SET datasets (PS3.4 Table F.7.2-1);
`Modality` is one association with helpers that return plain status values; `run_pairs`
drives N-CREATE + N-SET pairs over several concurrent associations and reports throughput
(reusable by tests/bench).

`nodelay=True` sets TCP_NODELAY on the SCU's socket once the association is up (pynetdicom
has no option for it); leave it False to see what a modality with default sockets sees.
"""

from __future__ import annotations

import asyncio
import itertools
import socket
import threading
import time
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any
from unittest import mock

import pynetdicom.association
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence as DicomSequence
from pydicom.uid import generate_uid
from pynetdicom import AE
from pynetdicom.sop_class import ModalityPerformedProcedureStep, Verification

from ingest.dicom_listener import DicomListener, start_dicom

MPPS = ModalityPerformedProcedureStep
NHS_OID = "2.16.840.1.113883.2.1.4.1"
CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"


@dataclass(frozen=True)
class Answer:
    """A DIMSE response as plain values (status -1: no response, the association died)."""

    status: int
    comment: str | None = None
    error_id: int | None = None


def _answer(status_ds: Dataset) -> Answer:
    if "Status" not in status_ds:
        return Answer(-1)
    return Answer(
        int(status_ds.Status),
        str(status_ds.ErrorComment) if "ErrorComment" in status_ds else None,
        int(status_ds.ErrorID) if "ErrorID" in status_ds else None,
    )


_accessions = itertools.count(1)


def next_accession() -> str:
    """A fresh accession number (SH: at most 16 characters)."""
    return f"A{next(_accessions):06d}{uuid.uuid4().hex[:6]}"


def scheduled_item(study_uid: str, accession: str | None) -> Dataset:
    item = Dataset()
    item.StudyInstanceUID = study_uid
    item.AccessionNumber = accession or ""
    item.ReferencedStudySequence = DicomSequence([])
    item.RequestedProcedureID = "RP1"
    item.RequestedProcedureDescription = "CT head"
    item.ScheduledProcedureStepID = "SPS1"
    item.ScheduledProcedureStepDescription = "CT head"
    item.ScheduledProtocolCodeSequence = DicomSequence([])
    return item


def mpps_create(
    *,
    patient_id: str = "9990000018",
    issuer: str | None = "NHS",
    studies: Sequence[tuple[str, str | None]] = (),
    modality: str = "CT",
    start_date: str = "20261128",
    start_time: str = "101500",
    status: str = "IN PROGRESS",
    other_ids: Sequence[tuple[str, str | None]] = (),
    timezone_offset: str | None = None,
) -> Dataset:
    """An N-CREATE attribute list; `studies` are (Study UID, accession) items (default: one
    fresh study with a fresh accession)."""
    ds = Dataset()
    ds.SpecificCharacterSet = "ISO_IR 100"
    items = studies or [(generate_uid(), next_accession())]
    ds.ScheduledStepAttributesSequence = DicomSequence(
        [scheduled_item(uid, acc) for uid, acc in items]
    )
    ds.PatientName = "TEST^PATIENT"
    ds.PatientID = patient_id
    if issuer is not None:
        ds.IssuerOfPatientID = issuer
    if other_ids:
        seq = []
        for value, other_issuer in other_ids:
            item = Dataset()
            item.PatientID = value
            if other_issuer:
                item.IssuerOfPatientID = other_issuer
            item.TypeOfPatientID = "TEXT"
            seq.append(item)
        ds.OtherPatientIDsSequence = DicomSequence(seq)
    ds.PatientBirthDate = "19700101"
    ds.PatientSex = "O"
    ds.PerformedProcedureStepID = "PPS1"
    ds.PerformedStationAETitle = "RZZ01CT1"
    ds.PerformedStationName = "CT1"
    ds.PerformedLocation = "Room 1"
    ds.PerformedProcedureStepStartDate = start_date
    ds.PerformedProcedureStepStartTime = start_time
    ds.PerformedProcedureStepStatus = status
    ds.PerformedProcedureStepDescription = "CT head"
    ds.PerformedProcedureTypeDescription = ""
    ds.ProcedureCodeSequence = DicomSequence([])
    ds.PerformedProcedureStepEndDate = ""
    ds.PerformedProcedureStepEndTime = ""
    ds.Modality = modality
    ds.StudyID = "1"
    ds.PerformedProtocolCodeSequence = DicomSequence([])
    ds.PerformedSeriesSequence = DicomSequence([])
    if timezone_offset is not None:
        ds.TimezoneOffsetFromUTC = timezone_offset
    return ds


def series_item(uid: str | None = None, *, images: int = 10, non_images: int = 0) -> Dataset:
    item = Dataset()
    item.SeriesInstanceUID = uid or generate_uid()
    item.ProtocolName = "Head"
    item.PerformingPhysicianName = ""
    item.OperatorsName = ""
    item.SeriesDescription = "Axial"
    item.RetrieveAETitle = ""
    refs = []
    for _ in range(images):
        ref = Dataset()
        ref.ReferencedSOPClassUID = CT_IMAGE_STORAGE
        ref.ReferencedSOPInstanceUID = generate_uid()
        refs.append(ref)
    item.ReferencedImageSequence = DicomSequence(refs)
    others = []
    for _ in range(non_images):
        ref = Dataset()
        ref.ReferencedSOPClassUID = "1.2.840.10008.5.1.4.1.1.88.67"
        ref.ReferencedSOPInstanceUID = generate_uid()
        others.append(ref)
    item.ReferencedNonImageCompositeSOPInstanceSequence = DicomSequence(others)
    return item


def mpps_set(
    *,
    status: str = "COMPLETED",
    series: Sequence[Dataset] | None = None,
    end_date: str = "20261128",
    end_time: str = "103000",
    reason_code: str | None = None,
) -> Dataset:
    """An N-SET modification list: final status, end time and the complete series list
    (default: two series of 10 images)."""
    ds = Dataset()
    ds.PerformedProcedureStepStatus = status
    ds.PerformedProcedureStepEndDate = end_date
    ds.PerformedProcedureStepEndTime = end_time
    ds.PerformedSeriesSequence = DicomSequence(
        list(series) if series is not None else [series_item(), series_item()]
    )
    if reason_code is not None:
        code = Dataset()
        code.CodeValue = reason_code
        code.CodingSchemeDesignator = "DCM"
        code.CodeMeaning = "Incorrect worklist entry selected"
        ds.PerformedProcedureStepDiscontinuationReasonCodeSequence = DicomSequence([code])
    return ds


def set_nodelay(assoc: Any) -> None:
    sock = assoc.dul.socket.socket
    if sock is not None:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


@contextmanager
def _raw_encoding(raw: bytes) -> Iterator[None]:
    """pynetdicom encodes the dataset in the sending thread: answer `raw` there only, so
    other associations in the same process keep encoding normally."""
    original = pynetdicom.association.encode
    sender = threading.current_thread()

    def encode(*args: Any, **kwargs: Any) -> Any:
        if threading.current_thread() is sender:
            return raw
        return original(*args, **kwargs)

    with mock.patch("pynetdicom.association.encode", encode):
        yield


class AssociationRejectedError(RuntimeError):
    pass


class Modality:
    """One association from a modality (calling AE title) to the locator."""

    def __init__(
        self,
        port: int,
        *,
        ae_title: str = "RZZ01CT1",
        nodelay: bool = True,
        host: str = "127.0.0.1",
        called: str = "LOCATOR",
        tls: tuple[Any, str] | None = None,
    ) -> None:
        self.ae = AE(ae_title=ae_title)
        self.ae.add_requested_context(MPPS)
        self.ae.add_requested_context(Verification)
        self.ae.acse_timeout = self.ae.dimse_timeout = self.ae.network_timeout = 20
        self.assoc = self.ae.associate(host, port, ae_title=called, tls_args=tls)
        if not self.assoc.is_established:
            raise AssociationRejectedError(f"association from {ae_title} not established")
        if nodelay:
            set_nodelay(self.assoc)

    def echo(self) -> Answer:
        if not self.assoc.is_established:
            return Answer(-1)
        return _answer(self.assoc.send_c_echo())

    def create(self, ds: Dataset | None, uid: str | None) -> Answer:
        status, _ = self.assoc.send_n_create(ds, MPPS, uid)
        return _answer(status)

    def set(self, ds: Dataset, uid: str) -> Answer:
        status, _ = self.assoc.send_n_set(ds, MPPS, uid)
        return _answer(status)

    def create_raw(self, raw: bytes, uid: str) -> Answer:
        """An N-CREATE whose attribute list is `raw` bytes, as a broken modality sends it."""
        with _raw_encoding(raw):
            return self.create(Dataset(), uid)

    def set_raw(self, raw: bytes, uid: str) -> Answer:
        with _raw_encoding(raw):
            return self.set(Dataset(), uid)

    @property
    def alive(self) -> bool:
        return bool(self.assoc.is_established)

    def close(self) -> None:
        if self.assoc.is_established:
            self.assoc.release()


@contextmanager
def modality(port: int, **kwargs: Any) -> Iterator[Modality]:
    m = Modality(port, **kwargs)
    try:
        yield m
    finally:
        m.close()


def rejected(port: int, ae_title: str, **kwargs: Any) -> bool:
    """True when the locator refuses the association with A-ASSOCIATE-RJ."""
    ae = AE(ae_title=ae_title)
    ae.add_requested_context(Verification)
    assoc = ae.associate("127.0.0.1", port, ae_title="LOCATOR", **kwargs)
    if assoc.is_established:
        assoc.release()
    return bool(assoc.is_rejected)


@dataclass
class PairRun:
    """The result of run_pairs: pairs committed, seconds, per-pair latencies (seconds)."""

    pairs: int
    seconds: float
    latencies: list[float] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)

    @property
    def rate(self) -> float:
        return self.pairs / self.seconds if self.seconds else 0.0

    def percentile(self, p: float) -> float:
        ordered = sorted(self.latencies)
        return ordered[min(len(ordered) - 1, int(p / 100 * len(ordered)))] if ordered else 0.0


def run_pairs(
    port: int,
    *,
    pairs: int,
    associations: int = 8,
    nodelay: bool = True,
    ae_title: str = "RZZ01CT1",
    images: int = 10,
) -> PairRun:
    """N-CREATE + N-SET COMPLETED pairs spread over concurrent associations, one fresh
    study per pair; every answer must be success."""
    per = [
        pairs // associations + (1 if i < pairs % associations else 0) for i in range(associations)
    ]
    run = PairRun(pairs=0, seconds=0.0)
    lock = threading.Lock()
    barrier = threading.Barrier(associations + 1)

    def worker(count: int) -> None:
        m = Modality(port, ae_title=ae_title, nodelay=nodelay)
        creates = [
            (generate_uid(), mpps_create(), mpps_set(series=[series_item(images=images)]))
            for _ in range(count)
        ]
        barrier.wait()
        try:
            for uid, create, final in creates:
                t0 = time.perf_counter()
                a, b = m.create(create, uid), m.set(final, uid)
                elapsed = time.perf_counter() - t0
                with lock:
                    if a.status == 0 and b.status == 0:
                        run.pairs += 1
                        run.latencies.append(elapsed)
                    else:
                        run.failures.append(f"{a} {b}")
        except RuntimeError as exc:  # the association died
            with lock:
                run.failures.append(f"association lost: {exc}")
        finally:
            m.close()

    threads = [threading.Thread(target=worker, args=(n,)) for n in per if n]
    for t in threads:
        t.start()
    barrier_parties = len(threads)
    if barrier_parties < associations:  # fewer pairs than associations
        for _ in range(associations - barrier_parties):
            threading.Thread(target=barrier.wait).start()
    barrier.wait()
    start = time.perf_counter()
    for t in threads:
        t.join()
    run.seconds = time.perf_counter() - start
    return run


@contextmanager
def running_listener(settings: Any, **kwargs: Any) -> Iterator[DicomListener]:
    """The MPPS listener on its own event loop thread (tests are synchronous); stopped on exit.
    kwargs go to start_dicom (session_factory, registry, sweep_interval)."""
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, name="dicom-test-loop", daemon=True)
    thread.start()
    try:
        listener = asyncio.run_coroutine_threadsafe(start_dicom(settings, **kwargs), loop).result(
            timeout=30
        )
        try:
            yield listener
        finally:
            asyncio.run_coroutine_threadsafe(listener.stop(), loop).result(timeout=60)
    finally:
        loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout=10)
        loop.close()
