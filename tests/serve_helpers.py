"""Run `locator serve` as a subprocess on port 0 and read the ports it prints."""

from __future__ import annotations

import os
import re
import selectors
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

PORT_LABELS = ("http", "mllp", "dicom")
# `label=port` at the end of a line (a log record on stderr may share the line in a pipe).
PORT_LINE = re.compile(r"(?:^|\s|:)(?P<label>http|mllp|dicom|mllp\.[A-Z0-9]+)=(?P<port>\d+)$")


@dataclass
class Served:
    process: subprocess.Popen[str]
    ports: dict[str, int]
    output: list[str] = field(default_factory=list)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.ports['http']}"

    def stop(self, timeout: float = 30) -> int:
        """SIGTERM and wait; returns the exit status."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(timeout=timeout)
        finally:
            if self.process.poll() is None:
                self.process.kill()
        rest = self.process.stdout.read() if self.process.stdout else ""
        self.output.extend(rest.splitlines())
        return self.process.returncode


def serve_command(*args: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "locator",
        "serve",
        "--http-port",
        "0",
        "--mllp-port",
        "0",
        "--dicom-port",
        "0",
        *args,
    ]


def start_serve(
    args: list[str],
    *,
    cwd: Path,
    env: dict[str, str] | None = None,
    expect: tuple[str, ...] = PORT_LABELS,
    timeout: float = 120,
) -> Served:
    """Start `locator serve` and wait until every expected `label=port` line is printed."""
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    process = subprocess.Popen(
        serve_command(*args),
        cwd=cwd,
        env=full_env,
        text=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    served = Served(process, {})
    assert process.stdout is not None
    selector = selectors.DefaultSelector()
    selector.register(process.stdout, selectors.EVENT_READ)
    deadline = time.monotonic() + timeout
    while not all(label in served.ports for label in expect):
        if time.monotonic() > deadline or process.poll() is not None:
            process.kill()
            rest = process.stdout.read()
            raise AssertionError("serve did not start:\n" + "\n".join(served.output) + rest)
        if not selector.select(timeout=0.5):
            continue
        line = process.stdout.readline().rstrip("\n")
        served.output.append(line)
        match = PORT_LINE.search(line)
        if match:
            served.ports[match["label"]] = int(match["port"])
    return served


@contextmanager
def serving(
    args: list[str],
    *,
    cwd: Path,
    env: dict[str, str] | None = None,
    expect: tuple[str, ...] = PORT_LABELS,
) -> Iterator[Served]:
    served = start_serve(args, cwd=cwd, env=env, expect=expect)
    try:
        yield served
    finally:
        served.stop()
