"""Run the whole benchmark suite: `python -m tests.bench.run [--quick] [--out DIR]`.

Stages (all by default, or a comma-separated `--stages`):
- data:   bulk-load synthetic studies (PostgreSQL COPY, SQLite batched inserts);
- search: wrk against `locator serve --only api` at each index size, with and without
          _include=ImagingStudy:endpoint (the indexes built by `data` are reused);
- ingest: ORU over MLLP (8 connections) and MPPS (8 associations) into `locator serve
          --only mllp` / `--only dicom`, on SQLite and PostgreSQL;
- fanout: the same question asked of 1, 4 and 16 real Orthanc PACS over QIDO-RS.

PostgreSQL: --pg-url, else LOCATOR_TEST_POSTGRES_URL, else a throwaway cluster from
.ci/start-postgres. Output: a printed table, results.json and fanout.png in --out (default
tests/bench/results/); `--publish` also copies them to docs/bench/. `--pg-sizes` and
`--sqlite-sizes` choose the index sizes (e.g. `--stages data,search --pg-sizes 10000000
--sqlite-sizes ""` for the 10-million-study stage alone).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import shlex
import shutil
import sqlite3
import sys
import tempfile
import time
from collections.abc import Sequence
from contextlib import ExitStack, closing
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from sqlalchemy import text

from locator.core.bulk import bulk_load
from locator.store.db import create_db_engine
from tests.bench import report
from tests.bench.datagen import Generator, SyntheticStudy, make_trusts, notices_of
from tests.bench.fanout import Latency, locator_latencies, measure_fanout
from tests.bench.ingest import mllp_load, mpps_load, oru_frames
from tests.bench.search import check_search, measure_search, write_patients, wrk_available
from tests.bench.service import (
    REPO,
    SERVICE_ENV,
    Service,
    postgres_database,
    postgres_server,
    prepare_database,
)

DEFAULT_OUT = REPO / "tests" / "bench" / "results"
DOCS = REPO / "docs" / "bench"
TRUSTS = 20
STAGES = ("data", "search", "ingest", "fanout")


@dataclass(frozen=True)
class Plan:
    pg_sizes: tuple[int, ...]
    sqlite_sizes: tuple[int, ...]
    search_seconds: float
    two_api_processes: bool
    ingest_backends: tuple[str, ...]
    ingest_seconds: float
    ingest_messages: int
    mpps_seconds: float
    fanout_studies: int
    fanout_patients: int
    fanout_pacs: tuple[int, ...]


FULL = Plan(
    pg_sizes=(10_000, 100_000, 1_000_000),
    sqlite_sizes=(1_000_000,),
    search_seconds=15,
    two_api_processes=True,
    ingest_backends=("sqlite", "postgresql"),
    ingest_seconds=20,
    ingest_messages=30_000,
    mpps_seconds=15,
    fanout_studies=20_000,
    fanout_patients=300,
    fanout_pacs=(1, 4, 16),
)
QUICK = Plan(
    pg_sizes=(10_000,),
    sqlite_sizes=(10_000,),
    search_seconds=2,
    two_api_processes=False,
    ingest_backends=("sqlite",),
    ingest_seconds=3,
    ingest_messages=3_000,
    mpps_seconds=3,
    fanout_studies=600,
    fanout_patients=30,
    fanout_pacs=(1, 4, 16),
)


def log(message: str) -> None:
    print(f"[{datetime.now(UTC):%H:%M:%S}] {message}", flush=True)


# --------------------------------------------------------------------------- data + search


@dataclass
class Index:
    backend: str
    url: str
    studies: int
    patients: list[str]


def build_index(
    url: str, backend: str, studies: int, workdir: Path, results: dict[str, Any]
) -> Index:
    trusts = make_trusts(TRUSTS)
    prepare_database(url, trusts, workdir)
    gen = Generator(trusts, seed=studies)
    engine = create_db_engine(url)
    stats = bulk_load(engine, studies=(notices_of(s) for s in gen.studies(studies)))
    engine.dispose()
    settle(url)
    results["data"].append(
        {
            "backend": backend,
            "studies": stats.studies,
            "patients": len(gen.patients),
            "keys": stats.keys,
            "assertions": stats.assertions,
            "seconds": round(stats.seconds, 1),
            "studies_per_second": round(stats.studies_per_second),
            "bytes_per_study": round(database_bytes(url) / stats.studies),
            "note": "generation + row preparation + load + commit, indexes in place",
        }
    )
    log(
        f"  {backend} {studies:,} studies loaded in {stats.seconds:.1f} s "
        f"({stats.studies_per_second:,.0f}/s), {len(gen.patients):,} patients"
    )
    return Index(backend, url, studies, list(gen.patients))


def search_index(
    index: Index, plan: Plan, workdir: Path, results: dict[str, Any], processes: Sequence[int]
) -> None:
    patients = write_patients(
        workdir / f"patients-{index.backend}-{index.studies}.txt", index.patients, sample=20_000
    )
    for count in processes:
        with ExitStack() as stack:
            services = [stack.enter_context(Service(index.url, only="api")) for _ in range(count)]
            bases = [f"http://127.0.0.1:{s.ports['http']}" for s in services]
            for base in bases:
                check_search(base, index.patients[0], include=True)
            for include in (True, False):
                figures = measure_search(
                    bases, patients, include=include, seconds=plan.search_seconds
                )
                results["search"].append(
                    {
                        "backend": index.backend,
                        "studies": index.studies,
                        "api_processes": count,
                        "include": include,
                        **figures.as_dict(),
                    }
                )
                log(
                    f"  search {index.backend} {index.studies:,} x{count} include={include}: "
                    f"max {figures.max.rate:,.0f}/s, p99 at half "
                    f"{figures.at_half.p99_ms:.1f} ms"
                )


def database_bytes(url: str) -> int:
    """The index tables with their indexes (PostgreSQL) or the whole file (SQLite)."""
    if url.startswith("sqlite"):
        path = Path(url.removeprefix("sqlite:///"))
        return sum(p.stat().st_size for p in path.parent.glob(path.name + "*"))
    engine = create_db_engine(url)
    tables = "study", "study_key", "patient_assertion", "local_link"
    with engine.connect() as conn:
        size = sum(
            int(conn.execute(text(f"SELECT pg_total_relation_size('{t}')")).scalar() or 0)
            for t in tables
        )
    engine.dispose()
    return size


def settle(url: str) -> None:
    """After a bulk load, measure the steady state, not the load's aftermath: statistics
    gathered and dirty pages written out (PostgreSQL VACUUM ANALYZE and CHECKPOINT, what
    autovacuum and the checkpointer do soon after anyway; SQLite a WAL checkpoint), so they
    do not compete with the searches for the disk."""
    if url.startswith("sqlite"):  # outside SQLAlchemy: its connections begin transactions
        with closing(sqlite3.connect(url.removeprefix("sqlite:///"))) as db:
            db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        return
    engine = create_db_engine(url)
    with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
        conn.execute(text("VACUUM ANALYZE"))
        conn.execute(text("CHECKPOINT"))
    engine.dispose()


# --------------------------------------------------------------------------- ingest


def ingest_backend(
    url: str, backend: str, plan: Plan, workdir: Path, results: dict[str, Any], run_id: int
) -> None:
    trusts = make_trusts(TRUSTS)
    prepare_database(url, trusts, workdir)
    gen = Generator(trusts, seed=7000 + run_id, nhs_start=500_000, accession_start=run_id * 10**8)
    studies = [s for s in gen.studies(plan.ingest_messages * 2) if s.study_uid]
    half = len(studies) // 2
    closed = oru_frames(studies[:half], f"B{run_id}A")
    paced = oru_frames(studies[half:], f"B{run_id}B")
    with Service(url, only="mllp") as svc:
        port = svc.ports["mllp"]
        asyncio.run(mllp_load(port, closed[-200:], seconds=2))  # warm-up
        del closed[-200:]
        for rate, frames in ((0.0, closed), (200.0, paced)):
            result = asyncio.run(
                mllp_load(port, frames, connections=8, rate=rate, seconds=plan.ingest_seconds)
            )
            results["ingest"].append({"backend": backend, **result.as_dict()})
            log(
                f"  ORU {backend} offered={rate or 'max'}: {result.rate:,.0f}/s committed, "
                f"p99 {result.p99_ms:.1f} ms, not AA {result.other}"
            )
    ae_titles = [t.dicom_ae_titles[0] for t in trusts[:8]]
    with Service(url, only="dicom") as svc:
        for nodelay in (False, True):
            result = mpps_load(
                svc.ports["dicom"],
                ae_titles,
                trusts=TRUSTS,
                seconds=plan.mpps_seconds,
                pairs_per_association=max(60, int(plan.mpps_seconds * 40)),
                nodelay=nodelay,
            )
            results["ingest"].append({"backend": backend, **result.as_dict()})
            log(
                f"  MPPS {backend} ({result.note}): {result.rate:,.1f} pairs/s, "
                f"p50 {result.p50_ms:.0f} ms per pair, failures {result.other}"
            )
    verify_committed(url, results, backend)


def verify_committed(url: str, results: dict[str, Any], backend: str) -> None:
    """Everything acknowledged must be in the index: count the studies each feed made."""
    engine = create_db_engine(url)
    with engine.connect() as conn:
        hl7 = conn.execute(text("SELECT count(*) FROM study WHERE feeds LIKE '%hl7%'")).scalar()
        mpps = conn.execute(text("SELECT count(*) FROM study WHERE feeds LIKE '%mpps%'")).scalar()
    engine.dispose()
    acked_oru = sum(
        r["accepted"]
        for r in results["ingest"]
        if r["backend"] == backend and r["feed"] == "oru-mllp"
    )
    acked_mpps = sum(
        r["accepted"]
        for r in results["ingest"]
        if r["backend"] == backend and r["feed"] == "mpps-pairs"
    )
    results["ingest_check"].append(
        {
            "backend": backend,
            "oru_acknowledged": acked_oru,
            "studies_from_hl7": hl7,
            "mpps_pairs_acknowledged": acked_mpps,
            "studies_from_mpps": mpps,
        }
    )
    log(
        f"  check {backend}: {acked_oru} ORU AA -> {hl7} studies from HL7 (+200 warm-up); "
        f"{acked_mpps} MPPS pairs -> {mpps} studies from MPPS"
    )


# --------------------------------------------------------------------------- fan-out


def fanout_stage(url: str, plan: Plan, workdir: Path, results: dict[str, Any]) -> None:
    trusts = make_trusts(16)
    prepare_database(url, trusts, workdir)
    gen = Generator(trusts, seed=16)
    studies: list[SyntheticStudy] = list(gen.studies(plan.fanout_studies))
    engine = create_db_engine(url)
    bulk_load(engine, studies=(notices_of(s) for s in studies))
    engine.dispose()
    rng = random.Random(3)
    patients = rng.sample(gen.patients, min(plan.fanout_patients, len(gen.patients)))
    with Service(url, only="api") as svc:
        base = f"http://127.0.0.1:{svc.ports['http']}"
        locator = Latency.of(asyncio.run(locator_latencies(base, patients)))
    log(f"  locator: p50 {locator.p50_ms:.1f} ms, p95 {locator.p95_ms:.1f} ms")
    t0 = time.perf_counter()
    rows = measure_fanout(
        studies, [t.ods_code for t in trusts], patients, plan.fanout_pacs, workdir, log=log
    )
    results["fanout"] = {
        "studies": len(studies),
        "studies_with_images_in_pacs": sum(1 for s in studies if s.study_uid),
        "patients_queried": len(patients),
        "locator": locator.__dict__,
        "locator_backend": "postgresql" if url.startswith("postgresql") else "sqlite",
        "rows": [r.as_dict(locator) for r in rows],
        "seconds": round(time.perf_counter() - t0, 1),
        "caveat": "loopback: no network round trips, no TLS, no unreachable or slow PACS; "
        "all Orthanc servers, the locator and the client share the machine's cores",
    }
    for r in rows:
        log(
            f"  {r.pacs} PACS: fan-out p50 {r.fan_out.p50_ms:.1f} ms, p95 "
            f"{r.fan_out.p95_ms:.1f} ms ({r.incomplete} incomplete answers)"
        )


# --------------------------------------------------------------------------- main


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m tests.bench.run",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--quick", action="store_true", help="small sizes, under two minutes")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--stages", default=",".join(STAGES))
    parser.add_argument("--pg-url", default=os.environ.get("LOCATOR_TEST_POSTGRES_URL"))
    parser.add_argument(
        "--publish",
        action="store_true",
        help="copy results.json, fanout.png and summary.md to docs/bench/ (a whole run only)",
    )
    parser.add_argument(
        "--ten-million",
        action="store_true",
        help="also load and search 10 million studies on PostgreSQL",
    )
    parser.add_argument(
        "--pg-sizes", type=_sizes, help="index sizes on PostgreSQL, e.g. 10000000 (empty: none)"
    )
    parser.add_argument(
        "--sqlite-sizes", type=_sizes, help="index sizes on SQLite, e.g. 1000000 (empty: none)"
    )
    return parser.parse_args(argv)


def _sizes(value: str) -> tuple[int, ...]:
    return tuple(int(n) for n in value.split(",") if n.strip())


@dataclass
class Backends:
    pg_server: str
    workdir: Path
    stack: ExitStack

    def pg(self, label: str) -> str:
        return self.stack.enter_context(postgres_database(self.pg_server, label))

    def sqlite(self, label: str) -> str:
        return f"sqlite:///{self.workdir / f'{label}.db'}"


def run(args: argparse.Namespace) -> dict[str, Any]:
    plan = QUICK if args.quick else FULL
    if args.pg_sizes is not None:
        plan = replace(plan, pg_sizes=args.pg_sizes)
    if args.sqlite_sizes is not None:
        plan = replace(plan, sqlite_sizes=args.sqlite_sizes)
    if args.ten_million:
        plan = replace(plan, pg_sizes=(*plan.pg_sizes, 10_000_000))
    stages = set(args.stages.split(","))
    results: dict[str, Any] = {
        "command": shlex.join(["python", "-m", "tests.bench.run", *sys.argv[1:]]),
        "started": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": report.machine(),
        "loadavg_start": report.loadavg(),
        "calibration_start": report.calibration(),
        "quick": args.quick,
        "service_env": SERVICE_ENV,
        "plan": plan.__dict__,
        "data": [],
        "search": [],
        "ingest": [],
        "ingest_check": [],
        "fanout": None,
        "not_measured": [],
    }
    wall = time.perf_counter()
    with ExitStack() as stack, tempfile.TemporaryDirectory(prefix="locator-bench-") as tmp:
        workdir = Path(tmp)
        server = stack.enter_context(postgres_server(args.pg_url, workdir))
        backends = Backends(server, workdir, stack)
        if stages & {"data", "search"}:
            data_and_search(backends, plan, stages, results)
        if "ingest" in stages:
            for run_id, backend in enumerate(plan.ingest_backends):
                url = backends.pg("ingest") if backend == "postgresql" else backends.sqlite("in")
                log(f"ingest on {backend}")
                try:
                    ingest_backend(url, backend, plan, workdir, results, run_id + 1)
                except RuntimeError as exc:
                    results["not_measured"].append(f"ingest {backend}: {exc}"[:500])
                    log(f"  ingest {backend} not measured: {exc}"[:300])
        if "fanout" in stages:
            log("fan-out to Orthanc PACS")
            if shutil.which("Orthanc") is None:
                results["not_measured"].append("fanout: Orthanc not installed")
            else:
                fanout_stage(backends.pg("fanout"), plan, workdir, results)
    results["seconds"] = round(time.perf_counter() - wall, 1)
    results["loadavg_end"] = report.loadavg()
    results["calibration_end"] = report.calibration()
    results["finished"] = datetime.now(UTC).isoformat(timespec="seconds")
    results["targets"] = report.check_targets(results)
    return results


def data_and_search(
    backends: Backends, plan: Plan, stages: set[str], results: dict[str, Any]
) -> None:
    sizes = [("postgresql", n) for n in plan.pg_sizes] + [("sqlite", n) for n in plan.sqlite_sizes]
    can_search = "search" in stages and wrk_available()
    if "search" in stages and not can_search:
        results["not_measured"].append("search: wrk not installed (apt-get install wrk)")
    for backend, size in sizes:
        label = f"{backend[:2]}{size}"
        url = backends.pg(label) if backend == "postgresql" else backends.sqlite(label)
        log(f"data: {backend} {size:,} studies")
        index = build_index(url, backend, size, backends.workdir, results)
        if can_search:
            biggest = size == max(n for b, n in sizes if b == backend)
            processes = [1]
            if backend == "postgresql" and plan.two_api_processes:
                processes = [1, 2] if biggest else [2]
            try:
                search_index(index, plan, backends.workdir, results, processes)
            except RuntimeError as exc:
                results["not_measured"].append(f"search {backend} {size}: {exc}"[:500])
                log(f"  search not measured: {exc}"[:300])


def unpublishable(args: argparse.Namespace, results: dict[str, Any]) -> str | None:
    """Why this run may not replace the published one (None: it may): it must be whole."""
    if args.quick:
        return "a --quick run"
    if set(args.stages.split(",")) != set(STAGES):
        return "not every stage ran"
    if args.pg_sizes is not None or args.sqlite_sizes is not None:
        return "not the standard index sizes"
    if results["not_measured"]:
        return "something was not measured"
    return None


def publish(out: Path) -> None:
    DOCS.mkdir(parents=True, exist_ok=True)
    for name in ("results.json", "fanout.png", "summary.md"):
        if (out / name).exists():
            shutil.copy(out / name, DOCS / name)


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    args.out.mkdir(parents=True, exist_ok=True)
    results = run(args)
    report.write_json(results, args.out / "results.json")
    drew = report.plot(results, args.out / "fanout.png")
    (args.out / "summary.md").write_text(report.summary(results))
    print()
    print(report.table(results))
    for key, verdict in results["targets"].items():
        print(f"target {key}: {verdict}")
    for item in results["not_measured"]:
        print(f"NOT MEASURED: {item}")
    print(
        f"\nresults: {args.out / 'results.json'}"
        + (f", plot: {args.out / 'fanout.png'}" if drew else "")
    )
    print(
        f"total {results['seconds']:.0f} s; load average {results['loadavg_start']} -> "
        f"{results['loadavg_end']}"
    )
    if args.publish:
        reason = unpublishable(args, results)
        if reason:
            sys.exit(f"not published ({reason}); the results are in {args.out}")
        publish(args.out)


if __name__ == "__main__":
    main()
