"""The API as a client meets it: `locator serve --only api` on a real socket (port 0), used
by an independent FHIR client library (fhirclient), on SQLite and PostgreSQL; and the
committed OpenAPI document checked against the app."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import httpx
import pytest
from fhirclient import client as fhir_client
from fhirclient.models.bundle import Bundle as ClientBundle
from fhirclient.models.endpoint import Endpoint as ClientEndpoint
from fhirclient.models.imagingstudy import ImagingStudy as ClientImagingStudy
from sqlalchemy.orm import Session, sessionmaker

from locator.api.app import openapi_document
from locator.trusts import TrustRegistry
from tests.api_helpers import ALICE, NHS, T0, add_studies, study, validate

OPENAPI = Path(__file__).resolve().parents[1] / "openapi" / "openapi.json"
START_TIMEOUT = 30.0


def test_committed_openapi_matches_the_app() -> None:
    assert OPENAPI.read_text(encoding="utf-8") == openapi_document() + "\n", (
        "openapi/openapi.json is stale: run `locator openapi > openapi/openapi.json`"
    )


@pytest.fixture
def server(db_url: str, registry: TrustRegistry, tmp_path: Path) -> Iterator[str]:
    """`locator serve --only api` on port 0; yields its FHIR base URL."""
    env = {**os.environ, "LOCATOR_CURSOR_SECRET": "server-test-secret"}
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "locator",
            "serve",
            "--only",
            "api",
            "--http-port",
            "0",
            "--db",
            db_url,
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        env=env,
        cwd=tmp_path,
    )
    assert proc.stdout is not None
    port = None
    deadline = time.monotonic() + START_TIMEOUT
    while port is None and time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        if line.startswith("http="):
            port = int(line.strip().split("=", 1)[1])
    try:
        assert port is not None, "the server did not announce its port"
        yield f"http://127.0.0.1:{port}/fhir"
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=20) == 0


@pytest.mark.filterwarnings("ignore:perform\\(\\) is deprecated:DeprecationWarning")
def test_a_fhir_client_finds_pages_and_follows_endpoints(
    server: str, session_factory: sessionmaker[Session], registry: TrustRegistry
) -> None:
    refs = [
        study(f"1.2.826.0.1.3680043.10.77.{i}", f"S{i}", started=T0 + timedelta(days=i))
        for i in range(5)
    ]
    ids = list(reversed(add_studies(session_factory, ALICE, refs)))
    smart = fhir_client.FHIRClient(settings={"app_id": "locator-test", "api_base": server + "/"})
    search = ClientImagingStudy.where(
        struct={
            "patient.identifier": f"{NHS}|{ALICE}",
            "_count": "2",
            "_include": "ImagingStudy:endpoint",
        }
    )
    bundle = search.perform(smart.server)
    seen: list[str] = []
    while True:
        matches = [e.resource for e in bundle.entry if e.search.mode == "match"]
        seen += [m.id for m in matches]
        included = {e.resource.id: e.resource for e in bundle.entry if e.search.mode == "include"}
        for imaging in matches:
            assert isinstance(imaging, ClientImagingStudy)
            assert imaging.subject.identifier.value == ALICE
            refs_ = [r.reference for r in imaging.endpoint]
            dicomweb = included[refs_[1].split("/")[1]]
            assert isinstance(dicomweb, ClientEndpoint)
            assert dicomweb.address == registry.get("RZZ01").dicomweb_url  # type: ignore[union-attr]
            assert imaging.contained[0].address.startswith("https://pacs.rzz01.example/iid")
        nxt = next((li.url for li in bundle.link if li.relation == "next"), None)
        if nxt is None:
            break
        assert ALICE not in nxt
        bundle = ClientBundle(smart.server.request_json(nxt))
    assert seen == ids
    one = ClientImagingStudy.read(ids[0], smart.server)
    assert one.meta.versionId == "1"
    endpoint = ClientEndpoint.read("RZZ01-dicomweb", smart.server)
    assert endpoint.managingOrganization.identifier.value == "RZZ01"
    with httpx.Client(base_url=server, timeout=10) as http:  # plain HTTP: POST and errors
        posted = http.post("/ImagingStudy/_search", data={"patient.identifier": f"{NHS}|{ALICE}"})
        assert posted.status_code == 200 and posted.json()["total"] == len(ids)
        validate(posted.json())
        refused = http.get("/ImagingStudy", params={"modality": "CT"})
        assert refused.status_code == 400
        validate(refused.json())


def test_the_page_is_served_but_not_the_package_sources() -> None:
    from sqlalchemy import create_engine
    from sqlalchemy.orm import sessionmaker

    from tests.api_helpers import client_for, make_app

    engine = create_engine("sqlite://")
    client = client_for(make_app(engine, sessionmaker(engine), TrustRegistry([])))
    assert client.get("/").status_code == 200
    assert client.get("/app.js").status_code == 200
    for source in ("/routes.py", "/__init__.py"):
        assert client.get(source).status_code == 404, source
    assert client.get("/healthz").json() == {"status": "ok"}
