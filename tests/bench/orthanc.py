"""Real Orthanc servers (Debian packages `orthanc` and `orthanc-dicomweb`) as the trusts' PACS.

Each server gets its own configuration, storage and index directory under a temporary
directory, a free HTTP port on loopback, the DICOMweb plugin, no authentication and no DICOM
listener. The benchmark starts them, loads them with minimal DICOM instances (one per study)
over the REST API, queries them over QIDO-RS, and stops them.
"""

from __future__ import annotations

import asyncio
import io
import json
import shutil
import socket
import subprocess
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import httpx
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from tests.bench.datagen import SyntheticStudy

ORTHANC = shutil.which("Orthanc") or "/usr/sbin/Orthanc"
DICOMWEB_PLUGIN_DIRS = ("/usr/share/orthanc/plugins", "/usr/lib/orthanc")
DICOMWEB_ROOT = "/dicom-web/"
START_TIMEOUT_S = 60.0

# SOP classes a modality would store (PS3.4 Annex B), so QIDO answers look like a PACS's.
SOP_CLASS = {
    "CT": "1.2.840.10008.5.1.4.1.1.2",
    "MR": "1.2.840.10008.5.1.4.1.1.4",
    "US": "1.2.840.10008.5.1.4.1.1.6.1",
    "DX": "1.2.840.10008.5.1.4.1.1.1.1",
    "CR": "1.2.840.10008.5.1.4.1.1.1",
    "MG": "1.2.840.10008.5.1.4.1.1.1.2",
    "NM": "1.2.840.10008.5.1.4.1.1.20",
    "RF": "1.2.840.10008.5.1.4.1.1.12.2",
    "PT": "1.2.840.10008.5.1.4.1.1.128",
}


def dicomweb_plugin() -> str:
    for folder in DICOMWEB_PLUGIN_DIRS:
        for path in sorted(Path(folder).glob("libOrthancDicomWeb.so*")):
            return str(path)
    raise FileNotFoundError("orthanc-dicomweb is not installed (apt-get install orthanc-dicomweb)")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class OrthancServer:
    name: str
    root: Path
    port: int = 0
    process: subprocess.Popen[bytes] | None = None
    log: Path = field(init=False)

    def __post_init__(self) -> None:
        self.log = self.root / "orthanc.log"

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def dicomweb(self) -> str:
        return f"{self.base}{DICOMWEB_ROOT.rstrip('/')}"

    def write_config(self) -> Path:
        self.root.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        config = {
            "Name": self.name,
            "StorageDirectory": str(self.root / "storage"),
            "IndexDirectory": str(self.root / "index"),
            "HttpPort": self.port,
            "RemoteAccessAllowed": False,
            "AuthenticationEnabled": False,
            "DicomServerEnabled": False,
            "Plugins": [dicomweb_plugin()],
            "DicomWeb": {"Enable": True, "Root": DICOMWEB_ROOT, "EnableWado": False},
            "StorageCompression": False,
            "HttpCompressionEnabled": False,
            "HttpThreadsCount": 16,
            "ConcurrentJobs": 1,
            "SaveJobs": False,
            "KeepAlive": True,
            "TcpNoDelay": True,
            # Answer QIDO from the index database, not by reading files: the fastest setting,
            # so the federation is not handicapped (Orthanc's default reads every answer).
            "StorageAccessOnFind": "Never",
            "LimitFindResults": 0,
        }
        path = self.root / "orthanc.json"
        path.write_text(json.dumps(config, indent=1))
        return path

    def start(self) -> None:
        config = self.write_config()
        with self.log.open("wb") as out:
            self.process = subprocess.Popen(
                [ORTHANC, str(config)], stdout=out, stderr=subprocess.STDOUT
            )

    def wait_ready(self, deadline: float) -> None:
        while time.monotonic() < deadline:
            if self.process is not None and self.process.poll() is not None:
                raise RuntimeError(f"Orthanc {self.name} exited: see {self.log}")
            try:
                if httpx.get(f"{self.base}/system", timeout=1.0).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        raise TimeoutError(f"Orthanc {self.name} not ready: see {self.log}")

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


class OrthancCluster:
    """N Orthanc servers, started together and stopped together (a context manager)."""

    def __init__(self, count: int, root: Path) -> None:
        self.servers = [OrthancServer(f"PACS{i:02d}", root / f"pacs{i:02d}") for i in range(count)]

    def __enter__(self) -> OrthancCluster:
        try:
            for server in self.servers:
                server.start()
            deadline = time.monotonic() + START_TIMEOUT_S
            for server in self.servers:
                server.wait_ready(deadline)
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stop(self) -> None:
        for server in self.servers:
            server.stop()


def dicom_instance(study: SyntheticStudy) -> bytes:
    """A minimal DICOM instance (no pixel data) carrying the study's identifiers."""
    meta = FileMetaDataset()
    sop_class = SOP_CLASS.get(study.modality, "1.2.840.10008.5.1.4.1.1.7")
    sop_instance = generate_uid()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = sop_instance
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = sop_instance
    ds.PatientID = study.nhs_number
    ds.IssuerOfPatientID = "NHS"
    ds.PatientName = "SYNTHETIC^PATIENT"
    ds.StudyInstanceUID = study.study_uid or generate_uid()
    ds.SeriesInstanceUID = study.series[0].uid if study.series else generate_uid()
    ds.StudyDate = study.started.strftime("%Y%m%d")
    ds.StudyTime = study.started.strftime("%H%M%S")
    ds.AccessionNumber = study.accession
    ds.Modality = study.modality
    ds.StudyDescription = study.procedure.display or study.procedure.code
    ds.ReferringPhysicianName = ""
    ds.StudyID = "1"
    ds.SeriesNumber = 1
    ds.InstanceNumber = 1
    out = io.BytesIO()
    ds.save_as(out, enforce_file_format=True)
    return out.getvalue()


async def _upload(client: httpx.AsyncClient, url: str, queue: asyncio.Queue[bytes]) -> int:
    sent = 0
    while True:
        try:
            body = queue.get_nowait()
        except asyncio.QueueEmpty:
            return sent
        response = await client.post(
            url, content=body, headers={"Content-Type": "application/dicom"}
        )
        response.raise_for_status()
        sent += 1


async def load_server(server: OrthancServer, instances: Sequence[bytes], *, workers: int) -> int:
    queue: asyncio.Queue[bytes] = asyncio.Queue()
    for body in instances:
        queue.put_nowait(body)
    limits = httpx.Limits(max_connections=workers, max_keepalive_connections=workers)
    async with httpx.AsyncClient(limits=limits, timeout=60.0) as client:
        counts = await asyncio.gather(
            *(_upload(client, f"{server.base}/instances", queue) for _ in range(workers))
        )
    return sum(counts)


async def load_cluster(
    cluster: OrthancCluster, placement: Iterable[tuple[int, bytes]], *, workers: int = 4
) -> int:
    """Upload (server index, instance) pairs, every server in parallel."""
    per_server: dict[int, list[bytes]] = {}
    for index, body in placement:
        per_server.setdefault(index, []).append(body)
    counts = await asyncio.gather(
        *(
            load_server(cluster.servers[i], bodies, workers=workers)
            for i, bodies in per_server.items()
        )
    )
    return sum(counts)
