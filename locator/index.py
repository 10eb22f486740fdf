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

import json
import logging
import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import and_, func, insert, or_, select, update
from sqlalchemy.orm import Session

from locator.models import (
    local_link_table,
    patient_assertion_table,
    study_key_table,
    study_table,
)
from locator.nhs_number import mask
from locator.notice import (
    REPORT_RANK,
    STATUS_RANK,
    PatientRef,
    ReportStatus,
    SeriesRef,
    StudyNotice,
    StudyRef,
    StudyStatus,
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


def _keys_of(ref: StudyRef) -> list[tuple[str, str]]:
    keys = []
    if ref.study_uid:
        keys.append((UID, ref.study_uid))
    if ref.accession:
        keys.append((ACCESSION, ref.accession))
    return keys


def _find_keys(
    session: Session, trust: str, keys: list[tuple[str, str]]
) -> dict[tuple[str, str], str]:
    condition = or_(*(and_(KEY.c.kind == k, KEY.c.value == v) for k, v in keys))
    rows = session.execute(
        select(KEY.c.kind, KEY.c.value, KEY.c.study_id).where(KEY.c.trust_ods == trust, condition)
    )
    return {(r.kind, r.value): r.study_id for r in rows}


def _load_studies(session: Session, ids: Iterable[str]) -> dict[str, Any]:
    stmt = select(STUDY).where(STUDY.c.id.in_(sorted(set(ids)))).with_for_update()
    return {row.id: row for row in session.execute(stmt)}


def _study_uids(session: Session, study_id: str) -> set[str]:
    stmt = select(KEY.c.value).where(KEY.c.study_id == study_id, KEY.c.kind == UID)
    return set(session.execute(stmt).scalars())


def _new_study(session: Session, trust: str, now: datetime) -> str:
    study_id = uuid.uuid4().hex
    facts = StudyFacts()
    session.execute(
        insert(STUDY).values(
            id=study_id,
            trust_ods=trust,
            patient_state=PatientState.HELD,
            status=StudyStatus.REGISTERED.value,
            sort_time=now,
            created_at=now,
            first_seen=now,
            last_seen=now,
            updated_at=now,
            version=0,
            **columns_of_facts(facts),
        )
    )
    return study_id


def _resolve(session: Session, trust: str, ref: StudyRef, now: datetime) -> str:
    """The surviving study for a reference: found by any of its keys, created when new, and
    merged when its keys name two records that turn out to be one."""
    keys = _keys_of(ref)
    found = _find_keys(session, trust, keys)
    by_uid = found.get((UID, ref.study_uid or ""))
    by_acc = found.get((ACCESSION, ref.accession or ""))
    if by_acc and ref.study_uid and by_acc != by_uid and _study_uids(session, by_acc):
        # The accession already names a study with another Study UID: two studies share an
        # accession. They are never joined; this UID keeps a record of its own.
        log.warning("trust %s: an accession names studies with different Study UIDs", trust)
        keys = [(UID, ref.study_uid)]
        study_id = by_uid or _new_study(session, trust, now)
    elif by_uid and by_acc and by_uid != by_acc:
        study_id = merge_studies(session, ids=(by_uid, by_acc))
    else:
        study_id = by_uid or by_acc or _new_study(session, trust, now)
    for kind, value in keys:
        if (kind, value) not in found:
            session.execute(
                insert(KEY).values(trust_ods=trust, kind=kind, value=value, study_id=study_id)
            )
    return study_id


def merge_studies(session: Session, *, ids: tuple[str, str]) -> str:
    """Merge two records of one study into the one created first; returns its id."""
    rows = _load_studies(session, ids)
    first, second = sorted(rows.values(), key=lambda r: (r.created_at, r.id))
    survivor: str = first.id
    loser: str = second.id
    facts = facts_of_row(first).join(facts_of_row(second))
    session.execute(update(KEY).where(KEY.c.study_id == loser).values(study_id=survivor))
    _move_assertions(session, loser=loser, survivor=survivor)
    session.execute(update(STUDY).where(STUDY.c.merged_into == loser).values(merged_into=survivor))
    last_seen = max(first.last_seen, second.last_seen)
    session.execute(
        update(STUDY)
        .where(STUDY.c.id == survivor)
        .values(
            first_seen=min(first.first_seen, second.first_seen),
            last_seen=last_seen,
            version=STUDY.c.version + 1,
            updated_at=last_seen,
            **columns_of_facts(facts),
        )
    )
    session.execute(
        update(STUDY)
        .where(STUDY.c.id == loser)
        .values(
            merged_into=survivor, nhs_number=None, version=STUDY.c.version + 1, updated_at=last_seen
        )
    )
    log.info("merged study %s into %s", loser, survivor)
    return survivor


def _move_assertions(session: Session, *, loser: str, survivor: str) -> None:
    kept = {
        (r.source, r.patient_key): r
        for r in session.execute(select(ASSERTION).where(ASSERTION.c.study_id == survivor))
    }
    for row in session.execute(select(ASSERTION).where(ASSERTION.c.study_id == loser)).all():
        known = kept.get((row.source, row.patient_key))
        if known is None:
            session.execute(
                update(ASSERTION).where(ASSERTION.c.id == row.id).values(study_id=survivor)
            )
            continue
        if row.withdrawn and not known.withdrawn:
            session.execute(
                update(ASSERTION).where(ASSERTION.c.id == known.id).values(withdrawn=True)
            )
        session.execute(ASSERTION.delete().where(ASSERTION.c.id == row.id))


def _patient_keys(patient: PatientRef) -> list[tuple[str, str | None, str | None]]:
    """(patient_key, nhs_number, local_id) rows a notice asserts or withdraws."""
    keys: list[tuple[str, str | None, str | None]] = []
    if patient.nhs_number:
        keys.append((f"nhs:{patient.nhs_number}", patient.nhs_number, None))
    if patient.local_id and (patient.withdrawn or not patient.nhs_number):
        keys.append((f"local:{patient.local_id}", None, patient.local_id))
    return keys


def _assert_patient(session: Session, study_id: str, notice: StudyNotice, now: datetime) -> None:
    patient = notice.patient
    for patient_key, nhs, local in _patient_keys(patient):
        existing = session.execute(
            select(ASSERTION.c.id, ASSERTION.c.withdrawn).where(
                ASSERTION.c.study_id == study_id,
                ASSERTION.c.source == notice.source,
                ASSERTION.c.patient_key == patient_key,
            )
        ).first()
        if existing is None:
            session.execute(
                insert(ASSERTION).values(
                    study_id=study_id,
                    source=notice.source,
                    patient_key=patient_key,
                    trust_ods=notice.trust_ods,
                    nhs_number=nhs,
                    local_id=local,
                    withdrawn=patient.withdrawn,
                    first_seen=now,
                )
            )
        elif patient.withdrawn and not existing.withdrawn:
            session.execute(
                update(ASSERTION).where(ASSERTION.c.id == existing.id).values(withdrawn=True)
            )


def _link_local(session: Session, notice: StudyNotice, now: datetime) -> list[str]:
    """Record that the trust ties a local id to an NHS Number; return the studies held
    under that local id, whose patient must be derived again."""
    patient = notice.patient
    if not (patient.nhs_number and patient.local_id):
        return []
    exists = session.execute(
        select(LINK.c.nhs_number).where(
            LINK.c.trust_ods == notice.trust_ods,
            LINK.c.local_id == patient.local_id,
            LINK.c.nhs_number == patient.nhs_number,
        )
    ).first()
    if exists is not None:
        return []
    session.execute(
        insert(LINK).values(
            trust_ods=notice.trust_ods,
            local_id=patient.local_id,
            nhs_number=patient.nhs_number,
            first_seen=now,
        )
    )
    stmt = select(ASSERTION.c.study_id).where(
        ASSERTION.c.trust_ods == notice.trust_ods, ASSERTION.c.local_id == patient.local_id
    )
    return sorted(set(session.execute(stmt).scalars()))


def _derive(session: Session, trust: str, study_id: str) -> Patient:
    rows = session.execute(
        select(ASSERTION.c.nhs_number, ASSERTION.c.local_id, ASSERTION.c.withdrawn).where(
            ASSERTION.c.study_id == study_id
        )
    ).all()
    assertions = [Assertion(r.nhs_number, r.local_id, bool(r.withdrawn)) for r in rows]
    local_ids = sorted({a.local_id for a in assertions if a.local_id and not a.withdrawn})
    links: dict[str, frozenset[str]] = {}
    if local_ids:
        link_rows = session.execute(
            select(LINK.c.local_id, LINK.c.nhs_number).where(
                LINK.c.trust_ods == trust, LINK.c.local_id.in_(local_ids)
            )
        )
        grouped: dict[str, set[str]] = {}
        for r in link_rows:
            grouped.setdefault(r.local_id, set()).add(r.nhs_number)
        links = {k: frozenset(v) for k, v in grouped.items()}
    return derive_patient(assertions, links)


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


def _refresh(session: Session, study_id: str, now: datetime, extra: StudyFacts | None) -> bool:
    """Write a study's derived columns; bump its version only when something changed."""
    row = session.execute(select(STUDY).where(STUDY.c.id == study_id).with_for_update()).one()
    facts = facts_of_row(row) if row.version else StudyFacts()
    if extra is not None:
        facts = facts.join(extra)
    patient = _derive(session, row.trust_ods, study_id)
    primary = _primary_keys(session, study_id)
    local_id = session.execute(
        select(func.min(ASSERTION.c.local_id)).where(ASSERTION.c.study_id == study_id)
    ).scalar()
    values: dict[str, Any] = {
        **columns_of_facts(facts),
        **primary,
        "nhs_number": patient.nhs_number,
        "patient_state": patient.state,
        "local_id": local_id,
        "status": fhir_status(facts, patient),
        "sort_time": facts.started or row.first_seen,
    }
    changed = row.version == 0 or any(
        _differs(getattr(row, name), values[name]) for name in _VISIBLE
    )
    if changed:
        values |= {"version": row.version + 1, "updated_at": now}
        if patient.state == PatientState.QUARANTINED and row.patient_state != patient.state:
            log.warning("study %s quarantined: its patient assertions conflict", study_id)
    values["last_seen"] = max(row.last_seen, now) if extra is not None else row.last_seen
    session.execute(update(STUDY).where(STUDY.c.id == study_id).values(**values))
    return changed


def _differs(old: Any, new: Any) -> bool:
    if isinstance(old, datetime) and isinstance(new, datetime):
        return old.astimezone(UTC) != new.astimezone(UTC)
    return bool(old != new)


def _primary_keys(session: Session, study_id: str) -> dict[str, str | None]:
    rows = session.execute(
        select(KEY.c.kind, func.min(KEY.c.value))
        .where(KEY.c.study_id == study_id)
        .group_by(KEY.c.kind)
    ).all()
    found = {kind: value for kind, value in rows}
    return {"study_uid": found.get(UID), "accession": found.get(ACCESSION)}


def apply_notice(session: Session, *, notice: StudyNotice) -> AppliedNotice:
    """Apply one notice: resolve (and merge) its studies, join their facts, record the
    patient assertions and local links, derive each touched study's patient."""
    now = notice.received_at
    touched: list[str] = []
    for ref in notice.studies:
        if not (ref.study_uid or ref.accession):
            raise ValueError("a study reference needs a Study UID or an accession")
        study_id = _resolve(session, notice.trust_ods, ref, now)
        _assert_patient(session, study_id, notice, now)
        touched.append(study_id)
    relinked = _link_local(session, notice, now)
    changed = False
    contributions: dict[str, StudyFacts] = {}
    for ref, study_id in zip(notice.studies, touched, strict=True):
        survivor = _survivor(session, study_id)
        facts = facts_of_ref(notice, ref)
        contributions[survivor] = (
            contributions[survivor].join(facts) if survivor in contributions else facts
        )
    for study_id, facts in contributions.items():
        changed |= _refresh(session, study_id, now, facts)
    for study_id in relinked:
        if study_id not in contributions:
            changed |= _refresh(session, _survivor(session, study_id), now, None)
    if notice.patient.nhs_number:
        log.debug("applied notice for %s", mask(notice.patient.nhs_number))
    return AppliedNotice(tuple(dict.fromkeys(contributions)), changed)


def _survivor(session: Session, study_id: str) -> str:
    """Follow merged_into (a study merged by a later reference of the same notice)."""
    merged = session.execute(select(STUDY.c.merged_into).where(STUDY.c.id == study_id)).scalar()
    return merged or study_id


def study_ids_for(
    session: Session, *, trust_ods: str, study_uid: str | None = None, accession: str | None = None
) -> set[str]:
    """The studies a trust's key names (for the feeds' tests and the operators' tools)."""
    keys = _keys_of(StudyRef(study_uid=study_uid, accession=accession))
    return set(_find_keys(session, trust_ods, keys).values()) if keys else set()


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
