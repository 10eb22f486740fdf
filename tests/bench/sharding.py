"""Sharding, measured before it is built: `python -m tests.bench.sharding`.

Every patient search names one NHS Number, so the study pointers could be split by it. This
measures, on one PostgreSQL, today's schema against the `study` table hash-partitioned by
`nhs_number` (declarative partitioning, `--partitions 0,8,32`; 0 is today's schema), at
each `--sizes` index size:

- the bulk load (studies/s, bytes per study);
- the plans: how many partitions a patient search and a read by id touch (EXPLAIN);
- the database's own cost per patient search and per read by id (psycopg, prepared, one
  connection, no HTTP), p50 and p99;
- patient searches over HTTP (wrk against `locator serve --only api`, as the bench's search
  stage) and ORU ingest over MLLP (eight closed-loop senders, new studies), as the product
  runs them.

With `--fdw-studies N` it also puts half of the partitions on a second PostgreSQL server as
postgres_fdw foreign tables and measures what a patient search costs when its partition is
across the wire (loopback here: no network latency, only the protocol and the planner).

What partitioning costs the schema, and why: a partitioned table's primary key and unique
indexes must contain the partition key, and `nhs_number` is NULL for held studies, so `id` is
only indexed (its uniqueness rests on random 128-bit ids), and the foreign keys that name
`study.id` (study_key, patient_assertion, merged_into) are dropped. The look-up tables
(study_key, patient_assertion, local_link) stay whole, as design.md's scale note says.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import statistics
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import psycopg
from sqlalchemy import text
from sqlalchemy.engine import make_url

from locator.core.bulk import bulk_load
from locator.store.db import create_db_engine, normalise_url
from tests.bench.datagen import Generator, make_trusts, notices_of
from tests.bench.ingest import mllp_load, oru_frames
from tests.bench.run import TRUSTS, database_bytes, settle
from tests.bench.search import check_search, measure_search, write_patients, wrk_available
from tests.bench.service import REPO, Service, postgres_database, postgres_server, prepare_database

DEFAULT_OUT = REPO / "tests" / "bench" / "results"
PROBES = 2_000  # patients (and ids) asked in the database-only measurement

# The plain patient search's conditions and order as locator.api.query builds them (first
# page, default sort, fewer columns): one patient, linked, not merged away, newest first, one
# more row than the page.
PATIENT_SEARCH = (
    "SELECT id, trust_ods, study_uid, accession, nhs_number, status, sort_time FROM study "
    "WHERE patient_state = 'linked' AND merged_into IS NULL AND status <> 'entered-in-error' "
    "AND nhs_number = %s ORDER BY sort_time DESC, id DESC LIMIT 21"
)
READ_BY_ID = "SELECT id, trust_ods, nhs_number, merged_into FROM study WHERE id = %s"


def log(message: str) -> None:
    print(f"[{datetime.now(UTC):%H:%M:%S}] {message}", flush=True)


# --------------------------------------------------------------------------- the schema


def libpq_url(url: str) -> str:
    return make_url(normalise_url(url)).set(drivername="postgresql").render_as_string(False)


def study_indexes(conn: psycopg.Connection[Any]) -> list[tuple[str, str]]:
    """(name, definition) of the study table's indexes other than its primary key."""
    rows = conn.execute(
        "SELECT indexname, indexdef FROM pg_indexes WHERE tablename = 'study' "
        "AND indexname <> 'pk_study'"
    ).fetchall()
    return [(r[0], r[1]) for r in rows]


def partition_study(url: str, partitions: int) -> None:
    """Replace the (empty) study table by one hash-partitioned on nhs_number."""
    with psycopg.connect(libpq_url(url), autocommit=False) as conn:
        indexes = study_indexes(conn)
        fks = conn.execute(
            "SELECT conrelid::regclass::text, conname FROM pg_constraint "
            "WHERE contype = 'f' AND confrelid = 'study'::regclass"
        ).fetchall()
        for table, name in fks:
            conn.execute(f'ALTER TABLE {table} DROP CONSTRAINT "{name}"')
        conn.execute("ALTER TABLE study RENAME TO study_whole")
        conn.execute(
            "CREATE TABLE study (LIKE study_whole INCLUDING DEFAULTS INCLUDING CONSTRAINTS) "
            "PARTITION BY HASH (nhs_number)"
        )
        for i in range(partitions):
            conn.execute(
                f"CREATE TABLE study_p{i} PARTITION OF study "
                f"FOR VALUES WITH (MODULUS {partitions}, REMAINDER {i})"
            )
        conn.execute("DROP TABLE study_whole")
        conn.execute("CREATE INDEX ix_study_id ON study (id)")
        for _name, definition in indexes:
            conn.execute(definition.replace(" ON public.study ", " ON study "))
        conn.execute(
            "ALTER TABLE study ADD CONSTRAINT fk_study_trust_ods_trust "
            "FOREIGN KEY (trust_ods) REFERENCES trust (ods_code)"
        )
        conn.commit()


# --------------------------------------------------------------------------- measurements


@dataclass
class Variant:
    partitions: int
    studies: int
    load_seconds: float = 0.0
    studies_per_second: float = 0.0
    bytes_per_study: float = 0.0
    search_partitions_scanned: int = 0
    read_partitions_scanned: int = 0
    db_search_p50_us: float = 0.0
    db_search_p99_us: float = 0.0
    db_read_p50_us: float = 0.0
    db_read_p99_us: float = 0.0
    http: dict[str, Any] = field(default_factory=dict)
    oru_per_second: float | None = None
    oru_p99_ms: float | None = None

    @property
    def label(self) -> str:
        return "today's schema" if self.partitions == 0 else f"hash x{self.partitions}"


def scanned(plan: Any) -> int:
    """Table scans in an EXPLAIN (FORMAT JSON) plan: how many partitions (or tables) it reads."""
    count = 0
    stack = [plan]
    while stack:
        node = stack.pop()
        if isinstance(node, dict):
            if str(node.get("Relation Name", "")).startswith("study"):
                count += 1
            stack.extend(node.values())
        elif isinstance(node, list):
            stack.extend(node)
    return count


def plan_of(conn: psycopg.Connection[Any], sql: str, value: str) -> Any:
    literal = sql.replace("%s", "'" + value.replace("'", "''") + "'")
    return conn.execute(f"EXPLAIN (FORMAT JSON) {literal}").fetchone()[0]  # type: ignore[index]


def timed(conn: psycopg.Connection[Any], sql: str, values: Sequence[str]) -> list[float]:
    """Microseconds per statement, prepared, after a warm-up pass over the same values."""
    for value in values[:200]:
        conn.execute(sql, (value,), prepare=True).fetchall()
    times = []
    for value in values:
        t0 = time.perf_counter()
        conn.execute(sql, (value,), prepare=True).fetchall()
        times.append((time.perf_counter() - t0) * 1e6)
    return times


def p(values: Sequence[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def database_costs(url: str, variant: Variant, patients: Sequence[str]) -> None:
    rng = random.Random(11)
    asked = rng.sample(list(patients), min(PROBES, len(patients)))
    with psycopg.connect(libpq_url(url), autocommit=True) as conn:
        ids = [
            r[0]
            for r in conn.execute(
                "SELECT id FROM study TABLESAMPLE SYSTEM (1) LIMIT %s", (PROBES,)
            ).fetchall()
        ]
        variant.search_partitions_scanned = scanned(plan_of(conn, PATIENT_SEARCH, asked[0]))
        variant.read_partitions_scanned = scanned(plan_of(conn, READ_BY_ID, ids[0]))
        searches = timed(conn, PATIENT_SEARCH, asked)
        reads = timed(conn, READ_BY_ID, ids)
    variant.db_search_p50_us = round(statistics.median(searches), 1)
    variant.db_search_p99_us = round(p(searches, 0.99), 1)
    variant.db_read_p50_us = round(statistics.median(reads), 1)
    variant.db_read_p99_us = round(p(reads, 0.99), 1)


def load(url: str, variant: Variant, workdir: Path) -> list[str]:
    trusts = make_trusts(TRUSTS)
    prepare_database(url, trusts, workdir)
    if variant.partitions:
        partition_study(url, variant.partitions)
    gen = Generator(trusts, seed=variant.studies)
    engine = create_db_engine(url)
    stats = bulk_load(engine, studies=(notices_of(s) for s in gen.studies(variant.studies)))
    engine.dispose()
    settle(url)
    variant.load_seconds = round(stats.seconds, 1)
    variant.studies_per_second = round(stats.studies_per_second)
    variant.bytes_per_study = round(database_bytes_partitioned(url) / stats.studies)
    return list(gen.patients)


def database_bytes_partitioned(url: str) -> int:
    """database_bytes counts the study table itself, which is empty when partitioned."""
    total = database_bytes(url)
    engine = create_db_engine(url)
    with engine.connect() as conn:
        total += int(
            conn.execute(
                text(
                    "SELECT coalesce(sum(pg_total_relation_size(inhrelid)), 0) FROM pg_inherits "
                    "WHERE inhparent = 'study'::regclass"
                )
            ).scalar()
            or 0
        )
    engine.dispose()
    return total


def http_search(
    url: str, variant: Variant, patients: list[str], seconds: float, work: Path
) -> None:
    if not wrk_available():
        variant.http = {"note": "wrk not installed"}
        return
    sample = write_patients(work / f"patients-{variant.partitions}.txt", patients, sample=20_000)
    with Service(url, only="api") as svc:
        base = f"http://127.0.0.1:{svc.ports['http']}"
        check_search(base, patients[0], include=False)
        figures = measure_search([base], sample, include=False, seconds=seconds)
    variant.http = figures.as_dict()


def oru_ingest(url: str, variant: Variant, seconds: float) -> None:
    trusts = make_trusts(TRUSTS)
    gen = Generator(trusts, seed=9000, nhs_start=700_000, accession_start=9 * 10**8)
    studies = [s for s in gen.studies(int(seconds * 3_000)) if s.study_uid]
    frames = oru_frames(studies, f"S{variant.partitions}")
    with Service(url, only="mllp") as svc:
        port = svc.ports["mllp"]
        asyncio.run(mllp_load(port, frames[-200:], seconds=2))  # warm-up
        del frames[-200:]
        result = asyncio.run(mllp_load(port, frames, connections=8, seconds=seconds))
    variant.oru_per_second = round(result.rate)
    variant.oru_p99_ms = round(result.p99_ms, 1)


# --------------------------------------------------------------------------- postgres_fdw


@dataclass
class Fdw:
    studies: int
    partitions: int
    local_p50_us: float = 0.0
    local_p99_us: float = 0.0
    remote_p50_us: float = 0.0
    remote_p99_us: float = 0.0
    remote_plan_scans: int = 0


def fdw_stage(server: str, studies: int, partitions: int, workdir: Path) -> Fdw:
    """Half the partitions on a second server as foreign tables; search cost by location."""
    result = Fdw(studies, partitions)
    with (
        postgres_database(server, "fdw") as url,
        postgres_server(None, workdir) as remote_server,
        postgres_database(remote_server, "remote") as remote_url,
    ):
        trusts = make_trusts(TRUSTS)
        prepare_database(url, trusts, workdir)
        partition_study(url, partitions)
        remote = make_url(libpq_url(remote_url))
        remote_tables = [f"study_p{i}" for i in range(partitions // 2, partitions)]
        with psycopg.connect(libpq_url(url), autocommit=True) as conn:
            columns = conn.execute(
                "SELECT string_agg(format('%I %s', attname, format_type(atttypid, atttypmod)), "
                "', ' ORDER BY attnum) FROM pg_attribute WHERE attrelid = 'study'::regclass "
                "AND attnum > 0 AND NOT attisdropped"
            ).fetchone()[0]  # type: ignore[index]
        with psycopg.connect(libpq_url(remote_url), autocommit=True) as rconn:
            for name in remote_tables:
                rconn.execute(f"CREATE TABLE {name} ({columns})")
                rconn.execute(f"CREATE INDEX {name}_nhs ON {name} (nhs_number, sort_time, id)")
        with psycopg.connect(libpq_url(url), autocommit=True) as conn:
            # A foreign table cannot carry a foreign key: the trust reference goes too.
            conn.execute("ALTER TABLE study DROP CONSTRAINT fk_study_trust_ods_trust")
            conn.execute("CREATE EXTENSION IF NOT EXISTS postgres_fdw")
            conn.execute(
                "CREATE SERVER shard2 FOREIGN DATA WRAPPER postgres_fdw OPTIONS "
                f"(host '{remote.host}', port '{remote.port}', dbname '{remote.database}', "
                "batch_size '1000', use_remote_estimate 'true')"
            )
            conn.execute(
                f"CREATE USER MAPPING FOR CURRENT_USER SERVER shard2 OPTIONS (user "
                f"'{remote.username}')"
            )
            for i in range(partitions // 2, partitions):
                conn.execute(f"DROP TABLE study_p{i}")
                conn.execute(
                    f"CREATE FOREIGN TABLE study_p{i} PARTITION OF study "
                    f"FOR VALUES WITH (MODULUS {partitions}, REMAINDER {i}) "
                    f"SERVER shard2 OPTIONS (table_name 'study_p{i}')"
                )
        gen = Generator(trusts, seed=studies)
        engine = create_db_engine(url)
        bulk_load(engine, studies=(notices_of(s) for s in gen.studies(studies)))
        engine.dispose()
        settle(url)
        with psycopg.connect(libpq_url(remote_url), autocommit=True) as rconn:
            rconn.execute("VACUUM ANALYZE")
        with psycopg.connect(libpq_url(url), autocommit=True) as conn:
            where = {
                r[0]: r[1]
                for r in conn.execute(
                    "SELECT nhs_number, tableoid::regclass::text FROM study "
                    "WHERE nhs_number IS NOT NULL GROUP BY 1, 2"
                ).fetchall()
            }
            local = [n for n, t in where.items() if t not in remote_tables][:PROBES]
            far = [n for n, t in where.items() if t in remote_tables][:PROBES]
            near_times = timed(conn, PATIENT_SEARCH, local)
            far_times = timed(conn, PATIENT_SEARCH, far)
            result.remote_plan_scans = scanned(plan_of(conn, PATIENT_SEARCH, far[0]))
    result.local_p50_us = round(statistics.median(near_times), 1)
    result.local_p99_us = round(p(near_times, 0.99), 1)
    result.remote_p50_us = round(statistics.median(far_times), 1)
    result.remote_p99_us = round(p(far_times, 0.99), 1)
    return result


# --------------------------------------------------------------------------- report


def table(variants: Sequence[Variant]) -> str:
    head = (
        "| studies | schema | load studies/s | bytes/study | partitions read: search / by id "
        "| DB search p50 / p99 µs | DB read by id p50 / p99 µs | HTTP searches/s | HTTP p99 "
        "at half ms | ORU/s (8 senders) |\n|---:|---|---:|---:|---|---|---|---:|---:|---:|"
    )
    rows = []
    for v in variants:
        top = v.http.get("max", {})
        half = v.http.get("at_half", {})
        rows.append(
            f"| {v.studies:,} | {v.label} | {v.studies_per_second:,.0f} | {v.bytes_per_study:,.0f} "
            f"| {v.search_partitions_scanned} / {v.read_partitions_scanned} "
            f"| {v.db_search_p50_us:,.0f} / {v.db_search_p99_us:,.0f} "
            f"| {v.db_read_p50_us:,.0f} / {v.db_read_p99_us:,.0f} "
            f"| {top.get('rate', 0):,.0f} | {half.get('p99_ms', 0):.1f} "
            f"| {v.oru_per_second or 0:,} |"
        )
    return "\n".join([head, *rows])


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.bench.sharding", description=__doc__)
    parser.add_argument("--sizes", default="1000000", help="comma-separated index sizes")
    parser.add_argument("--partitions", default="0,8,32", help="0 is today's schema")
    parser.add_argument("--search-seconds", type=float, default=10.0)
    parser.add_argument("--ingest-seconds", type=float, default=10.0)
    parser.add_argument("--fdw-studies", type=int, default=0, help="0: no postgres_fdw stage")
    parser.add_argument("--pg-url", default=None, help="a server (else a throwaway cluster)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args(argv)
    sizes = [int(s) for s in args.sizes.split(",") if s]
    counts = [int(s) for s in args.partitions.split(",") if s]
    args.out.mkdir(parents=True, exist_ok=True)
    started = datetime.now(UTC)
    variants: list[Variant] = []
    fdw: Fdw | None = None
    with (
        tempfile.TemporaryDirectory(prefix="locator-shard-") as tmp,
        postgres_server(args.pg_url, Path(tmp)) as server,
    ):
        work = Path(tmp)
        for size in sizes:
            for count in counts:
                variant = Variant(count, size)
                log(f"{size:,} studies, {variant.label}")
                with postgres_database(server, f"shard{count}") as url:
                    patients = load(url, variant, work)
                    log(f"  loaded in {variant.load_seconds} s ({variant.studies_per_second:,}/s)")
                    database_costs(url, variant, patients)
                    log(
                        f"  partitions read: search {variant.search_partitions_scanned}, by id "
                        f"{variant.read_partitions_scanned}; DB search p50 "
                        f"{variant.db_search_p50_us} µs, read p50 {variant.db_read_p50_us} µs"
                    )
                    http_search(url, variant, patients, args.search_seconds, work)
                    oru_ingest(url, variant, args.ingest_seconds)
                    rate = variant.http.get("max", {}).get("rate", 0)
                    log(f"  HTTP {rate:,.0f} searches/s; ORU {variant.oru_per_second}/s")
                variants.append(variant)
        if args.fdw_studies:
            log(f"postgres_fdw: {args.fdw_studies:,} studies, half of 8 partitions remote")
            fdw = fdw_stage(server, args.fdw_studies, 8, work)
            log(f"  local p50 {fdw.local_p50_us} µs, remote p50 {fdw.remote_p50_us} µs")
    results = {
        "started": started.isoformat(timespec="seconds"),
        "finished": datetime.now(UTC).isoformat(timespec="seconds"),
        "cores": os.cpu_count(),
        "command": "python -m tests.bench.sharding " + " ".join(argv or []),
        "variants": [asdict(v) | {"label": v.label} for v in variants],
        "fdw": asdict(fdw) if fdw else None,
    }
    (args.out / "sharding.json").write_text(json.dumps(results, indent=2))
    print(table(variants))
    if fdw:
        print(
            f"\npostgres_fdw ({fdw.studies:,} studies, {fdw.partitions} partitions, half remote): "
            f"patient search in the database, local partition p50 {fdw.local_p50_us:,.0f} / p99 "
            f"{fdw.local_p99_us:,.0f} µs; remote partition p50 {fdw.remote_p50_us:,.0f} / p99 "
            f"{fdw.remote_p99_us:,.0f} µs"
        )
    print(f"\nresults: {args.out / 'sharding.json'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
