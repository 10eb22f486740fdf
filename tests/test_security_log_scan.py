"""Privacy, end to end: a full `locator serve` run (HL7 in over MLLP, FHIR searches by GET
with the NHS Number in the URL in every encoding, by POST, reads, refusals, the audit) and
then a scan of everything the process wrote: no valid NHS Number in clear, in any format."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from locator.core.nhs_number import is_valid
from tests.security_helpers import mllp_exchange

ALICE = "9990000018"
BOB = "9990000026"
NHS_SYSTEM = "https://fhir.nhs.uk/Id/nhs-number"
# ten digits, optionally grouped 3-3-4 by spaces, dashes, `+` or `%20` (URL forms)
_SEP = r"(?:[ \-+]|%20)?"
CANDIDATE = re.compile(rf"(?<![0-9])([0-9]{{3}}){_SEP}([0-9]{{3}}){_SEP}([0-9]{{4}})(?![0-9])")


def oru(control: str, nhs: str, facility: str = "RZZ01") -> str:
    return (
        "\r".join(
            [
                f"MSH|^~\\&|CRIS|{facility}|LOCATOR|NHSE|20240301101500||ORU^R01^ORU_R01|{control}|P|2.4",
                f"PID|1||{nhs}^^^NHS^NH~K99^^^RZZ^MR||TEST^PATIENT",
                f"OBR|1||{control}^CRIS|CHEAD^CT Head^NICIP|||20240301093000"
                f"|||||||||||{control}||||20240301101400||CT|F",
                "OBX|1|ST|CHEAD^CT Head^NICIP||seen||||||F",
            ]
        )
        + "\r"
    )


def clear_nhs_numbers(text: str) -> list[str]:
    found = []
    for match in CANDIDATE.finditer(text):
        digits = "".join(match.groups())
        if is_valid(digits):
            line_start = text.rfind("\n", 0, match.start()) + 1
            found.append(text[line_start : text.find("\n", match.end())])
    return found


def test_clear_nhs_number_scanner_finds_each_form() -> None:
    for form in (ALICE, "999 000 0018", "999-000-0018", "999+000+0018", "999%20000%200018"):
        assert clear_nhs_numbers(f"x {form} y"), form
    assert not clear_nhs_numbers("x ******0018 9990000019 y")


def read_ports(proc: subprocess.Popen[str]) -> dict[str, int]:
    ports: dict[str, int] = {}
    assert proc.stdout is not None
    for line in proc.stdout:
        key, sep, value = line.strip().partition("=")
        if sep and value.isdigit():
            ports[key] = int(value)
        if {"http", "mllp", "dicom"} <= ports.keys():
            return ports
    raise AssertionError(f"serve exited before announcing its ports ({proc.poll()})")


@pytest.mark.timeout(90)
def test_a_full_run_logs_no_nhs_number_in_clear(tmp_path: Path) -> None:
    stderr_file = tmp_path / "stderr.log"
    env = {**os.environ, "LOCATOR_LOG_LEVEL": "DEBUG", "PYTHONUNBUFFERED": "1"}
    env.pop("LOCATOR_JWKS", None)
    with stderr_file.open("w") as stderr:
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "locator",
                "serve",
                "--db",
                f"sqlite:///{tmp_path / 'l.db'}",
                "--http-port",
                "0",
                "--mllp-port",
                "0",
                "--dicom-port",
                "0",
            ],
            stdout=subprocess.PIPE,
            stderr=stderr,
            text=True,
            cwd=tmp_path,
            env=env,
        )
        try:
            ports = read_ports(proc)
            exercise(ports)
        finally:
            proc.send_signal(signal.SIGTERM)
            rest, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0
    everything = rest + stderr_file.read_text()
    assert "locator.access" in everything or "/fhir/ImagingStudy" in everything
    leaks = clear_nhs_numbers(everything)
    assert not leaks, "NHS Numbers in clear:\n" + "\n".join(leaks)


def exercise(ports: dict[str, int]) -> None:
    mllp = ports["mllp"]
    assert "MSA|AA" in mllp_exchange(mllp, oru("LOG0001", ALICE))
    assert "MSA|AA" in mllp_exchange(mllp, oru("LOG0002", "999 000 0026"))
    assert "MSA|AE" in mllp_exchange(mllp, oru("LOG0003", "9990000019"))  # fails the check
    assert "MSA|AR" in mllp_exchange(mllp, oru("LOG0004", ALICE, facility="RZZ99"))
    base = f"http://127.0.0.1:{ports['http']}/fhir"
    with httpx.Client(base_url=base, timeout=20) as client:
        found = client.get("/ImagingStudy", params={"patient.identifier": f"{NHS_SYSTEM}|{ALICE}"})
        assert found.status_code == 200 and found.json()["total"] == 1
        for raw in (
            f"patient.identifier={ALICE}",
            "patient.identifier=999%20000%200026",
            "patient.identifier=999+000+0026",
            "subject:identifier=999-000-0018",
            f"patient.identifier={NHS_SYSTEM}%7C{BOB}&_count=1",
        ):
            assert client.get(f"/ImagingStudy?{raw}").status_code == 200, raw
        posted = client.post("/ImagingStudy/_search", data={"patient.identifier": BOB})
        assert posted.status_code == 200 and posted.json()["total"] == 1
        study_id = found.json()["entry"][0]["resource"]["id"]
        assert client.get(f"/ImagingStudy/{study_id}").status_code == 200
        assert client.get(f"/Patient/{ALICE}").status_code == 404
        assert (
            client.get("/ImagingStudy", params={"patient.identifier": "9990000019"}).status_code
            == 400
        )
        audit = client.get("/AuditEvent", params={"patient.identifier": ALICE})
        assert audit.status_code == 200 and audit.json()["total"] >= 1
