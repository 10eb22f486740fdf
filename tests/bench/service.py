"""What the benchmarks run against: a PostgreSQL (the one in LOCATOR_TEST_POSTGRES_URL or a
throwaway cluster from .ci/start-postgres), databases made for one stage, the trust
registry loaded with `locator trusts load`, and `locator serve` as a subprocess on port 0
whose `label=port` lines are read from its stdout.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import IO

from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url

from locator.store.db import normalise_url
from locator.trusts import TrustConfig

REPO = Path(__file__).resolve().parents[2]
READY_TIMEOUT_S = 120.0
PORT_LINE = re.compile(r"^(http|mllp|dicom)=(\d+)$")

# The service as measured: no response caching exists; the audit is written for every
# search; the per-client look-up limit is lifted (one load generator is one client); the
# access log is off (stated in the results) and logging is at WARNING.
SERVICE_ENV = {
    "LOCATOR_PATIENT_LOOKUPS_PER_MINUTE": "100000000",
    "LOCATOR_ACCESS_LOG": "false",
    "LOCATOR_LOG_LEVEL": "WARNING",
    "LOCATOR_ACCEPT_TEST_NHS_NUMBERS": "true",
}


def locator_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "locator", *args]


def run_locator(*args: str) -> str:
    done = subprocess.run(
        locator_cmd(*args), capture_output=True, text=True, env=_env(), cwd=REPO, check=False
    )
    if done.returncode != 0:
        raise RuntimeError(f"locator {' '.join(args[:2])} failed: {done.stderr[-2000:]}")
    return done.stdout


def _env(extra: dict[str, str] | None = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("LOCATOR_")}
    env |= SERVICE_ENV | (extra or {})
    return env


# --------------------------------------------------------------------------- PostgreSQL


@contextmanager
def postgres_server(url: str | None, workdir: Path) -> Iterator[str]:
    """The given server URL, or a throwaway cluster started (and stopped) here."""
    if url:
        yield url
        return
    # Not inside workdir: that is private to root, and the cluster runs as `postgres`.
    pg_dir = Path(tempfile.gettempdir()) / f"locator-bench-pg-{uuid.uuid4().hex[:8]}"
    out = subprocess.run(
        ["bash", str(REPO / ".ci/start-postgres"), str(pg_dir)],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    exports = dict(re.findall(r"(\w+)=(\S+)", out))
    try:
        yield exports["LOCATOR_TEST_POSTGRES_URL"]
    finally:
        env = os.environ | {"PG_DIR": exports["PG_DIR"], "PG_BIN": exports["PG_BIN"]}
        subprocess.run(
            ["bash", str(REPO / ".ci/stop-postgres")], env=env, check=False, capture_output=True
        )


@contextmanager
def postgres_database(server_url: str, label: str) -> Iterator[str]:
    """A new, empty database on the server, dropped afterwards."""
    name = f"bench_{label}_{uuid.uuid4().hex[:8]}"
    admin = create_engine(normalise_url(server_url), isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    try:
        yield make_url(normalise_url(server_url)).set(database=name).render_as_string(False)
    finally:
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


# --------------------------------------------------------------------------- trusts


def _toml_value(value: object) -> str:
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, tuple | list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    raise TypeError(type(value))


def trusts_toml(trusts: Sequence[TrustConfig]) -> str:
    """The trusts file of interface.md for generated trusts."""
    keys = (
        "ods_code",
        "name",
        "viewer_url",
        "viewer_url_by_accession",
        "dicomweb_url",
        "hl7_sending_facilities",
        "dicom_ae_titles",
        "accession_system",
    )
    blocks = []
    for trust in trusts:
        lines = ["[[trust]]"]
        for key in keys:
            value = getattr(trust, key)
            if value not in (None, "", ()):
                lines.append(f"{key} = {_toml_value(value)}")
        blocks.append("\n".join(lines))
    return "\n\n".join(blocks) + "\n"


def prepare_database(db_url: str, trusts: Sequence[TrustConfig], workdir: Path) -> None:
    """`locator db upgrade`, then `locator trusts load` of the generated trusts."""
    run_locator("db", "upgrade", "--db", db_url)
    path = workdir / f"trusts-{uuid.uuid4().hex[:6]}.toml"
    path.write_text(trusts_toml(trusts))
    run_locator("trusts", "load", str(path), "--db", db_url)


# --------------------------------------------------------------------------- serve


class Service:
    """One `locator serve` subprocess; `ports` maps http/mllp/dicom to what it printed."""

    def __init__(
        self, db_url: str, *, only: str | None = None, env: dict[str, str] | None = None
    ) -> None:
        args = [
            "serve",
            "--db",
            db_url,
            "--http-port",
            "0",
            "--mllp-port",
            "0",
            "--dicom-port",
            "0",
        ]
        if only:
            args += ["--only", only]
        self.args = args
        self.only = only
        self.env = _env(env)
        self.ports: dict[str, int] = {}
        self.process: subprocess.Popen[str] | None = None
        self.output: list[str] = []

    def __enter__(self) -> Service:
        self.process = subprocess.Popen(
            locator_cmd(*self.args),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env=self.env,
            cwd=REPO,
        )
        assert self.process.stdout is not None
        self._wait_ports(self.process.stdout)
        threading.Thread(target=self._drain, args=(self.process.stdout,), daemon=True).start()
        return self

    def _wait_ports(self, stdout: IO[str]) -> None:
        deadline = time.monotonic() + READY_TIMEOUT_S
        expected = {"api": {"http"}, "mllp": {"mllp"}, "dicom": {"dicom"}}
        wanted = expected[self.only] if self.only else {"http", "mllp", "dicom"}
        while not wanted <= self.ports.keys():
            line = stdout.readline()
            if not line or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError("locator serve did not start:\n" + "".join(self.output[-40:]))
            self.output.append(line)
            match = PORT_LINE.match(line.strip())
            if match:
                self.ports[match.group(1)] = int(match.group(2))

    def _drain(self, stdout: IO[str]) -> None:
        for line in stdout:
            if len(self.output) < 2000:
                self.output.append(line)

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
