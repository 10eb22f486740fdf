"""Bulk load of study pointers: PostgreSQL COPY, SQLite batched inserts.

For benchmarks, migrations from an existing RIS/PACS, and backfills: each study is given as
the notices that would have produced it (one per source: `hl7:<MSH-3>`, `mpps:<step UID>`),
and the loader writes the same rows `locator.core.index.apply_notice` would leave behind, namely
the study row (facts joined with the index's own `StudyFacts.join`, columns from
`columns_of_facts`, patient from `derive_patient`), its `study_key` rows, one
`patient_assertion` per (source, patient) and the trust's `local_link` rows, without a
round trip per notice.

The studies must be new: the loader neither finds nor merges existing studies (a key that is
already stored fails the batch with BulkLoadError, and the batch is rolled back). Every
batch is one transaction; a failed load leaves the earlier batches in place.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from itertools import islice
from typing import Any

from sqlalchemy import Engine, select

from locator.core.index import (
    ACCESSION,
    UID,
    Assertion,
    StudyFacts,
    columns_of_facts,
    derive_patient,
    facts_of_ref,
    fhir_status,
    patient_claims,
)
from locator.core.notice import StudyNotice
from locator.store.models import (
    local_link_table,
    patient_assertion_table,
    study_key_table,
    study_table,
)

DEFAULT_BATCH_SIZE = 20_000

STUDY_COLUMNS = (
    "id",
    "trust_ods",
    "study_uid",
    "accession",
    "nhs_number",
    "patient_state",
    "local_id",
    "status",
    "evidence_status",
    "report_status",
    "report_time",
    "report_hash",
    "started",
    "sort_time",
    "modalities",
    "procedures",
    "series",
    "series_sources",
    "number_of_series",
    "number_of_instances",
    "feeds",
    "created_at",
    "first_seen",
    "last_seen",
    "updated_at",
    "version",
    "merged_into",
)
KEY_COLUMNS = ("trust_ods", "kind", "value", "study_id")
ASSERTION_COLUMNS = (
    "study_id",
    "source",
    "patient_key",
    "trust_ods",
    "nhs_number",
    "local_id",
    "withdrawn",
    "first_seen",
)
LINK_COLUMNS = ("trust_ods", "local_id", "nhs_number", "first_seen")


class BulkLoadError(ValueError):
    """A study given to the loader that the index would not accept as one new study."""


@dataclass(frozen=True, slots=True)
class PreparedStudy:
    """The rows of one study, as tuples in the column orders above."""

    study: tuple[Any, ...]
    keys: tuple[tuple[Any, ...], ...]
    assertions: tuple[tuple[Any, ...], ...]
    links: tuple[tuple[Any, ...], ...]


@dataclass(frozen=True, slots=True)
class BulkStats:
    studies: int
    keys: int
    assertions: int
    links: int
    seconds: float

    @property
    def studies_per_second(self) -> float:
        return self.studies / self.seconds if self.seconds else 0.0


def new_study_id() -> str:
    return uuid.uuid4().hex


def prepare_study(notices: Sequence[StudyNotice], *, study_id: str) -> PreparedStudy:
    """The rows apply_notice would leave for these notices about one new study."""
    if not notices:
        raise BulkLoadError("a study needs at least one notice")
    trust = notices[0].trust_ods
    facts = StudyFacts()
    keys: dict[tuple[str, str], None] = {}
    assertions: dict[tuple[str, str], tuple[Any, ...]] = {}
    links: dict[tuple[str, str], tuple[Any, ...]] = {}
    for notice in notices:
        if notice.trust_ods != trust or len(notice.studies) != 1:
            raise BulkLoadError("each notice must name the study's trust and this one study")
        ref = notice.studies[0]
        if not (ref.study_uid or ref.accession):
            raise BulkLoadError("a study reference needs a Study UID or an accession")
        facts = facts.join(facts_of_ref(notice, ref))
        if ref.study_uid:
            keys[(UID, ref.study_uid)] = None
        if ref.accession:
            keys[(ACCESSION, ref.accession)] = None
        for patient_key, nhs, local in patient_claims(notice.patient):
            assertions.setdefault(
                (notice.source, patient_key),
                (
                    study_id,
                    notice.source,
                    patient_key,
                    trust,
                    nhs,
                    local,
                    notice.patient.withdrawn,
                    notice.received_at,
                ),
            )
        patient = notice.patient
        if patient.nhs_number and patient.local_id:
            links.setdefault(
                (patient.local_id, patient.nhs_number),
                (trust, patient.local_id, patient.nhs_number, notice.received_at),
            )
    return PreparedStudy(
        study=_study_row(study_id, trust, notices, facts, assertions, links, keys),
        keys=tuple((trust, kind, value, study_id) for kind, value in keys),
        assertions=tuple(assertions.values()),
        links=tuple(links.values()),
    )


def _study_row(
    study_id: str,
    trust: str,
    notices: Sequence[StudyNotice],
    facts: StudyFacts,
    assertions: dict[tuple[str, str], tuple[Any, ...]],
    links: dict[tuple[str, str], tuple[Any, ...]],
    keys: dict[tuple[str, str], None],
) -> tuple[Any, ...]:
    linked = {local: frozenset({nhs}) for (local, nhs) in links}
    derived = derive_patient(
        [Assertion(a[4], a[5], bool(a[6])) for a in assertions.values()], linked
    )
    local_ids = [a[5] for a in assertions.values() if a[5]]
    first_seen = min(n.received_at for n in notices)
    last_seen = max(n.received_at for n in notices)
    columns = columns_of_facts(facts)
    columns |= {
        "id": study_id,
        "trust_ods": trust,
        "study_uid": min((v for k, v in keys if k == UID), default=None),
        "accession": min((v for k, v in keys if k == ACCESSION), default=None),
        "nhs_number": derived.nhs_number,
        "patient_state": derived.state,
        "local_id": min(local_ids, default=None),
        "status": fhir_status(facts, derived),
        "sort_time": facts.started or first_seen,
        "created_at": first_seen,
        "first_seen": first_seen,
        "last_seen": last_seen,
        "updated_at": last_seen,
        "version": 1,
        "merged_into": None,
    }
    return tuple(columns[name] for name in STUDY_COLUMNS)


def _batches(
    studies: Iterable[Sequence[StudyNotice]], size: int, make_id: Callable[[], str]
) -> Iterator[list[PreparedStudy]]:
    iterator = iter(studies)
    while chunk := list(islice(iterator, size)):
        yield [prepare_study(notices, study_id=make_id()) for notices in chunk]


def bulk_load(
    engine: Engine,
    *,
    studies: Iterable[Sequence[StudyNotice]],
    batch_size: int = DEFAULT_BATCH_SIZE,
    make_id: Callable[[], str] = new_study_id,
    progress: Callable[[int], None] | None = None,
) -> BulkStats:
    """Load new studies in batches of `batch_size`, one transaction each."""
    writer = _copy_batch if engine.dialect.name == "postgresql" else _insert_batch
    started = time.perf_counter()
    totals = [0, 0, 0, 0]
    seen_links: set[tuple[Any, ...]] = set(_stored_links(engine))
    for batch in _batches(studies, batch_size, make_id):
        links = _new_links(batch, seen_links)
        writer(engine, batch, links)
        totals[0] += len(batch)
        totals[1] += sum(len(p.keys) for p in batch)
        totals[2] += sum(len(p.assertions) for p in batch)
        totals[3] += len(links)
        if progress is not None:
            progress(totals[0])
    studies_n, keys_n, assertions_n, links_n = totals
    return BulkStats(
        studies=studies_n,
        keys=keys_n,
        assertions=assertions_n,
        links=links_n,
        seconds=time.perf_counter() - started,
    )


def _stored_links(engine: Engine) -> Iterator[tuple[str, str, str]]:
    link = local_link_table
    with engine.connect() as conn:
        rows = conn.execute(select(link.c.trust_ods, link.c.local_id, link.c.nhs_number))
        yield from ((r.trust_ods, r.local_id, r.nhs_number) for r in rows)


def _new_links(batch: Sequence[PreparedStudy], seen: set[tuple[Any, ...]]) -> list[tuple[Any, ...]]:
    """local_link rows not stored yet (one per trust, local id and NHS Number)."""
    fresh = []
    for prepared in batch:
        for row in prepared.links:
            if row[:3] not in seen:
                seen.add(row[:3])
                fresh.append(row)
    return fresh


def _copy_batch(
    engine: Engine, batch: Sequence[PreparedStudy], links: Sequence[tuple[Any, ...]]
) -> None:
    """PostgreSQL: COPY FROM STDIN into each table, in one transaction."""
    raw = engine.raw_connection()
    try:
        pg: Any = raw.driver_connection  # psycopg 3: cursor.copy
        with pg.cursor() as cur:
            _copy(cur, "study", STUDY_COLUMNS, (p.study for p in batch))
            _copy(cur, "study_key", KEY_COLUMNS, (k for p in batch for k in p.keys))
            _copy(
                cur,
                "patient_assertion",
                ASSERTION_COLUMNS,
                (a for p in batch for a in p.assertions),
            )
            _copy(cur, "local_link", LINK_COLUMNS, links)
        raw.commit()
    except engine.dialect.dbapi.IntegrityError as exc:  # type: ignore[union-attr]
        raw.rollback()
        raise BulkLoadError(f"a study of this batch is already stored: {exc}") from exc
    except Exception:
        raw.rollback()
        raise
    finally:
        raw.close()


def _copy(cur: Any, table: str, columns: Sequence[str], rows: Iterable[tuple[Any, ...]]) -> None:
    with cur.copy(f"COPY {table} ({', '.join(columns)}) FROM STDIN") as copy:
        for row in rows:
            copy.write_row(row)


def _insert_batch(
    engine: Engine, batch: Sequence[PreparedStudy], links: Sequence[tuple[Any, ...]]
) -> None:
    """SQLite: the driver's executemany in one transaction. Each value goes through its
    column type's bind processor first, so (UTC) datetimes are stored exactly as the service
    stores them."""
    plan = (
        (study_table, STUDY_COLUMNS, [p.study for p in batch]),
        (study_key_table, KEY_COLUMNS, [k for p in batch for k in p.keys]),
        (patient_assertion_table, ASSERTION_COLUMNS, [a for p in batch for a in p.assertions]),
        (local_link_table, LINK_COLUMNS, list(links)),
    )
    dialect = engine.dialect
    try:
        with engine.begin() as conn:
            cursor: Any = conn.connection.driver_connection.cursor()  # type: ignore[union-attr]
            for table, columns, rows in plan:
                if not rows:
                    continue
                processors = [table.c[name].type.bind_processor(dialect) for name in columns]
                marks = ", ".join("?" for _ in columns)
                cursor.executemany(
                    f"INSERT INTO {table.name} ({', '.join(columns)}) VALUES ({marks})",
                    [_bind(row, processors) for row in rows],
                )
            cursor.close()
    except dialect.dbapi.IntegrityError as exc:  # type: ignore[union-attr]
        raise BulkLoadError(f"a study of this batch is already stored: {exc}") from exc


def _bind(row: tuple[Any, ...], processors: Sequence[Any]) -> tuple[Any, ...]:
    return tuple(
        value if proc is None or value is None else proc(value)
        for value, proc in zip(row, processors, strict=True)
    )
