"""The merge rules as properties (hypothesis), on SQLite and PostgreSQL.

A small "world" of studies (each a Study UID with one or two accessions) is fixed per example;
notices refer to its studies by UID, by accession or by both, from several sources, asserting
or withdrawing patients. Then:
- any order and any repetition of the notices end in the same state (up to ids and timestamps);
- status and report status never regress while the notices are applied;
- the patient state equals the one a simple model computes (conflicts always quarantine).
Every example runs in its own key namespace, so one database serves all examples.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass, replace
from datetime import timedelta
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from locator.core.index import apply_notices
from locator.core.nhs_number import NhsNumber
from locator.core.notice import (
    REPORT_RANK,
    STATUS_RANK,
    Coding,
    FeedKind,
    PatientRef,
    ReportStatus,
    SeriesRef,
    StudyNotice,
    StudyRef,
    StudyStatus,
)
from locator.store.db import transaction
from locator.store.models import study_key_table, study_table
from tests.index_helpers import NOW, apply_all

pytestmark = pytest.mark.usefixtures("registry")
Factory = sessionmaker[Session]

WORLD = [("u1", ("a1",)), ("u2", ("a2", "a3")), ("u3", ("a4",))]
NHS = ["9990000018", "9990000026", "9990000034"]
LOCAL = ["L1", "L2"]
SOURCES = ["hl7:CRIS", "hl7:RADIS", "mpps:s1", "mpps:s2"]


@dataclass(frozen=True)
class Spec:
    """A notice before namespacing: which world study, how it is named, what it says."""

    study: int
    naming: str  # "uid" | "acc" | "both"
    acc_index: int
    source: str
    nhs: str | None
    local: str | None
    withdrawn: bool
    status: StudyStatus | None
    report: ReportStatus | None
    report_hour: int
    started_day: int | None
    modality: str | None
    series_version: int
    series_count: int | None
    at_hour: int


def _spec_strategy() -> st.SearchStrategy[Spec]:
    patient = st.one_of(
        st.tuples(st.sampled_from(NHS), st.none()),
        st.tuples(st.none(), st.sampled_from(LOCAL)),
        st.tuples(st.sampled_from(NHS), st.sampled_from(LOCAL)),
    )
    return st.builds(
        lambda study, naming, acc_index, source, pat, withdrawn, *rest: Spec(
            study, naming, acc_index, source, pat[0], pat[1], withdrawn, *rest
        ),
        st.integers(0, len(WORLD) - 1),
        st.sampled_from(["uid", "acc", "both"]),
        st.integers(0, 1),
        st.sampled_from(SOURCES),
        patient,
        st.sampled_from([False, False, False, True]),
        st.none() | st.sampled_from(list(STATUS_RANK)),
        st.none() | st.sampled_from(list(ReportStatus)),
        st.integers(0, 3),
        st.none() | st.integers(0, 3),
        st.none() | st.sampled_from(["CT", "MR", "US"]),
        st.integers(0, 2),
        st.none() | st.integers(0, 5),
        st.integers(0, 5),
    )


specs_strategy = st.lists(_spec_strategy(), min_size=1, max_size=6)


def build(spec: Spec, ns: str) -> StudyNotice:
    uid, accessions = WORLD[spec.study]
    acc = accessions[spec.acc_index % len(accessions)]
    ref = StudyRef(
        study_uid=f"{ns}.{uid}" if spec.naming in ("uid", "both") else None,
        accession=f"{ns}-{acc}" if spec.naming in ("acc", "both") else None,
        modalities=(spec.modality,) if spec.modality else (),
        procedure=Coding("https://nicip.nhs.uk", "CHEAD", "CT Head") if spec.modality else None,
        started=NOW + timedelta(days=spec.started_day) if spec.started_day is not None else None,
        status=spec.status,
        report_status=spec.report,
        report_time=NOW + timedelta(hours=spec.report_hour) if spec.report else None,
        report_hash=f"h{spec.report_hour}" if spec.report else None,
        series=(
            tuple(SeriesRef(f"{uid}.s{i}", "CT", i + 1) for i in range(spec.series_count))
            if spec.series_count is not None and spec.source.startswith("mpps")
            else None
        ),
        series_version=spec.series_version,
    )
    patient = PatientRef(
        nhs_number=NhsNumber(spec.nhs) if spec.nhs else None,
        local_id=f"{ns}-{spec.local}" if spec.local else None,
        withdrawn=spec.withdrawn,
    )
    feed = FeedKind.MPPS if spec.source.startswith("mpps") else FeedKind.HL7
    return StudyNotice(
        "RZZ01", feed, spec.source, patient, (ref,), NOW + timedelta(hours=spec.at_hour)
    )


_COMPARED = (
    "status",
    "evidence_status",
    "report_status",
    "report_time",
    "started",
    "modalities",
    "procedures",
    "series",
    "number_of_series",
    "number_of_instances",
    "nhs_number",
    "patient_state",
    "feeds",
)


def state(factory: Factory, ns: str) -> set[tuple[Any, ...]]:
    """Every surviving study of the namespace: its keys (namespace removed) and its facts."""
    with factory() as session:
        rows = session.execute(
            select(study_key_table.c.kind, study_key_table.c.value, study_table)
            .join(study_table, study_table.c.id == study_key_table.c.study_id)
            .where(study_key_table.c.value.like(f"{ns}%"))
        ).all()
    by_study: dict[str, list[Any]] = {}
    for row in rows:
        assert row.merged_into is None, "a key points at a merged-away study"
        by_study.setdefault(row.id, []).append(row)
    result = set()
    for study_rows in by_study.values():
        keys = frozenset((r.kind, r.value[len(ns) :]) for r in study_rows)
        facts = tuple(getattr(study_rows[0], name) for name in _COMPARED)
        result.add((keys, *facts))
    return result


def model_patient(specs: list[Spec], study: int) -> tuple[str, str | None]:
    """The patient a study should have, computed independently of the index's code."""
    claims: dict[tuple[str, str], bool] = {}  # (source, patient key) -> withdrawn
    links: dict[str, set[str]] = {}
    for s in specs:
        if s.nhs and s.local:
            links.setdefault(s.local, set()).add(s.nhs)
        if s.study != study:
            continue
        keys = [f"nhs:{s.nhs}"] if s.nhs else []
        if s.local and (s.withdrawn or not s.nhs):
            keys.append(f"local:{s.local}")
        for key in keys:
            claims[(s.source, key)] = claims.get((s.source, key), False) or s.withdrawn
    live = [key for (_, key), withdrawn in claims.items() if not withdrawn]
    if not live:
        gone = {key[4:] for (_, key), _w in claims.items() if key.startswith("nhs:")}
        return ("entered-in-error", gone.pop() if len(gone) == 1 else None)
    numbers: set[str] = set()
    for key in live:
        numbers |= {key[4:]} if key.startswith("nhs:") else links.get(key[6:], set())
    if len(numbers) > 1:
        return ("quarantined", None)
    return ("linked", numbers.pop()) if numbers else ("held", None)


PROPERTY_SETTINGS = settings(
    max_examples=30,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)


@PROPERTY_SETTINGS
@given(specs=specs_strategy, data=st.data())
def test_any_order_and_repetition_end_in_the_same_state(
    session_factory: Factory, specs: list[Spec], data: st.DataObject
) -> None:
    order = data.draw(st.permutations(specs))
    repeats = data.draw(st.lists(st.sampled_from(specs), max_size=4))
    ns1, ns2 = uuid.uuid4().hex[:10], uuid.uuid4().hex[:10]
    apply_all(session_factory, [build(s, ns1) for s in specs])
    apply_all(session_factory, [build(s, ns2) for s in [*order, *repeats]])
    assert state(session_factory, ns1) == state(session_factory, ns2)


@PROPERTY_SETTINGS
@given(specs=specs_strategy)
def test_status_and_report_never_regress(session_factory: Factory, specs: list[Spec]) -> None:
    """Whatever record a key names, its status and report rank only go up."""
    ns = uuid.uuid4().hex[:10]
    best: dict[tuple[str, str], tuple[int, int]] = {}
    for spec in specs:
        apply_all(session_factory, [build(spec, ns)])
        for keys, *facts in state(session_factory, ns):
            row = dict(zip(_COMPARED, facts, strict=True))
            report = row["report_status"]
            ranks = (
                STATUS_RANK[StudyStatus(row["evidence_status"])],
                REPORT_RANK[ReportStatus(report)] if report else 0,
            )
            for key in keys:
                previous = best.get(key, (0, 0))
                assert ranks[0] >= previous[0] and ranks[1] >= previous[1]
                best[key] = ranks


@PROPERTY_SETTINGS
@given(specs=specs_strategy)
def test_patient_state_matches_the_model(session_factory: Factory, specs: list[Spec]) -> None:
    # Name each study by both keys so the record partition is the world's.
    specs = [replace(s, naming="both") for s in specs]
    ns = uuid.uuid4().hex[:10]
    apply_all(session_factory, [build(s, ns) for s in specs])
    for keys, *facts in state(session_factory, ns):
        row = dict(zip(_COMPARED, facts, strict=True))
        uid = next(v for k, v in keys if k == "uid")
        study = next(i for i, (u, _) in enumerate(WORLD) if uid == f".{u}")
        expected_state, expected_nhs = model_patient(specs, study)
        assert (row["patient_state"], row["nhs_number"]) == (expected_state, expected_nhs)
        if expected_state == "entered-in-error":
            assert row["status"] == "entered-in-error"


@PROPERTY_SETTINGS
@given(specs=specs_strategy, data=st.data())
def test_batches_end_in_the_same_state_as_one_by_one(
    session_factory: Factory, specs: list[Spec], data: st.DataObject
) -> None:
    """The HL7 group commit applies a batch with apply_notices: cut the same notices into
    batches anywhere and the end state is that of applying them one by one."""
    cuts = sorted(data.draw(st.sets(st.integers(1, max(1, len(specs) - 1)))))
    ns1, ns2 = uuid.uuid4().hex[:10], uuid.uuid4().hex[:10]
    apply_all(session_factory, [build(s, ns1) for s in specs])
    notices = [build(s, ns2) for s in specs]
    for start, end in zip([0, *cuts], [*cuts, len(notices)], strict=True):
        with transaction(session_factory) as session:
            apply_notices(session, notices=notices[start:end])
    assert state(session_factory, ns1) == state(session_factory, ns2)
