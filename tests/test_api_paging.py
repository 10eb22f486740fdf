"""Keyset paging with opaque cursors, on SQLite and PostgreSQL: stable while feeds insert,
replayable, no NHS Number in any link, refused when tampered with or expired."""

from __future__ import annotations

import threading
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from sqlalchemy import Engine, select
from sqlalchemy.orm import Session, sessionmaker

from locator.api.paging import CursorCodec, CursorState, load_or_create_secret
from locator.store.models import service_setting_table
from locator.trusts import TrustRegistry
from tests.api_helpers import (
    ALICE,
    BOB,
    NHS,
    T0,
    TestClient,
    add_studies,
    client_for,
    diagnostics,
    fhir_json,
    link,
    make_app,
    match_ids,
    outcome_of,
    patient_studies,
    search,
    study,
)

Factory = sessionmaker[Session]
BASE = "http://locator.test/fhir/ImagingStudy?_cursor="


@pytest.fixture
def client(engine: Engine, session_factory: Factory, registry: TrustRegistry) -> TestClient:
    return client_for(make_app(engine, session_factory, registry))


def pages(client: TestClient, first: dict[str, Any]) -> list[dict[str, Any]]:
    found = [first]
    while (url := link(found[-1], "next")) is not None:
        assert url.startswith(BASE) and ALICE not in url
        found.append(fhir_json(client.get(url)))
    return found


def test_pages_newest_first_replayable_and_free_of_nhs_numbers(
    client: TestClient, session_factory: Factory
) -> None:
    ids = patient_studies(session_factory, ALICE, 25)
    patient_studies(session_factory, BOB, 3, prefix="2")
    first = fhir_json(
        client.post(
            "/fhir/ImagingStudy/_search",
            data={
                "patient.identifier": f"{NHS}|{ALICE}",
                "_count": "10",
                "_include": "ImagingStudy:endpoint",
            },
        )
    )
    assert "total" not in first  # more than one page: no cheap total
    all_pages = pages(client, first)
    assert [len(match_ids(p)) for p in all_pages] == [10, 10, 5]
    assert [i for p in all_pages for i in match_ids(p)] == ids
    assert all(p["entry"][-1]["search"]["mode"] == "include" for p in all_pages)
    for page in all_pages:
        for li in page["link"]:
            assert li["url"].startswith(BASE) and ALICE not in li["url"]
    second = link(first, "next")
    assert second is not None
    assert match_ids(fhir_json(client.get(second))) == match_ids(all_pages[1])  # replay
    self_link = link(first, "self")
    assert self_link is not None
    assert match_ids(fhir_json(client.get(self_link))) == ids[:10]
    ascending = pages(client, fhir_json(search(client, ALICE, _sort="started", _count="7")))
    assert [i for p in ascending for i in match_ids(p)] == list(reversed(ids))


def test_paging_is_stable_while_feeds_insert(client: TestClient, session_factory: Factory) -> None:
    ids = patient_studies(session_factory, ALICE, 30)
    stop = threading.Event()
    inserted: list[str] = []

    def feed() -> None:
        n = 0
        while n < 40 and (n < 5 or not stop.is_set()):
            # alternately newer than everything and older than everything
            when = T0 + timedelta(days=100 + n) if n % 2 else T0 - timedelta(days=1 + n)
            inserted.extend(
                add_studies(
                    session_factory, ALICE, [study(f"1.2.826.0.1.3680043.10.9.{n}", started=when)]
                )
            )
            n += 1

    thread = threading.Thread(target=feed)
    first = fhir_json(search(client, ALICE, _count="4"))
    thread.start()
    try:
        seen = [i for p in pages(client, first) for i in match_ids(p)]
    finally:
        stop.set()
        thread.join()
    assert len(seen) == len(set(seen)), "a study was returned twice"
    assert [i for i in seen if i in set(ids)] == ids, "an original study was skipped or reordered"
    assert len(inserted) >= 5 and set(seen) - set(ids) <= set(inserted)


def test_inserts_between_pages_land_where_they_sort(
    client: TestClient, session_factory: Factory
) -> None:
    ids = patient_studies(session_factory, ALICE, 9)
    page = fhir_json(search(client, ALICE, _count="3"))
    seen = match_ids(page)
    newer, older = [], []
    for n in range(3):
        newer += add_studies(
            session_factory, ALICE, [study(f"1.2.9.{n}", started=T0 + timedelta(99))]
        )
        older += add_studies(
            session_factory, ALICE, [study(f"1.2.8.{n}", started=T0 - timedelta(9 + n))]
        )
        url = link(page, "next")
        assert url is not None
        page = fhir_json(client.get(url))
        seen += match_ids(page)
    while (url := link(page, "next")) is not None:
        page = fhir_json(client.get(url))
        seen += match_ids(page)
    assert seen == ids + older  # newer ones sort before the cursor: not on later pages


def test_bad_cursors_are_refused(client: TestClient, session_factory: Factory) -> None:
    patient_studies(session_factory, ALICE, 3)
    bundle = fhir_json(search(client, ALICE, _count="1"))
    url = link(bundle, "next")
    assert url is not None
    token = url.removeprefix(BASE)
    flipped = token[:20] + ("A" if token[20] != "A" else "B") + token[21:]
    for bad in (flipped, "garbage", token[:-10], "A" * 60):
        response = client.get("/fhir/ImagingStudy", params={"_cursor": bad})
        assert "_cursor" in diagnostics(outcome_of(response, 400))
    expired = CursorCodec(lambda: "test-cursor-secret", 60).seal(
        CursorState((("patient.identifier", ALICE),), None),
        now=datetime.now(UTC).timestamp() - 61,
    )
    response = client.get("/fhir/ImagingStudy", params={"_cursor": expired})
    assert "expired" in diagnostics(outcome_of(response, 400))


def test_the_generated_secret_is_kept_and_shared(
    engine: Engine, session_factory: Factory, registry: TrustRegistry
) -> None:
    patient_studies(session_factory, ALICE, 3)
    one = client_for(make_app(engine, session_factory, registry, cursor_secret=None))
    two = client_for(make_app(engine, session_factory, registry, cursor_secret=None))
    url = link(fhir_json(search(one, ALICE, _count="2")), "next")
    assert url is not None
    assert len(match_ids(fhir_json(two.get(url)))) == 1  # another process, same secret
    with session_factory() as session:
        stored = session.execute(select(service_setting_table.c.value)).scalars().all()
    assert len(stored) == 1 and load_or_create_secret(session_factory) == stored[0]
    other = client_for(make_app(engine, session_factory, registry, cursor_secret="different"))
    outcome_of(other.get(url), 400)
