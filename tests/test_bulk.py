"""The bulk loader writes what the index would: the same notices, applied one by one with
apply_notice or loaded with bulk_load, leave the same study, key, assertion and link rows,
and the loaded studies are found by a patient's NHS Number the way the API reads them."""

from __future__ import annotations

from typing import Any

import pytest
from sqlalchemy import Engine, delete, select
from sqlalchemy.orm import Session, sessionmaker

from locator.bulk import STUDY_COLUMNS, BulkLoadError, bulk_load
from locator.db import transaction
from locator.index import apply_notice
from locator.models import (
    local_link_table,
    patient_assertion_table,
    study_key_table,
    study_table,
)
from locator.notice import StudyNotice
from locator.trusts import store_trusts
from tests.bench.datagen import Generator, make_trusts, notices_of

STUDIES = 150
# Bookkeeping that differs by construction: ids are new, and apply_notice bumps the version
# once per notice that changed the study where the loader writes version 1.
IGNORED = {"id", "version", "merged_into"}


def _generate(session_factory: sessionmaker[Session]) -> list[tuple[StudyNotice, ...]]:
    trusts = make_trusts(3)
    with transaction(session_factory) as session:
        store_trusts(session, trusts=trusts)
    return [notices_of(s) for s in Generator(trusts, seed=7).studies(STUDIES)]


def _snapshot(engine: Engine) -> dict[str, Any]:
    """Every row the index wrote, keyed by what identifies it apart from the study id."""
    with engine.connect() as conn:
        studies = {r.accession: r for r in conn.execute(select(study_table))}
        by_id = {r.id: acc for acc, r in studies.items()}
        keys = {
            (r.trust_ods, r.kind, r.value, by_id[r.study_id])
            for r in conn.execute(select(study_key_table))
        }
        assertions = {
            (by_id[r.study_id], r.source, r.patient_key, r.nhs_number, r.local_id, r.withdrawn)
            for r in conn.execute(select(patient_assertion_table))
        }
        links = {
            (r.trust_ods, r.local_id, r.nhs_number) for r in conn.execute(select(local_link_table))
        }
    rows = {
        acc: {c: getattr(r, c) for c in STUDY_COLUMNS if c not in IGNORED}
        for acc, r in studies.items()
    }
    return {"studies": rows, "keys": keys, "assertions": assertions, "links": links}


def _clear(engine: Engine) -> None:
    with engine.begin() as conn:
        for table in (local_link_table, patient_assertion_table, study_key_table, study_table):
            conn.execute(delete(table))


def test_bulk_load_writes_what_apply_notice_writes(
    engine: Engine, session_factory: sessionmaker[Session]
) -> None:
    studies = _generate(session_factory)
    for notices in studies:
        for notice in notices:
            with transaction(session_factory) as session:
                apply_notice(session, notice=notice)
    expected = _snapshot(engine)
    _clear(engine)

    stats = bulk_load(engine, studies=studies, batch_size=40)

    assert stats.studies == STUDIES
    loaded = _snapshot(engine)
    assert loaded["keys"] == expected["keys"]
    assert loaded["assertions"] == expected["assertions"]
    assert loaded["links"] == expected["links"]
    assert loaded["studies"].keys() == expected["studies"].keys()
    for accession, row in expected["studies"].items():
        assert loaded["studies"][accession] == row, accession


def test_loaded_studies_are_found_by_nhs_number(
    engine: Engine, session_factory: sessionmaker[Session]
) -> None:
    studies = _generate(session_factory)
    bulk_load(engine, studies=studies, batch_size=64)
    patient = studies[0][0].patient.nhs_number
    mine = [n for n in studies if n[0].patient.nhs_number == patient]
    s = study_table
    # The API's hot path: linked, visible studies of one NHS Number, newest first.
    with engine.connect() as conn:
        found = conn.execute(
            select(s.c.accession, s.c.status, s.c.sort_time)
            .where(
                s.c.nhs_number == patient, s.c.patient_state == "linked", s.c.merged_into.is_(None)
            )
            .order_by(s.c.sort_time.desc(), s.c.id.desc())
        ).all()
    assert {r.accession for r in found} == {n[0].studies[0].accession for n in mine}
    times = [r.sort_time for r in found]
    assert times == sorted(times, reverse=True)


def test_a_key_already_stored_fails_its_batch(
    engine: Engine, session_factory: sessionmaker[Session]
) -> None:
    studies = _generate(session_factory)
    bulk_load(engine, studies=studies[:10], batch_size=10)
    with pytest.raises(BulkLoadError):
        bulk_load(engine, studies=studies[10:20] + studies[:1], batch_size=11)
    with engine.connect() as conn:
        assert len(conn.execute(select(study_table.c.id)).all()) == 10
