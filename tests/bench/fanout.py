"""The alternative, measured: ask every trust's PACS (a federated query) instead of the index.

The same synthetic studies are placed on 1, 4 and 16 real Orthanc servers (trust i on server
i mod N) and loaded into the locator. For the same random patients, one client asks either
every PACS in parallel over QIDO-RS (`/dicom-web/studies?PatientID=...`, answered when the
slowest PACS has answered) or the locator once (`POST /fhir/ImagingStudy/_search`); both are
sequential, one patient at a time, over warm keep-alive connections from httpx.

Loopback flatters the federation: no network round trips (tens of ms between real sites),
no TLS, no PACS that is down or slow, and every PACS here keeps the NHS Number as Patient ID
(real ones mostly hold local MRNs). On the other hand 16 Orthanc servers share two cores with
the client.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import httpx

from tests.bench.datagen import SyntheticStudy
from tests.bench.ingest import percentile
from tests.bench.orthanc import OrthancCluster, dicom_instance, load_cluster
from tests.bench.search import SEARCH_PATH, search_body

QIDO_ACCEPT = {"Accept": "application/dicom+json"}


@dataclass(frozen=True)
class Latency:
    p50_ms: float
    p95_ms: float
    p99_ms: float
    mean_ms: float
    count: int

    @classmethod
    def of(cls, values: Sequence[float]) -> Latency:
        return cls(
            percentile(values, 50),
            percentile(values, 95),
            percentile(values, 99),
            sum(values) / len(values),
            len(values),
        )


async def _fan_out(client: httpx.AsyncClient, bases: Sequence[str], nhs: str) -> int:
    responses = await asyncio.gather(
        *(client.get(f"{b}/studies", params={"PatientID": nhs}, headers=QIDO_ACCEPT) for b in bases)
    )
    found = 0
    for response in responses:
        response.raise_for_status()
        found += len(response.json()) if response.content else 0
    return found


async def fan_out_latencies(
    bases: Sequence[str], patients: Sequence[str], expected: dict[str, int]
) -> tuple[list[float], int]:
    """Per patient: the time until every PACS has answered; and how many answers were
    incomplete (a check that the federation finds what was loaded)."""
    limits = httpx.Limits(max_connections=4 * len(bases), max_keepalive_connections=4 * len(bases))
    times, wrong = [], 0
    async with httpx.AsyncClient(limits=limits, timeout=60.0) as client:
        for nhs in patients[:5]:  # warm every connection
            await _fan_out(client, bases, nhs)
        for nhs in patients:
            t0 = time.perf_counter()
            found = await _fan_out(client, bases, nhs)
            times.append((time.perf_counter() - t0) * 1000)
            wrong += found != expected.get(nhs, 0)
    return times, wrong


async def locator_latencies(base: str, patients: Sequence[str]) -> list[float]:
    times = []
    async with httpx.AsyncClient(base_url=base, timeout=60.0) as client:
        for nhs in patients[:5]:
            (await client.post(SEARCH_PATH, data=search_body(nhs, include=True))).raise_for_status()
        for nhs in patients:
            t0 = time.perf_counter()
            response = await client.post(SEARCH_PATH, data=search_body(nhs, include=True))
            times.append((time.perf_counter() - t0) * 1000)
            response.raise_for_status()
    return times


@dataclass(frozen=True)
class FanoutRow:
    pacs: int
    studies: int
    load_seconds: float
    fan_out: Latency
    incomplete: int

    def as_dict(self, locator: Latency) -> dict[str, object]:
        return {
            "pacs": self.pacs,
            "studies": self.studies,
            "load_seconds": round(self.load_seconds, 1),
            "load_instances_per_second": round(self.studies / self.load_seconds, 1),
            "fan_out": self.fan_out.__dict__,
            "incomplete_answers": self.incomplete,
            "ratio_p50": locator.p50_ms / self.fan_out.p50_ms,
            "ratio_p95": locator.p95_ms / self.fan_out.p95_ms,
        }


def measure_fanout(
    studies: Sequence[SyntheticStudy],
    trust_codes: Sequence[str],
    patients: Sequence[str],
    pacs_counts: Sequence[int],
    workdir: Path,
    log: object = print,
) -> list[FanoutRow]:
    """Load the studies with images onto N Orthanc servers for each N, and time the fan-out."""
    imaged = [s for s in studies if s.study_uid]
    index_of = {code: i for i, code in enumerate(trust_codes)}
    bodies = [(index_of[s.trust_ods], dicom_instance(s)) for s in imaged]
    expected: dict[str, int] = {}
    for s in imaged:
        expected[s.nhs_number] = expected.get(s.nhs_number, 0) + 1
    rows = []
    for count in pacs_counts:
        with OrthancCluster(count, workdir / f"orthanc-{count}") as cluster:
            t0 = time.perf_counter()
            loaded = asyncio.run(
                load_cluster(cluster, ((i % count, body) for i, body in bodies), workers=4)
            )
            load_seconds = time.perf_counter() - t0
            log(f"  {count} Orthanc: {loaded} instances loaded in {load_seconds:.1f} s")  # type: ignore[operator]
            bases = [s.dicomweb for s in cluster.servers]
            times, wrong = asyncio.run(fan_out_latencies(bases, patients, expected))
        rows.append(FanoutRow(count, loaded, load_seconds, Latency.of(times), wrong))
    return rows
