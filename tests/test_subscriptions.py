"""FHIR Subscriptions end to end, on SQLite and PostgreSQL: the whole service in this process
(API, MLLP, DICOM MPPS, deliverer), real feeds (MLLP over a socket, pynetdicom), and a real
HTTP receiver on a free port. Handshake to active; ORU and MPPS changes delivered with the
right payload; nobody else's studies; retries then success; retries exhausted -> error; SSRF
refusals; ownership; every delivery in the audit."""

from __future__ import annotations

import json
import threading
from typing import Any

import httpx
import pytest
from pydicom.uid import generate_uid
from sqlalchemy import select

from locator.store.models import audit_table
from tests.dicom_helpers import modality, mpps_create, mpps_set, series_item
from tests.notify_helpers import (
    FHIR_JSON,
    NHS_SYSTEM,
    Receiver,
    Stack,
    oru,
    outbox_rows,
    receiver,
    stack,
    subscribe,
    subscription,
    wait_status,
)
from tests.security_helpers import mllp_exchange

PATIENT = "9990000018"
OTHER = "9990000026"


def active_subscription(
    stk: Stack, rcv: Receiver, nhs: str = PATIENT, **kwargs: Any
) -> dict[str, Any]:
    response = subscribe(stk.base, subscription(nhs, rcv.url, **kwargs))
    assert response.status_code == 201, response.text
    created = response.json()
    assert created["status"] == "requested"
    assert response.headers["location"].endswith(f"/Subscription/{created['id']}/_history/1")
    return wait_status(stk.base, created["id"], "active")  # type: ignore[no-any-return]


def deliveries_audit(stk: Stack) -> list[Any]:
    with stk.factory() as session:
        rows = session.execute(
            select(audit_table).where(audit_table.c.request_id.like("notification-%"))
        )
        return list(rows)


def test_handshake_then_oru_and_mpps_are_delivered_with_the_study(db_url: str) -> None:
    with receiver() as rcv, stack(db_url) as stk:
        sub = active_subscription(stk, rcv, headers=("Authorization: Bearer care-record-1",))
        handshake = rcv.received[0]
        assert handshake.is_handshake and handshake.method == "POST" and handshake.body == b""
        assert handshake.path == "/fhir-hook"
        assert handshake.headers["authorization"] == "Bearer care-record-1"
        assert handshake.headers["x-locator-subscription-id"] == sub["id"]

        ack = mllp_exchange(stk.ports["mllp"], oru(OTHER, 1))  # another patient first
        assert "MSA|AA" in ack
        ack = mllp_exchange(stk.ports["mllp"], oru(PATIENT, 2))
        assert "MSA|AA" in ack
        got = rcv.wait_for(lambda rs: len([r for r in rs if not r.is_handshake]) >= 1)
        first = next(r for r in got if not r.is_handshake)
        assert first.method == "PUT"
        assert first.headers["content-type"] == FHIR_JSON
        assert first.headers["authorization"] == "Bearer care-record-1"
        study = first.json
        assert first.path == f"/fhir-hook/ImagingStudy/{study['id']}"
        assert study["resourceType"] == "ImagingStudy"
        assert study["subject"]["identifier"] == {"system": NHS_SYSTEM, "value": PATIENT}
        assert any(i.get("value") == "ACC000002" for i in study["identifier"])
        assert first.notification_id and first.notification_id.isdigit()

        uid = generate_uid()
        with modality(stk.ports["dicom"], ae_title="RZZ01CT1") as ct:
            step = generate_uid()
            assert (
                ct.create(mpps_create(patient_id=PATIENT, studies=[(uid, None)]), step).status == 0
            )
            assert ct.set(mpps_set(status="COMPLETED", series=[series_item()]), step).status == 0
        rcv.wait_for(
            lambda rs: any(
                r.method == "PUT" and r.json.get("status") == "available" and _has_uid(r, uid)
                for r in rs
                if r.body
            )
        )
        _wait_outbox_empty(stk)  # the MPPS step's create and set: two more to come
        notes = rcv.notifications()
        assert len(notes) == 3  # the ORU, the N-CREATE, the N-SET
        # Only this patient's studies: the other patient's ORU produced nothing.
        assert all(r.json["subject"]["identifier"]["value"] == PATIENT for r in notes)
        ids = [r.notification_id for r in notes]
        assert len(ids) == len(set(ids))
        audited = deliveries_audit(stk)
        assert {a.request_id for a in audited} == {f"notification-{i}" for i in ids}
        for row in audited:
            assert row.nhs_number == PATIENT and row.outcome == 200 and row.action == "read"
            assert row.client_id == "open-mode" and row.trust_ods == "RZZ01"
            assert f"Subscription/{sub['id']}" in row.query


def _has_uid(request: Any, uid: str) -> bool:
    return any(i.get("value") == f"urn:oid:{uid}" for i in request.json.get("identifier", []))


def _wait_outbox_empty(stk: Stack, timeout: float = 10) -> None:
    import time

    deadline = time.monotonic() + timeout
    while outbox_rows(stk.factory):
        assert time.monotonic() < deadline, "the outbox did not drain"
        time.sleep(0.05)


def test_no_payload_posts_no_body_and_other_patients_get_nothing(db_url: str) -> None:
    with receiver() as rcv, stack(db_url) as stk:
        active_subscription(stk, rcv, payload=False)
        for n in range(3):
            assert "MSA|AA" in mllp_exchange(stk.ports["mllp"], oru(OTHER, 10 + n))
        assert outbox_rows(stk.factory) == []  # nobody subscribes to that patient
        assert "MSA|AA" in mllp_exchange(stk.ports["mllp"], oru(PATIENT, 20))
        got = rcv.wait_for(lambda rs: len([r for r in rs if not r.is_handshake]) == 1)
        note = next(r for r in got if not r.is_handshake)
        assert note.method == "POST" and note.body == b"" and note.path == "/fhir-hook"
        assert note.notification_id
        _wait_outbox_empty(stk)
        assert len(rcv.notifications()) == 1


def test_a_failing_receiver_sees_retries_then_success(db_url: str) -> None:
    with receiver() as rcv, stack(db_url) as stk:
        active_subscription(stk, rcv)
        failures = {"left": 3}

        def answer(request: Any) -> int:
            if request.is_handshake or failures["left"] == 0:
                return 200
            failures["left"] -= 1
            return 500

        rcv.answer = answer
        assert "MSA|AA" in mllp_exchange(stk.ports["mllp"], oru(PATIENT, 30))
        assert "MSA|AA" in mllp_exchange(stk.ports["mllp"], oru(PATIENT, 31, status="P"))
        rcv.wait_for(lambda rs: len([r for r in rs if not r.is_handshake]) >= 5)
        _wait_outbox_empty(stk)
        notes = rcv.notifications()
        ids = [int(r.notification_id or 0) for r in notes]
        # The first notification three times (500, 500, 500), then it and the next, in order.
        assert ids[:4] == [ids[0]] * 4 and ids[4] > ids[0] and ids == sorted(ids)
        outcomes = [a.outcome for a in deliveries_audit(stk)]
        assert outcomes == [500, 500, 500, 200, 200]


def test_retries_run_out_and_the_subscription_is_in_error(db_url: str) -> None:
    with receiver() as rcv, stack(db_url, subscription_retry_hours=0.0003) as stk:
        sub = active_subscription(stk, rcv)
        rcv.answer = lambda r: 200 if r.is_handshake else 503
        assert "MSA|AA" in mllp_exchange(stk.ports["mllp"], oru(PATIENT, 40))
        errored = wait_status(stk.base, sub["id"], "error")
        assert "deliveries failed" in errored["error"] and "HTTP 503" in errored["error"]
        # Re-activation: PUT it again; the handshake makes it active, the owed one goes.
        rcv.answer = lambda r: 200
        body = subscription(PATIENT, rcv.url) | {"id": sub["id"]}
        put = httpx.put(
            f"{stk.base}/fhir/Subscription/{sub['id']}",
            content=json.dumps(body),
            headers={"Content-Type": FHIR_JSON},
        )
        assert put.status_code == 200 and put.json()["status"] == "requested"
        wait_status(stk.base, sub["id"], "active")
        rcv.wait_for(lambda rs: rs[-1].method == "PUT" and not rs[-1].is_handshake)
        _wait_outbox_empty(stk)


def test_a_handshake_refused_leaves_the_subscription_in_error(db_url: str) -> None:
    with receiver() as rcv, stack(db_url) as stk:
        rcv.answer = lambda r: 404
        created = subscribe(stk.base, subscription(PATIENT, rcv.url)).json()
        errored = wait_status(stk.base, created["id"], "error")
        assert errored["error"] == "handshake failed: HTTP 404"


@pytest.mark.parametrize(
    ("endpoint", "allowed"),
    [
        ("http://127.0.0.1:9/hook", ""),  # loopback
        ("https://10.1.2.3/hook", "127.0.0.0/8"),  # private
        ("https://169.254.169.254/latest/meta-data", ""),  # link-local (cloud metadata)
        ("https://[::1]/hook", ""),
        ("https://[::ffff:192.168.0.1]/hook", ""),  # IPv4-mapped private
        ("https://localhost/hook", ""),
        ("ftp://example.org/hook", ""),
        ("https://user:pw@example.org/hook", ""),
    ],
)
def test_endpoints_that_resolve_inwards_are_refused(
    db_url: str, endpoint: str, allowed: str
) -> None:
    with stack(db_url, subscription_allowed_networks=allowed) as stk:
        response = subscribe(stk.base, subscription(PATIENT, endpoint))
        assert response.status_code == 422, response.text
        assert response.json()["resourceType"] == "OperationOutcome"
        search = httpx.get(f"{stk.base}/fhir/Subscription").json()
        assert search["total"] == 0


@pytest.mark.parametrize(
    "change",
    [
        {
            "criteria": "ImagingStudy?patient.identifier=https://fhir.nhs.uk/Id/nhs-number|9990000019"
        },
        {"criteria": "ImagingStudy?modality=CT"},
        {"criteria": "ImagingStudy?organization=RZZ01"},
        {"channel": {"type": "websocket", "endpoint": "http://127.0.0.1:1/x"}},
        {"channel": {"type": "rest-hook", "endpoint": "http://127.0.0.1:1/x", "payload": "xml"}},
        {
            "channel": {
                "type": "rest-hook",
                "endpoint": "http://127.0.0.1:1/x",
                "header": ["Host: x"],
            }
        },
        {"status": "error"},
    ],
)
def test_subscriptions_that_break_the_rules_are_refused(
    db_url: str, change: dict[str, Any]
) -> None:
    with stack(db_url) as stk:
        body = subscription(PATIENT, "http://127.0.0.1:1/x") | change
        response = subscribe(stk.base, body)
        assert response.status_code in (400, 422), response.text


def test_creating_a_subscription_is_audited_as_a_patient_lookup(db_url: str) -> None:
    with receiver() as rcv, stack(db_url) as stk:
        sub = active_subscription(stk, rcv)
        with stk.factory() as session:
            rows = list(
                session.execute(
                    select(audit_table).where(audit_table.c.resource_type == "Subscription")
                )
            )
        assert len(rows) == 1
        row = rows[0]
        assert row.action == "search" and row.nhs_number == PATIENT and row.outcome == 201
        assert PATIENT not in row.query
        listed = httpx.get(f"{stk.base}/fhir/Subscription", params={"status": "active"}).json()
        assert [e["resource"]["id"] for e in listed["entry"]] == [sub["id"]]
        assert (
            httpx.get(f"{stk.base}/fhir/Subscription", params={"status": "off"}).json()["total"]
            == 0
        )
        assert httpx.delete(f"{stk.base}/fhir/Subscription/{sub['id']}").status_code == 204
        assert httpx.get(f"{stk.base}/fhir/Subscription/{sub['id']}").status_code == 404
        assert "MSA|AA" in mllp_exchange(stk.ports["mllp"], oru(PATIENT, 50))
        assert outbox_rows(stk.factory) == []


def test_a_slow_receiver_holds_only_its_own_queue(db_url: str) -> None:
    """One receiver never answers (until the timeout); another patient's subscriber still
    gets its notification at once."""
    with (
        receiver() as slow,
        receiver() as fast,
        stack(db_url, subscription_timeout_seconds=3) as stk,
    ):
        active_subscription(stk, slow)
        active_subscription(stk, fast, nhs=OTHER)
        slow.hold = threading.Event()
        assert "MSA|AA" in mllp_exchange(stk.ports["mllp"], oru(PATIENT, 60))
        slow.wait_for(lambda rs: len(rs) >= 2)  # the slow one is now holding a request
        assert "MSA|AA" in mllp_exchange(stk.ports["mllp"], oru(OTHER, 61))
        fast.wait_for(lambda rs: len([r for r in rs if not r.is_handshake]) == 1, timeout=2.5)
        slow.hold.set()
