"""Run `locator serve` as a subprocess on port 0 and read the ports it prints."""

from __future__ import annotations

import os
import queue
import re
import signal
import subprocess
import sys
import threading
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
    """A running `locator serve`. A reader thread drains its output for its whole life (a
    full pipe would block the server; a select() beside a buffered readline() would miss
    lines already read into the buffer)."""

    process: subprocess.Popen[str]
    ports: dict[str, int] = field(default_factory=dict)
    output: list[str] = field(default_factory=list)
    lines: queue.Queue[str | None] = field(default_factory=queue.Queue)
    reader: threading.Thread | None = None

    def start_reading(self) -> None:
        def drain() -> None:
            assert self.process.stdout is not None
            for line in self.process.stdout:
                self.output.append(line.rstrip("\n"))
                self.lines.put(line.rstrip("\n"))
            self.lines.put(None)

        self.reader = threading.Thread(target=drain, daemon=True)
        self.reader.start()

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
                self.process.wait()
        if self.reader is not None:
            self.reader.join(timeout=10)
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
    timeout: float = 90,
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
    served = Served(process)
    served.start_reading()
    deadline = time.monotonic() + timeout
    while not all(label in served.ports for label in expect):
        try:
            line = served.lines.get(timeout=max(0.0, deadline - time.monotonic()))
        except queue.Empty:
            line = None
        if line is None:
            served.stop(timeout=5)
            raise AssertionError("serve did not start:\n" + "\n".join(served.output))
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
