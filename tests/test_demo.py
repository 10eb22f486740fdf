"""`locator demo`: the sample data, its MLLP client, and a real run against `locator serve`.

The end-to-end tests start `locator serve` as a subprocess on port 0 (both backends), run
`locator demo` against its printed ports, then read the result over the FHIR API with httpx.
`ServeProcess` is shared with the browser tests (tests/test_web_*.py).
"""

from __future__ import annotations

import os
import queue
import re
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import hl7
import httpx
import pytest
from click.testing import CliRunner

from ingest.demo import (
    PATIENTS,
    RESULT_CANCELLED,
    DemoError,
    MllpClient,
    ack_code,
    build_oru,
    demo_nhs_number,
    demo_studies,
    oru_messages,
    patient_lines,
    run_demo,
)
from locator.cli import main
from locator.core.nhs_number import NHS_NUMBER_SYSTEM, parse_nhs_number
from locator.trusts import example_trusts

PORT_LINE = re.compile(r"^(http|mllp|dicom)=(\d+)$")
START_TIMEOUT = 60.0
SEARCH = "/fhir/ImagingStudy/_search"


# --------------------------------------------------------------------------- serve helper


class ServeProcess:
    """`locator serve` in a subprocess; `ports` from its `label=port` lines."""

    def __init__(self, args: list[str], env: dict[str, str], log_path: Path) -> None:
        self.log = log_path.open("w")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "locator", "serve", *args],
            stdout=subprocess.PIPE,
            stderr=self.log,
            text=True,
            env=env,
        )
        self.lines: queue.Queue[str] = queue.Queue()
        self.ports: dict[str, int] = {}
        threading.Thread(target=self._pump, daemon=True).start()

    def _pump(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.put(line.rstrip("\n"))

    def wait_ready(self) -> None:
        while not {"http", "mllp", "dicom"} <= self.ports.keys():
            try:
                line = self.lines.get(timeout=START_TIMEOUT)
            except queue.Empty:
                raise AssertionError("locator serve printed no ports in time") from None
            match = PORT_LINE.match(line)
            if match:
                self.ports[match.group(1)] = int(match.group(2))

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.ports['http']}"

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            code = self.proc.wait(timeout=30)
        finally:
            self.log.close()
        return code


@contextmanager
def serve(
    tmp: Path, db_url: str | None = None, extra: list[str] | None = None, **env: str
) -> Iterator[ServeProcess]:
    """Run `locator serve` on port 0 over the given database (an SQLite file by default)."""
    url = db_url or f"sqlite:///{tmp / 'locator.db'}"
    args = ["--db", url, "--http-port", "0", "--mllp-port", "0", "--dicom-port", "0"]
    if not url.startswith("sqlite"):
        args.append("--demo-trusts")
    environment = {k: v for k, v in os.environ.items() if not k.startswith("LOCATOR_")}
    environment.update(env)
    process = ServeProcess([*args, *(extra or [])], environment, tmp / "serve.log")
    try:
        process.wait_ready()
        yield process
    except BaseException:
        process.stop()
        sys.stderr.write((tmp / "serve.log").read_text())
        raise
    else:
        assert process.stop() == 0, (tmp / "serve.log").read_text()


def run_demo_cli(service: ServeProcess) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [
            sys.executable, "-m", "locator", "demo",
            "--mllp-port", str(service.ports["mllp"]),
            "--dicom-port", str(service.ports["dicom"]),
            "--http-port", str(service.ports["http"]),
        ],
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip


def patient_search(client: httpx.Client, nhs: str, **params: str) -> list[dict[str, Any]]:
    """Every ImagingStudy of a patient, following next links."""
    form = {"patient.identifier": f"{NHS_NUMBER_SYSTEM}|{nhs}", "_count": "10", **params}
    bundle = client.post(SEARCH, data=form).raise_for_status().json()
    studies = []
    while True:
        studies += [e["resource"] for e in bundle.get("entry", [])
                    if e["resource"]["resourceType"] == "ImagingStudy"]  # fmt: skip
        nxt = [link["url"] for link in bundle["link"] if link["relation"] == "next"]
        if not nxt:
            return studies
        assert nhs not in nxt[0]
        bundle = client.get(nxt[0]).raise_for_status().json()


# --------------------------------------------------------------------------- the sample data


def test_demo_nhs_numbers_are_valid_test_numbers_and_distinct() -> None:
    numbers = [demo_nhs_number(n) for n in range(50)]
    assert len(set(numbers)) == 50
    for number in numbers:
        assert number.startswith("999")
        assert parse_nhs_number(number, accept_test_numbers=True) == number
    with pytest.raises(ValueError):
        parse_nhs_number(numbers[0], accept_test_numbers=False)


def test_sample_spans_trusts_years_and_has_a_patient_with_many_studies() -> None:
    studies = demo_studies()
    by_patient = {p.nhs_number: [s for s in studies if s.patient == p] for p in PATIENTS}
    assert max(len(v) for v in by_patient.values()) >= 25
    assert {s.ods for s in studies} == {"RZZ01", "RZZ02", "RZZ03"}
    assert len({s.started.year for s in studies}) >= 5
    assert len({s.study_uid for s in studies}) == len(studies)
    assert len({s.accession for s in studies}) == len(studies)
    assert {s.modality for s in studies} >= {"CT", "MR", "DX", "US"}
    assert any(s.mpps for s in studies) and any(RESULT_CANCELLED in s.reports for s in studies)
    assert all(len(s.study_uid) <= 64 and len(s.accession) <= 16 for s in studies)
    lines = patient_lines()
    assert len(lines) == len(PATIENTS)
    assert all(re.search(r"\d{3} \d{3} \d{4}", line) for line in lines)


def test_oru_messages_read_by_an_independent_parser() -> None:
    facilities = {f: t.ods_code for t in example_trusts() for f in t.hl7_sending_facilities}
    messages = list(oru_messages(demo_studies()))
    assert len({control for control, _ in messages}) == len(messages)
    for control, text in messages:
        msg = hl7.parse(text)
        assert str(msg.segment("MSH")[9]) == "ORU^R01^ORU_R01"
        assert str(msg.segment("MSH")[10]) == control
        assert str(msg.segment("MSH")[4]) in facilities
        pid3 = msg.segment("PID")[3]
        assert str(pid3[0][4]) == "NH"
        parse_nhs_number(str(pid3[0][0]))
        obr = msg.segment("OBR")
        assert str(obr[24]) in {"CT", "MR", "DX", "US"}
        assert str(obr[25]) in {"F", "P", "C", "X"}
        assert str(obr[18]).startswith(facilities[str(msg.segment("MSH")[4])])


def test_cancelled_oru_has_no_report_and_no_exam_time() -> None:
    study = next(s for s in demo_studies() if s.reports == (RESULT_CANCELLED,))
    msg = hl7.parse(build_oru(study, 0))
    assert str(msg.segment("ORC")[1]) == "OC"
    assert str(msg.segment("OBR")[7]) == ""
    with pytest.raises(KeyError):
        msg.segment("OBX")


# --------------------------------------------------------------------------- the MLLP client


@contextmanager
def fake_mllp_server(reply: bool) -> Iterator[tuple[int, list[bytes]]]:
    """A one-connection MLLP peer that answers each frame with python-hl7's ACK (or closes)."""
    server = socket.create_server(("127.0.0.1", 0))
    received: list[bytes] = []

    def run() -> None:
        conn, _ = server.accept()
        with conn:
            buffer = b""
            while True:
                chunk = conn.recv(65536)
                if not chunk:
                    return
                buffer += chunk
                while b"\x1c\r" in buffer:
                    frame, buffer = buffer.split(b"\x1c\r", 1)
                    received.append(frame)
                    if not reply:
                        return
                    ack = hl7.parse(frame[1:].decode()).create_ack("AA")
                    conn.sendall(b"\x0b" + str(ack).encode() + b"\x1c\r")

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    try:
        yield server.getsockname()[1], received
    finally:
        server.close()
        thread.join(timeout=5)


def test_mllp_client_frames_each_message_and_reads_its_ack() -> None:
    messages = [m for _, m in oru_messages(demo_studies())][:3]
    with fake_mllp_server(reply=True) as (port, received), MllpClient("127.0.0.1", port) as c:
        codes = [ack_code(c.send(m)) for m in messages]
    assert codes == ["AA", "AA", "AA"]
    assert [f.startswith(b"\x0bMSH|") for f in received] == [True] * 3
    assert [f[1:].decode() for f in received] == messages


def test_mllp_client_reports_a_missing_ack() -> None:
    message = next(oru_messages(demo_studies()))[1]
    with (
        fake_mllp_server(reply=False) as (port, _),
        MllpClient("127.0.0.1", port) as client,
        pytest.raises(DemoError, match="without an ACK"),
    ):
        client.send(message)


def test_mllp_client_reports_no_listener() -> None:
    with socket.create_server(("127.0.0.1", 0)) as s:
        port = s.getsockname()[1]
    with pytest.raises(DemoError, match="no MLLP listener"), MllpClient("127.0.0.1", port):
        pass


# --------------------------------------------------------------------------- end to end


def test_demo_populates_a_running_service(db_url: str, tmp_path: Path) -> None:
    many, fall, scan, _ = PATIENTS
    with serve(tmp_path, db_url) as service:
        first = run_demo_cli(service)
        assert first.returncode == 0, first.stderr + first.stdout
        assert "35 ORU accepted" in first.stdout and "6 MPPS steps" in first.stdout
        assert f"http://127.0.0.1:{service.ports['http']}/" in first.stdout
        assert "999 000 0018" in first.stdout
        with httpx.Client(base_url=service.base_url, timeout=30) as client:
            before = {p.nhs_number: patient_search(client, p.nhs_number) for p in PATIENTS}
            again = run_demo(  # deterministic: a second run changes nothing
                host="127.0.0.1", mllp_port=service.ports["mllp"],
                dicom_port=service.ports["dicom"], dicom_ae="LOCATOR", say=lambda _: None,
            )  # fmt: skip
            assert again.messages_accepted == 35 and not again.messages_refused
            after = {p.nhs_number: patient_search(client, p.nhs_number) for p in PATIENTS}
    expected = {p.nhs_number: sum(s.patient == p for s in demo_studies()) for p in PATIENTS}
    assert {k: len(v) for k, v in before.items()} == expected
    assert expected[many.nhs_number] >= 25
    versions = {k: sorted((s["id"], s["meta"]["versionId"]) for s in v) for k, v in before.items()}
    assert versions == {k: sorted((s["id"], s["meta"]["versionId"]) for s in v)
                        for k, v in after.items()}  # fmt: skip
    # Both feeds met in one study: the MPPS images and the ORU report of the CT head.
    ct_head = next(s for s in before[fall.nhs_number] if s.get("numberOfInstances") == 64)
    assert ct_head["status"] == "available"
    assert ct_head["extension"][0]["valueCode"] == "final"
    statuses = sorted(s["status"] for s in before[fall.nhs_number])
    assert statuses == ["available", "available", "cancelled", "registered"]
    corrected = before[scan.nhs_number][0]["extension"][0]["valueCode"]
    assert corrected == "corrected"
    starts = [s["started"] for s in before[many.nhs_number] if "started" in s]  # not cancelled
    assert starts == sorted(starts, reverse=True)
    years = {datetime.fromisoformat(s).astimezone(UTC).year for s in starts}
    assert len(years) >= 5


def test_demo_says_when_no_service_is_running() -> None:
    with socket.create_server(("127.0.0.1", 0)) as s:
        port = s.getsockname()[1]
    result = CliRunner().invoke(main, ["demo", "--mllp-port", str(port), "--dicom-port", str(port)])
    assert result.exit_code != 0
    assert "is `locator serve` running?" in result.output
