"""The command line as a user runs it: serve in an empty folder, trusts, db upgrade."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import httpx

from locator.store import migrate
from tests.serve_helpers import serving


def run_locator(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "locator", *args],
        cwd=cwd,
        text=True,
        capture_output=True,
        timeout=120,
    )


def test_serve_in_an_empty_folder_answers_metadata_and_stops_cleanly(tmp_path: Path) -> None:
    with serving([], cwd=tmp_path) as served:
        response = httpx.get(f"{served.base_url}/fhir/metadata", timeout=10)
        assert response.status_code == 200
        body = response.json()
        assert body["resourceType"] == "CapabilityStatement"
        assert body["fhirVersion"] == "4.0.1"
        assert httpx.get(f"{served.base_url}/healthz", timeout=10).status_code == 200
        assert httpx.get(f"{served.base_url}/readyz", timeout=10).status_code == 200
        assert set(served.ports) >= {"http", "mllp", "dicom"}
        assert all(port > 0 for port in served.ports.values())
        exit_status = served.stop()
    assert exit_status == 0
    assert (tmp_path / "locator.db").exists()
    text = "\n".join(served.output)
    assert "<nhs-number>" in text and "locator demo" in text
    listed = run_locator("trusts", "list", cwd=tmp_path)
    assert listed.returncode == 0 and "RZZ01" in listed.stdout


def test_serve_refuses_a_non_loopback_api_without_jwks(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "locator", "serve", "--host", "0.0.0.0", "--only", "api"],
        cwd=tmp_path,
        text=True,
        capture_output=True,
        timeout=60,
    )
    assert result.returncode != 0
    assert "open mode is loopback only" in result.stderr


def test_trusts_load_and_list(db_url: str, tmp_path: Path) -> None:
    trusts = tmp_path / "trusts.toml"
    trusts.write_text(
        '[[trust]]\nods_code = "RQQ01"\nname = "Queue Valley"\n'
        'hl7_sending_facilities = ["RQQ01"]\ndicom_ae_titles = ["RQQ01CT"]\n'
        'viewer_url = "https://v.example/{study_uid}"\ndicomweb_url = "https://d.example"\n'
    )
    loaded = run_locator("trusts", "load", str(trusts), "--db", db_url, cwd=tmp_path)
    assert loaded.returncode == 0, loaded.stderr
    assert "RQQ01" in loaded.stdout
    listed = run_locator("trusts", "list", "--db", db_url, cwd=tmp_path)
    assert "RQQ01\tQueue Valley" in listed.stdout and "RQQ01CT" in listed.stdout
    trusts.write_text(trusts.read_text().replace("{study_uid}", "{uid}"))
    bad = run_locator("trusts", "load", str(trusts), "--db", db_url, cwd=tmp_path)
    assert bad.returncode != 0 and "unknown placeholder(s) uid" in bad.stderr


def test_postgres_needs_db_upgrade_before_serve(empty_db_url: str, tmp_path: Path) -> None:
    if empty_db_url.startswith("sqlite"):
        return  # SQLite is migrated on start; covered by the empty-folder test
    refused = subprocess.run(
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
            empty_db_url,
        ],
        cwd=tmp_path,
        text=True,
        capture_output=True,
        timeout=60,
    )
    assert refused.returncode != 0 and "locator db upgrade" in refused.stderr
    upgraded = run_locator("db", "upgrade", "--db", empty_db_url, cwd=tmp_path)
    assert upgraded.returncode == 0 and migrate.head_revision() in upgraded.stdout
    with serving(
        ["--only", "api", "--db", empty_db_url, "--demo-trusts"], cwd=tmp_path, expect=("http",)
    ) as served:
        organisations = httpx.get(f"{served.base_url}/fhir/Organization/RZZ01", timeout=10)
        assert organisations.status_code == 200


def test_allow_plain_feeds_needs_every_trusts_source_addresses(tmp_path: Path) -> None:
    from locator.cli import StartupError, check_plain_feed_trusts
    from locator.config import Settings
    from locator.trusts import TrustRegistry, example_trusts, parse_trusts_toml

    plain = Settings(mllp_host="0.0.0.0", allow_plain_feeds=True)
    examples = TrustRegistry(example_trusts())
    try:
        check_plain_feed_trusts(plain, {"mllp"}, examples)
    except StartupError as exc:
        assert "missing for RZZ01, RZZ02, RZZ03" in exc.message
    else:
        raise AssertionError("plain feeds accepted without source_addresses")
    bound = TrustRegistry(
        parse_trusts_toml(
            '[[trust]]\nods_code = "RQQ01"\nname = "Q"\nviewer_url = "https://v/{study_uid}"\n'
            'dicomweb_url = "https://d"\nsource_addresses = ["192.0.2.0/24"]\n'
        )
    )
    check_plain_feed_trusts(plain, {"mllp"}, bound)
    check_plain_feed_trusts(Settings(allow_plain_feeds=True), {"mllp"}, examples)  # loopback
