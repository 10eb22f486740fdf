"""Search load: Debian's wrk with search.lua against one or more `locator serve --only api`
processes, plus a sequential httpx client for single-request latency.

Maximum throughput is found with closed-loop connections (wrk keeps every connection busy).
Latency is then measured at half that rate, paced by search.lua's shared schedule. With
several API processes, one wrk process drives each (a load balancer would add its own cost);
throughputs add up, p50 is the request-weighted mean of theirs and p95/p99 the worst of them.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import httpx

LUA = Path(__file__).with_name("search.lua")
NHS_SYSTEM = "https://fhir.nhs.uk/Id/nhs-number"
SEARCH_PATH = "/fhir/ImagingStudy/_search"


@dataclass(frozen=True)
class LoadResult:
    rate: float  # completed requests per second
    requests: int
    errors: int
    p50_ms: float
    p95_ms: float
    p99_ms: float
    max_ms: float
    connections: int
    offered: float | None  # requests/s offered (None: closed loop)

    def as_dict(self) -> dict[str, object]:
        return asdict(self)


def wrk_available() -> bool:
    return shutil.which("wrk") is not None


def search_body(nhs_number: str, *, include: bool) -> dict[str, str]:
    body = {"patient.identifier": f"{NHS_SYSTEM}|{nhs_number}", "_count": "20"}
    if include:
        body["_include"] = "ImagingStudy:endpoint"
    return body


def check_search(base: str, nhs_number: str, *, include: bool) -> int:
    """One search must answer 200 with the patient's studies before any load is measured."""
    response = httpx.post(
        f"{base}{SEARCH_PATH}", data=search_body(nhs_number, include=include), timeout=30.0
    )
    if response.status_code != 200:
        raise RuntimeError(f"search answered {response.status_code}: {response.text[:500]}")
    bundle = response.json()
    matches = [e for e in bundle.get("entry", []) if e["search"]["mode"] == "match"]
    if not matches:
        raise RuntimeError("a patient with studies got an empty searchset")
    return len(matches)


def _wrk(
    base: str, patients: Path, *, connections: int, seconds: float, include: bool, rate: float
) -> subprocess.Popen[str]:
    env = os.environ | {
        "BENCH_PATIENTS": str(patients),
        "BENCH_INCLUDE": "1" if include else "0",
        "BENCH_RATE": f"{rate:.3f}",
    }
    return subprocess.Popen(
        [
            "wrk",
            "-t1",
            f"-c{connections}",
            f"-d{seconds:.0f}s",
            "--timeout",
            "5s",
            "-s",
            str(LUA),
            base,
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )


def _result_line(output: str) -> dict[str, float]:
    for line in reversed(output.splitlines()):
        if line.startswith("{"):
            parsed: dict[str, float] = json.loads(line)
            return parsed
    raise RuntimeError(f"wrk printed no result:\n{output[-2000:]}")


def run_wrk(
    bases: Sequence[str],
    patients: Path,
    *,
    connections: int,
    seconds: float,
    include: bool,
    rate: float = 0.0,
) -> LoadResult:
    """One wrk process per API base URL, run together; rate is the total offered."""
    per_rate = rate / len(bases) if rate else 0.0
    per_conn = max(1, connections // len(bases))
    procs = [
        _wrk(b, patients, connections=per_conn, seconds=seconds, include=include, rate=per_rate)
        for b in bases
    ]
    parts = []
    for proc in procs:
        out, err = proc.communicate(timeout=seconds + 60)
        if proc.returncode != 0:
            raise RuntimeError(f"wrk failed: {err[-1000:]}")
        parts.append(_result_line(out))
    requests = sum(int(p["requests"]) for p in parts)
    errors = sum(int(p[k]) for p in parts for k in p if str(k).startswith("errors_"))
    duration = max(p["duration_us"] for p in parts) / 1e6
    weight = max(requests, 1)
    return LoadResult(
        rate=requests / duration,
        requests=requests,
        errors=errors,
        p50_ms=sum(p["p50_us"] * p["requests"] for p in parts) / weight / 1000,
        p95_ms=max(p["p95_us"] for p in parts) / 1000,
        p99_ms=max(p["p99_us"] for p in parts) / 1000,
        max_ms=max(p["max_us"] for p in parts) / 1000,
        connections=per_conn * len(bases),
        offered=rate or None,
    )


def write_patients(path: Path, patients: Sequence[str], *, sample: int, seed: int = 5) -> Path:
    rng = random.Random(seed)
    chosen = patients if len(patients) <= sample else rng.sample(list(patients), sample)
    path.write_text("\n".join(chosen) + "\n")
    return path


@dataclass(frozen=True)
class SearchFigures:
    max: LoadResult
    at_half: LoadResult

    def as_dict(self) -> dict[str, object]:
        return {"max": self.max.as_dict(), "at_half": self.at_half.as_dict()}


def measure_search(
    bases: Sequence[str], patients: Path, *, include: bool, seconds: float, connections: int = 32
) -> SearchFigures:
    """Warm up, find the maximum (closed loop), then latency at half of it (paced)."""
    run_wrk(bases, patients, connections=connections, seconds=min(2, seconds), include=include)
    top = run_wrk(bases, patients, connections=connections, seconds=seconds, include=include)
    half = run_wrk(
        bases,
        patients,
        connections=connections,
        seconds=seconds,
        include=include,
        rate=top.rate / 2,
    )
    return SearchFigures(max=top, at_half=half)


def sequential_latencies(
    base: str, patients: Sequence[str], *, count: int, include: bool
) -> list[float]:
    """One client, one request at a time: what a single user waits (ms)."""
    times = []
    with httpx.Client(base_url=base, timeout=30.0) as client:
        for nhs in patients[:count]:
            t0 = time.perf_counter()
            response = client.post(SEARCH_PATH, data=search_body(nhs, include=include))
            times.append((time.perf_counter() - t0) * 1000)
            response.raise_for_status()
    return times
