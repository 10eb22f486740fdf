"""The index: merge rules that turn StudyNotices into study pointers (design.md).

A study is keyed by (trust, Study Instance UID) and, before the UID is known, by (trust,
accession); every key lives in `study_key`. A notice carrying both joins them, and two records
that turn out to be one are merged into the one created first, whose id stays stable.

Every fact a study holds is a join over what its notices said, so any order and any repetition
of the same notices end in the same state (up to ids and timestamps):
- status: the highest evidence seen, registered < cancelled < available;
- report: the best (rank, OBR-22 time, content hash): a late preliminary never downgrades a
  final or corrected report;
- started: the earliest time seen; modalities, procedures, feeds and keys: unions;
- series: per source (an MPPS step) the list with the highest version, then their union.

The patient is derived, never guessed: a set of assertions, one per (source, patient), each
withdrawable only by its own source (a withdrawal is permanent). Local ids resolve to NHS Numbers
through links the same trust stated. One NHS Number -> linked; none but local ids -> held;
several -> quarantined (returned for neither); no live assertion -> entered-in-error.

No HL7, no DICOM, no FHIR here; the session is the caller's and this module never commits.
"""

from __future__ import annotations

import functools
import json
import logging
import uuid
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    Connection,
    and_,
    bindparam,
    insert,
    or_,
    select,
    update,
)
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.orm import Session

from locator.core.nhs_number import mask
from locator.core.notice import (
    REPORT_RANK,
    STATUS_RANK,
    PatientRef,
    ReportStatus,
    SeriesRef,
    StudyNotice,
    StudyRef,
    StudyStatus,
)
from locator.store.db import Reads, Writes, in_groups
from locator.store.models import (
    local_link_table,
    patient_assertion_table,
    study_key_table,
    study_table,
)

log = logging.getLogger(__name__)

STUDY = study_table
KEY = study_key_table
ASSERTION = patient_assertion_table
LINK = local_link_table

UID, ACCESSION = "uid", "acc"
_EPOCH = datetime(1, 1, 1, tzinfo=UTC)


class PatientState:
    LINKED = "linked"
    HELD = "held"
    QUARANTINED = "quarantined"
    ENTERED_IN_ERROR = "entered-in-error"


@dataclass(frozen=True, slots=True)
class AppliedNotice:
    """The surviving ids of the studies a notice touched, and whether any of them changed."""

    study_ids: tuple[str, ...]
    changed: bool


# --------------------------------------------------------------------------- facts (pure)


@dataclass(frozen=True, slots=True)
class ReportKey:
    """Orders report versions: rank, then the report's status-change time, then content hash."""

    rank: int
    time: datetime
    hash: str
    status: ReportStatus

    @property
    def order(self) -> tuple[int, datetime, str]:
        return (self.rank, self.time, self.hash)


@dataclass(frozen=True, slots=True)
class StudyFacts:
    """What a study's notices said, as a join-semilattice (design.md, one study two feeds)."""

    evidence: StudyStatus | None = None
    report: ReportKey | None = None
    started: datetime | None = None
    modalities: frozenset[str] = frozenset()
    procedures: frozenset[tuple[str, str, str]] = frozenset()
    series_sources: dict[str, tuple[int, tuple[SeriesRef, ...]]] = field(default_factory=dict)
    feeds: frozenset[str] = frozenset()

    def join(self, other: StudyFacts) -> StudyFacts:
        sources = dict(self.series_sources)
        for source, entry in other.series_sources.items():
            sources[source] = max(sources.get(source, entry), entry, key=_series_order)
        return StudyFacts(
            evidence=_max_status(self.evidence, other.evidence),
            report=_max_report(self.report, other.report),
            started=_min_time(self.started, other.started),
            modalities=self.modalities | other.modalities,
            procedures=self.procedures | other.procedures,
            series_sources=sources,
            feeds=self.feeds | other.feeds,
        )

    def series(self) -> list[SeriesRef]:
        """The union of every source's current list; a series named twice keeps its larger
        count."""
        merged: dict[str, SeriesRef] = {}
        for _, items in self.series_sources.values():
            for item in items:
                known = merged.get(item.uid)
                if known is None or _series_ref_order(item) > _series_ref_order(known):
                    merged[item.uid] = item
        return [merged[uid] for uid in sorted(merged)]


def _series_ref_order(s: SeriesRef) -> tuple[int, str]:
    return (s.number_of_instances, s.modality or "")


def _series_order(entry: tuple[int, tuple[SeriesRef, ...]]) -> tuple[int, str]:
    version, items = entry
    return (version, json.dumps([_series_json(s) for s in items], sort_keys=True))


def _max_status(a: StudyStatus | None, b: StudyStatus | None) -> StudyStatus | None:
    if a is None or b is None:
        return a or b
    return a if STATUS_RANK[a] >= STATUS_RANK[b] else b


def _max_report(a: ReportKey | None, b: ReportKey | None) -> ReportKey | None:
    if a is None or b is None:
        return a or b
    return a if a.order >= b.order else b


def _min_time(a: datetime | None, b: datetime | None) -> datetime | None:
    if a is None or b is None:
        return a or b
    return min(a, b)


def facts_of_ref(notice: StudyNotice, ref: StudyRef) -> StudyFacts:
    """What one notice says about one study."""
    report = None
    if ref.report_status is not None:
        report = ReportKey(
            rank=REPORT_RANK[ref.report_status],
            time=ref.report_time or _EPOCH,
            hash=ref.report_hash or "",
            status=ref.report_status,
        )
    procedures: frozenset[tuple[str, str, str]] = frozenset()
    if ref.procedure is not None:
        p = ref.procedure
        procedures = frozenset({(p.system or "", p.code, p.display or "")})
    sources = {}
    if ref.series is not None:
        sources[notice.source] = (
            ref.series_version,
            tuple(sorted(ref.series, key=lambda s: s.uid)),
        )
    return StudyFacts(
        evidence=ref.status,
        report=report,
        started=ref.started,
        modalities=frozenset(m for m in ref.modalities if m),
        procedures=procedures,
        series_sources=sources,
        feeds=frozenset({notice.feed.value}),
    )


def _series_json(s: SeriesRef) -> dict[str, Any]:
    return {"uid": s.uid, "modality": s.modality, "number_of_instances": s.number_of_instances}


def _series_from_json(d: dict[str, Any]) -> SeriesRef:
    return SeriesRef(
        uid=d["uid"],
        modality=d.get("modality"),
        number_of_instances=int(d.get("number_of_instances") or 0),
    )


def facts_of_row(row: Any) -> StudyFacts:
    report = None
    if row.report_status:
        status = ReportStatus(row.report_status)
        report = ReportKey(
            REPORT_RANK[status], row.report_time or _EPOCH, row.report_hash or "", status
        )
    sources = {
        source: (int(entry["version"]), tuple(_series_from_json(s) for s in entry["series"]))
        for source, entry in json.loads(row.series_sources).items()
    }
    return StudyFacts(
        evidence=StudyStatus(row.evidence_status),
        report=report,
        started=row.started,
        modalities=frozenset(m for m in row.modalities.split(",") if m),
        procedures=frozenset(tuple(p) for p in json.loads(row.procedures)),
        series_sources=sources,
        feeds=frozenset(f for f in row.feeds.split(",") if f),
    )


def columns_of_facts(facts: StudyFacts) -> dict[str, Any]:
    """The study columns that the facts determine."""
    series = facts.series()
    told = bool(facts.series_sources)
    report = facts.report
    return {
        "evidence_status": (facts.evidence or StudyStatus.REGISTERED).value,
        "report_status": report.status.value if report else None,
        "report_time": report.time if report and report.time != _EPOCH else None,
        "report_hash": report.hash or None if report else None,
        "started": facts.started,
        "modalities": ",".join(sorted(facts.modalities)),
        "procedures": json.dumps(sorted(facts.procedures)),
        "series": json.dumps([_series_json(s) for s in series]),
        "series_sources": json.dumps(
            {
                source: {"version": v, "series": [_series_json(s) for s in items]}
                for source, (v, items) in sorted(facts.series_sources.items())
            },
            sort_keys=True,
        ),
        "number_of_series": len(series) if told else None,
        "number_of_instances": sum(s.number_of_instances for s in series) if told else None,
        "feeds": ",".join(sorted(facts.feeds)),
    }


# --------------------------------------------------------------------------- patient (pure)


@dataclass(frozen=True, slots=True)
class Assertion:
    nhs_number: str | None
    local_id: str | None
    withdrawn: bool


@dataclass(frozen=True, slots=True)
class Patient:
    state: str
    nhs_number: str | None


def derive_patient(assertions: Sequence[Assertion], links: dict[str, frozenset[str]]) -> Patient:
    """The study's patient from its assertions and the trust's local-id links."""
    live = [a for a in assertions if not a.withdrawn]
    if not live:
        withdrawn = {a.nhs_number for a in assertions if a.nhs_number}
        only = next(iter(withdrawn)) if len(withdrawn) == 1 else None
        return Patient(PatientState.ENTERED_IN_ERROR, only)
    numbers: set[str] = set()
    for a in live:
        if a.nhs_number:
            numbers.add(a.nhs_number)
        elif a.local_id:
            numbers |= links.get(a.local_id, frozenset())
    if len(numbers) > 1:
        return Patient(PatientState.QUARANTINED, None)
    if numbers:
        return Patient(PatientState.LINKED, next(iter(numbers)))
    return Patient(PatientState.HELD, None)


def fhir_status(facts: StudyFacts, patient: Patient) -> str:
    if patient.state == PatientState.ENTERED_IN_ERROR:
        return StudyStatus.ENTERED_IN_ERROR.value
    return (facts.evidence or StudyStatus.REGISTERED).value


# --------------------------------------------------------------------------- SQL
# The hot path uses Core statements on the session's connection: a new study costs about five
# statements, an update of a known one about five too (stack-limits.md: ORM objects cost 5x).


def _keys_of(ref: StudyRef) -> list[tuple[str, str]]:
    keys = []
    if ref.study_uid:
        keys.append((UID, ref.study_uid))
    if ref.accession:
        keys.append((ACCESSION, ref.accession))
    return keys


# Statements are built once and executed with parameters: building and cache-keying a
# statement per call costs more than running it on SQLite.
_KEY_MATCH = {
    UID: and_(KEY.c.kind == UID, KEY.c.value == bindparam("uid")),
    ACCESSION: and_(KEY.c.kind == ACCESSION, KEY.c.value == bindparam("acc")),
}
_FIND: dict[tuple[str, ...], Any] = {
    kinds: select(KEY.c.kind, KEY.c.value, STUDY)
    .join(STUDY, STUDY.c.id == KEY.c.study_id)
    .where(KEY.c.trust_ods == bindparam("trust"), or_(*(_KEY_MATCH[k] for k in kinds)))
    .with_for_update(of=STUDY)
    for kinds in ((UID,), (ACCESSION,), (UID, ACCESSION))
}
_LOAD = select(STUDY).where(STUDY.c.id == bindparam("study_id")).with_for_update()
# inline(): no RETURNING of generated keys (nothing reads them), so they can be pipelined.
_INSERT_STUDY = insert(STUDY).inline()
_INSERT_KEY = insert(KEY).inline()
_INSERT_ASSERTION = insert(ASSERTION).inline()
_UPDATE_STUDY = update(STUDY).where(STUDY.c.id == bindparam("_study_id"))
_STORED_ASSERTIONS = select(
    ASSERTION.c.nhs_number, ASSERTION.c.local_id, ASSERTION.c.withdrawn
).where(ASSERTION.c.study_id == bindparam("study_id"))
_LINKS = select(LINK.c.local_id, LINK.c.nhs_number).where(
    LINK.c.trust_ods == bindparam("trust"),
    LINK.c.local_id.in_(bindparam("local_ids", expanding=True)),
)
_HELD_UNDER = select(ASSERTION.c.study_id).where(
    ASSERTION.c.trust_ods == bindparam("trust"), ASSERTION.c.local_id == bindparam("local_id")
)


@functools.cache
def _upserts(dialect: str) -> tuple[Any, Any]:
    """The two ON CONFLICT statements, per backend: assertions (a withdrawal is permanent:
    withdrawn = old OR new) and local-id links (kept once)."""
    dialect_insert = pg_insert if dialect == "postgresql" else sqlite_insert
    assertion = dialect_insert(ASSERTION)
    assertion = assertion.on_conflict_do_update(
        index_elements=["study_id", "source", "patient_key"],
        set_={"withdrawn": ASSERTION.c.withdrawn | assertion.excluded.withdrawn},
    )
    link = dialect_insert(LINK).inline().on_conflict_do_nothing()
    return assertion, link


def _find(conn: Connection, trust: str, keys: list[tuple[str, str]]) -> dict[tuple[str, str], Any]:
    """The studies (locked for update) that a reference's keys already name."""
    params = {"trust": trust, **{("uid" if k == UID else "acc"): v for k, v in keys}}
    stmt = _FIND[tuple(k for k, _ in keys)]
    return {(r.kind, r.value): r for r in conn.execute(stmt, params)}


def _load(conn: Connection, study_id: str) -> Any:
    return conn.execute(_LOAD, {"study_id": study_id}).one()


@dataclass(slots=True)
class _Target:
    """The study one reference of a notice lands on: its stored row (None when this notice
    creates it) and the keys the reference adds to it."""

    id: str
    row: Any | None
    new_keys: list[tuple[str, str]]


def _resolve(conn: Connection, trust: str, ref: StudyRef) -> _Target:
    """Find the study a reference names by any of its keys, merging two records that turn out
    to be one; a new id when no key is known."""
    keys = _keys_of(ref)
    found = _find(conn, trust, keys)
    by_uid = found.get((UID, ref.study_uid or ""))
    by_acc = found.get((ACCESSION, ref.accession or ""))
    if (
        by_acc is not None
        and ref.study_uid
        and by_acc.study_uid is not None
        and (by_uid is None or by_uid.id != by_acc.id)
    ):
        # The accession names a study with another Study UID: two studies share an accession.
        # They are never joined; this UID keeps (or gets) a record of its own.
        log.warning("trust %s: an accession names studies with different Study UIDs", trust)
        keys, row = [(UID, ref.study_uid)], by_uid
    elif by_uid is not None and by_acc is not None and by_uid.id != by_acc.id:
        row = _load(conn, merge_studies(conn, ids=(by_uid.id, by_acc.id)))
    else:
        row = by_uid if by_uid is not None else by_acc
    study_id = row.id if row is not None else uuid.uuid4().hex
    return _Target(study_id, row, [key for key in keys if key not in found])


def merge_studies(conn: Connection, *, ids: tuple[str, str]) -> str:
    """Merge two records of one study into the one created first; returns its id. The other
    keeps a tombstone naming the survivor (its id answers 404 naming the survivor)."""
    rows = [_load(conn, study_id) for study_id in sorted(ids)]
    first, second = sorted(rows, key=lambda r: (r.created_at, r.id))
    survivor: str = first.id
    loser: str = second.id
    facts = facts_of_row(first).join(facts_of_row(second))
    last_seen = max(first.last_seen, second.last_seen)
    conn.execute(update(KEY).where(KEY.c.study_id == loser).values(study_id=survivor))
    _move_assertions(conn, loser=loser, survivor=survivor)
    conn.execute(update(STUDY).where(STUDY.c.merged_into == loser).values(merged_into=survivor))
    conn.execute(
        update(STUDY)
        .where(STUDY.c.id == survivor)
        .values(
            first_seen=min(first.first_seen, second.first_seen),
            last_seen=last_seen,
            study_uid=_least(first.study_uid, second.study_uid),
            accession=_least(first.accession, second.accession),
            version=STUDY.c.version + 1,
            updated_at=last_seen,
            **columns_of_facts(facts),
        )
    )
    conn.execute(
        update(STUDY)
        .where(STUDY.c.id == loser)
        .values(
            merged_into=survivor, nhs_number=None, version=STUDY.c.version + 1, updated_at=last_seen
        )
    )
    log.info("merged study %s into %s", loser, survivor)
    return survivor


def _least(*values: str | None) -> str | None:
    present = [v for v in values if v]
    return min(present) if present else None


def _move_assertions(conn: Connection, *, loser: str, survivor: str) -> None:
    kept = {
        (r.source, r.patient_key): r
        for r in conn.execute(select(ASSERTION).where(ASSERTION.c.study_id == survivor))
    }
    for row in conn.execute(select(ASSERTION).where(ASSERTION.c.study_id == loser)).all():
        known = kept.get((row.source, row.patient_key))
        if known is None:
            conn.execute(
                update(ASSERTION).where(ASSERTION.c.id == row.id).values(study_id=survivor)
            )
            continue
        if row.withdrawn and not known.withdrawn:
            conn.execute(update(ASSERTION).where(ASSERTION.c.id == known.id).values(withdrawn=True))
        conn.execute(ASSERTION.delete().where(ASSERTION.c.id == row.id))


def patient_claims(patient: PatientRef) -> list[tuple[str, str | None, str | None]]:
    """(patient_key, nhs_number, local_id) a notice asserts or withdraws. With an NHS Number
    the claim is the NHS Number (the local id becomes a link); a withdrawal withdraws both."""
    claims: list[tuple[str, str | None, str | None]] = []
    if patient.nhs_number:
        claims.append((f"nhs:{patient.nhs_number}", patient.nhs_number, None))
    if patient.local_id and (patient.withdrawn or not patient.nhs_number):
        claims.append((f"local:{patient.local_id}", None, patient.local_id))
    return claims


def _assertion_rows(notice: StudyNotice, study_id: str, now: datetime) -> list[dict[str, Any]]:
    return [
        {
            "study_id": study_id,
            "source": notice.source,
            "patient_key": key,
            "trust_ods": notice.trust_ods,
            "nhs_number": nhs,
            "local_id": local,
            "withdrawn": notice.patient.withdrawn,
            "first_seen": now,
        }
        for key, nhs, local in patient_claims(notice.patient)
    ]


def _record_assertions(conn: Connection, rows: list[dict[str, Any]]) -> None:
    """Insert this notice's claims; a withdrawal is permanent (withdrawn = old OR new)."""
    if rows:
        conn.execute(_upserts(conn.dialect.name)[0], rows)


def _record_link(conn: Connection, notice: StudyNotice, now: datetime) -> bool:
    """Record that the trust ties a local id to an NHS Number; True when the link is new."""
    patient = notice.patient
    if not (patient.nhs_number and patient.local_id):
        return False
    row = {
        "trust_ods": notice.trust_ods,
        "local_id": patient.local_id,
        "nhs_number": patient.nhs_number,
        "first_seen": now,
    }
    return bool(conn.execute(_upserts(conn.dialect.name)[1], row).rowcount)


def _links(
    conn: Connection, trust: str, assertions: Sequence[Assertion]
) -> dict[str, frozenset[str]]:
    local_ids = sorted({a.local_id for a in assertions if a.local_id and not a.withdrawn})
    if not local_ids:
        return {}
    grouped: dict[str, set[str]] = {}
    for r in conn.execute(_LINKS, {"trust": trust, "local_ids": local_ids}):
        grouped.setdefault(r.local_id, set()).add(r.nhs_number)
    return {k: frozenset(v) for k, v in grouped.items()}


def _stored_assertions(conn: Connection, study_id: str) -> list[Assertion]:
    rows = conn.execute(_STORED_ASSERTIONS, {"study_id": study_id})
    return [Assertion(r.nhs_number, r.local_id, bool(r.withdrawn)) for r in rows]


def _derived_columns(
    facts: StudyFacts, patient: Patient, assertions: Sequence[Assertion], first_seen: datetime
) -> dict[str, Any]:
    return {
        **columns_of_facts(facts),
        "nhs_number": patient.nhs_number,
        "patient_state": patient.state,
        "local_id": _least(*(a.local_id for a in assertions)),
        "status": fhir_status(facts, patient),
        "sort_time": facts.started or first_seen,
    }


_VISIBLE = (
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
    "number_of_series",
    "number_of_instances",
    "feeds",
)


def _differs(old: Any, new: Any) -> bool:
    if isinstance(old, datetime) and isinstance(new, datetime):
        return old.astimezone(UTC) != new.astimezone(UTC)
    return bool(old != new)


def _insert_keys(conn: Connection, trust: str, study_id: str, keys: list[tuple[str, str]]) -> None:
    if keys:
        conn.execute(_INSERT_KEY, _key_rows(trust, study_id, keys))


def _new_study(
    notice: StudyNotice,
    target: _Target,
    facts: StudyFacts,
    assertions: Sequence[Assertion],
    links: dict[str, frozenset[str]],
) -> dict[str, Any]:
    """The row of a study a notice creates: every column computed before the one INSERT."""
    now = notice.received_at
    uids = [v for k, v in target.new_keys if k == UID]
    accessions = [v for k, v in target.new_keys if k == ACCESSION]
    return {
        "id": target.id,
        "trust_ods": notice.trust_ods,
        "study_uid": _least(*uids),
        "accession": _least(*accessions),
        "created_at": now,
        "first_seen": now,
        "last_seen": now,
        "updated_at": now,
        "version": 1,
        "merged_into": None,
        **_derived_columns(facts, derive_patient(assertions, links), assertions, now),
    }


def _as_assertions(rows: list[dict[str, Any]]) -> list[Assertion]:
    return [Assertion(r["nhs_number"], r["local_id"], r["withdrawn"]) for r in rows]


def _key_rows(trust: str, study_id: str, keys: list[tuple[str, str]]) -> list[dict[str, Any]]:
    return [{"trust_ods": trust, "kind": k, "value": v, "study_id": study_id} for k, v in keys]


def _create(conn: Connection, notice: StudyNotice, target: _Target, facts: StudyFacts) -> None:
    """A study this notice creates."""
    rows = _assertion_rows(notice, target.id, notice.received_at)
    assertions = _as_assertions(rows)
    links = _links(conn, notice.trust_ods, assertions)
    conn.execute(_INSERT_STUDY, _new_study(notice, target, facts, assertions, links))
    _insert_keys(conn, notice.trust_ods, target.id, target.new_keys)
    conn.execute(_INSERT_ASSERTION, rows)


def _update(
    conn: Connection,
    study_id: str,
    row: Any,
    now: datetime,
    facts: StudyFacts | None,
    new_keys: list[tuple[str, str]],
) -> bool:
    """Derive a stored study again after this notice; bump its version only on a change."""
    assertions = _stored_assertions(conn, study_id)
    patient = derive_patient(assertions, _links(conn, row.trust_ods, assertions))
    joined = facts_of_row(row) if facts is None else facts_of_row(row).join(facts)
    values = _derived_columns(joined, patient, assertions, row.first_seen)
    values["study_uid"] = _least(row.study_uid, *(v for k, v in new_keys if k == UID))
    values["accession"] = _least(row.accession, *(v for k, v in new_keys if k == ACCESSION))
    changed = any(_differs(getattr(row, name), values[name]) for name in _VISIBLE)
    if changed:
        values |= {"version": row.version + 1, "updated_at": now}
        if patient.state == PatientState.QUARANTINED != row.patient_state:
            log.warning("study %s quarantined: its patient assertions conflict", study_id)
    if facts is not None:
        values["last_seen"] = max(row.last_seen, now)
    if changed or facts is not None:
        conn.execute(_UPDATE_STUDY, {"_study_id": study_id, **values})
    return changed


def _apply_ref(conn: Connection, notice: StudyNotice, ref: StudyRef) -> tuple[str, bool]:
    target = _resolve(conn, notice.trust_ods, ref)
    facts = facts_of_ref(notice, ref)
    if target.row is None:
        _create(conn, notice, target, facts)
        return target.id, True
    _insert_keys(conn, notice.trust_ods, target.id, target.new_keys)
    _record_assertions(conn, _assertion_rows(notice, target.id, notice.received_at))
    changed = _update(conn, target.id, target.row, notice.received_at, facts, target.new_keys)
    return target.id, changed


def _relink(conn: Connection, notice: StudyNotice, skip: set[str]) -> bool:
    """A new local-id link: every study held under that local id is derived again."""
    params = {"trust": notice.trust_ods, "local_id": notice.patient.local_id}
    changed = False
    for study_id in sorted(set(conn.execute(_HELD_UNDER, params).scalars()) - skip):
        row = _load(conn, study_id)
        changed |= _update(conn, study_id, row, notice.received_at, None, [])
    return changed


def apply_notice(session: Session, *, notice: StudyNotice) -> AppliedNotice:
    """Apply one notice: record the local-id link it states, resolve (and merge) each study it
    names, join their facts, record its patient assertions, and derive each touched study's
    patient again."""
    conn = session.connection()
    reads = Reads(conn)
    lock_local_ids(reads, notices=[notice])
    reads.run()
    return _apply(conn, notice)


def lock_local_ids(reads: Reads, *, notices: Sequence[StudyNotice]) -> None:
    """PostgreSQL: a transaction-scoped lock per (trust, local id) the notices name, taken in
    one order before the index is read (the first of `reads`). Two writers concerning one
    local id (one creating a study held under it, the other recording the link that lifts the
    hold) then go one after the other, and the later one sees what the earlier one committed:
    without it each could miss the other's uncommitted rows and the study would stay held.
    SQLite has one writer at a time already (BEGIN IMMEDIATE)."""
    if not reads.postgres:
        return
    keys = sorted({f"{n.trust_ods}/{local}" for n in notices if (local := n.patient.local_id)})
    if keys:  # unnest keeps the array's order, so every writer locks in the same order
        reads.add(
            (
                "SELECT pg_advisory_xact_lock(hashtextextended(k, 0)) "
                "FROM unnest(CAST(? AS text[])) k",
                [keys],
            )
        )


def _apply(conn: Connection, notice: StudyNotice) -> AppliedNotice:
    new_link = _record_link(conn, notice, notice.received_at)
    touched: dict[str, None] = {}
    changed = False
    for ref in notice.studies:
        if not (ref.study_uid or ref.accession):
            raise ValueError("a study reference needs a Study UID or an accession")
        study_id, ref_changed = _apply_ref(conn, notice, ref)
        touched[study_id] = None
        changed |= ref_changed
    if new_link:
        changed |= _relink(conn, notice, set(touched))
    if changed and notice.patient.nhs_number:
        log.debug("applied a notice for %s", mask(notice.patient.nhs_number))
    return AppliedNotice(tuple(touched), changed)


# --------------------------------------------------------------------------- batches

_TrustKey = tuple[str, str, str]  # (trust, kind, value)
HELD = "held"  # not a key kind: _stored's mark for a local id that holds stored studies


def apply_notices(
    session: Session,
    *,
    notices: Sequence[StudyNotice],
    writes: Writes | None = None,
    stored: Callable[[], Stored] | None = None,
) -> None:
    """Apply notices in order, to the state apply_notice leaves applying them one by one.

    Notices that can only create new studies are written together, a few statements for the
    whole batch instead of a few per notice. Such a notice states an NHS Number and withdraws
    nothing (so its claims name no local id and no link bears on its study), its keys are
    stored nowhere and named by no other notice of the batch, and its local id holds no stored
    study and is named by no notice that goes the other way. It shares no key, study or local
    id with the rest of the batch, so the order between it and the others changes nothing;
    every other notice goes, in order, through apply_notice.

    First, on PostgreSQL, the batch's local ids are locked (lock_local_ids), so a concurrent
    writer concerning one of them goes before or after the whole batch, and what is stored
    of the batch's keys is looked up (look_up_stored). `stored`: the caller has done both in
    this transaction, for these notices or more, and this gives the look-up's answer.

    `writes`: the new studies' rows are left there for the caller to send with its own
    (they are the last statements of the batch); without it they are written here."""
    conn = session.connection()
    if stored is None:
        reads = Reads(conn)
        lock_local_ids(reads, notices=notices)
        stored = look_up_stored(reads, notices=notices)
        reads.run()
    fresh = _creating_only(notices, stored())
    for i, notice in enumerate(notices):
        if i not in fresh:
            _apply(conn, notice)
    if fresh:
        pending = Writes() if writes is None else writes
        _create_all(conn, [notices[i] for i in sorted(fresh)], pending)
        if writes is None:
            pending.run(conn)


def _trust_keys(notice: StudyNotice) -> list[_TrustKey]:
    return [(notice.trust_ods, k, v) for ref in notice.studies for k, v in _keys_of(ref)]


def _local(notice: StudyNotice) -> tuple[str, str] | None:
    local = notice.patient.local_id
    return (notice.trust_ods, local) if local else None


def _may_create(n: StudyNotice) -> bool:
    """What a notice needs, on its own, to be written with the new studies of its batch."""
    return bool(
        n.patient.nhs_number
        and not n.patient.withdrawn
        and n.studies
        and all(ref.study_uid or ref.accession for ref in n.studies)
    )


Stored = tuple[set[_TrustKey], set[tuple[str, str]]]  # stored keys; local ids holding studies


def look_up_stored(reads: Reads, *, notices: Sequence[StudyNotice]) -> Callable[[], Stored]:
    """Which keys of the notices that may only create studies are stored already, and which
    of their local ids hold stored patient assertions (as `(trust, HELD, local id)`): one
    statement added to `reads`, one term per trust and kind; the function returned reads its
    answer once they have run."""
    creating = [n for n in notices if _may_create(n)]
    keys = [key for n in creating for key in _trust_keys(n)]
    local_ids = [local for n in creating if (local := _local(n))]
    if not keys:
        return lambda: (set(), set())
    match, params = in_groups(("trust_ods", "kind"), "value", keys)
    sql = f"SELECT trust_ods, kind, value FROM {KEY.name} WHERE {match}"
    if local_ids:
        held, held_params = in_groups(("trust_ods",), "local_id", local_ids)
        sql += (
            f" UNION ALL SELECT DISTINCT trust_ods, '{HELD}', local_id "
            f"FROM {ASSERTION.name} WHERE {held}"
        )
        params += held_params
    rows = reads.add((sql, params))

    def found() -> Stored:
        stored: set[_TrustKey] = set()
        holding: set[tuple[str, str]] = set()
        for trust, kind, value in rows():
            if kind == HELD:
                holding.add((trust, value))
            else:
                stored.add((trust, kind, value))
        return stored, holding

    return found


def _creating_only(notices: Sequence[StudyNotice], known: Stored) -> set[int]:
    """The notices of the batch that create new studies and touch nothing else (`known`:
    look_up_stored's answer for these notices or more)."""
    keys = [_trust_keys(n) for n in notices]
    locals_ = [_local(n) for n in notices]
    named = Counter(key for ks in keys for key in ks)
    candidates = {
        i
        for i, n in enumerate(notices)
        if _may_create(n) and all(named[key] == 1 for key in keys[i])
    }
    others = {locals_[i] for i in range(len(notices)) if i not in candidates} - {None}
    stored, holding = known
    return {
        i
        for i in candidates
        if locals_[i] not in others and stored.isdisjoint(keys[i]) and locals_[i] not in holding
    }


def _create_all(conn: Connection, notices: Sequence[StudyNotice], writes: Writes) -> None:
    """Every study of notices that only create: the rows of _record_link and _create, left in
    `writes` (on PostgreSQL one statement for all of them, with the journal's rows)."""
    links: dict[tuple[str, str, str], dict[str, Any]] = {}
    studies, keys, assertions = [], [], []
    for notice in notices:
        patient = notice.patient
        if patient.local_id and patient.nhs_number:
            link = (notice.trust_ods, patient.local_id, patient.nhs_number)
            links.setdefault(
                link,
                {
                    "trust_ods": notice.trust_ods,
                    "local_id": patient.local_id,
                    "nhs_number": patient.nhs_number,
                    "first_seen": notice.received_at,
                },
            )
        for ref in notice.studies:
            target = _Target(uuid.uuid4().hex, None, _keys_of(ref))
            rows = _assertion_rows(notice, target.id, notice.received_at)
            # An NHS Number and no withdrawal: the claims name no local id, so no links apply.
            facts = facts_of_ref(notice, ref)
            studies.append(_new_study(notice, target, facts, _as_assertions(rows), {}))
            keys += _key_rows(notice.trust_ods, target.id, target.new_keys)
            assertions += rows
    # Links are kept once, the first notice's time, as _record_link keeps them.
    writes.add(LINK, list(links.values()), skip_existing=True)
    writes.add(STUDY, studies)
    writes.add(KEY, keys)
    writes.add(ASSERTION, assertions)


def study_ids_for(
    session: Session, *, trust_ods: str, study_uid: str | None = None, accession: str | None = None
) -> set[str]:
    """The studies a trust's keys name (for the feeds' tests and the operators' tools)."""
    keys = _keys_of(StudyRef(study_uid=study_uid, accession=accession))
    if not keys:
        return set()
    return {row.id for row in _find(session.connection(), trust_ods, keys).values()}


@dataclass(frozen=True, slots=True)
class Quarantined:
    """A study whose live patient assertions conflict, with who asserted what."""

    study_id: str
    trust_ods: str
    study_uid: str | None
    accession: str | None
    claims: tuple[tuple[str, str], ...]  # (source, patient key with NHS Numbers masked)


def list_quarantined(session: Session) -> list[Quarantined]:
    """Studies held back from every patient until an operator resolves the conflict."""
    studies = session.execute(
        select(STUDY.c.id, STUDY.c.trust_ods, STUDY.c.study_uid, STUDY.c.accession)
        .where(STUDY.c.patient_state == PatientState.QUARANTINED, STUDY.c.merged_into.is_(None))
        .order_by(STUDY.c.trust_ods, STUDY.c.id)
    ).all()
    result = []
    for s in studies:
        claims = session.execute(
            select(ASSERTION.c.source, ASSERTION.c.nhs_number, ASSERTION.c.local_id)
            .where(ASSERTION.c.study_id == s.id, ASSERTION.c.withdrawn.is_(False))
            .order_by(ASSERTION.c.source)
        ).all()
        shown = tuple(
            (c.source, f"nhs:{mask(c.nhs_number)}" if c.nhs_number else f"local:{c.local_id}")
            for c in claims
        )
        result.append(Quarantined(s.id, s.trust_ods, s.study_uid, s.accession, shown))
    return result
