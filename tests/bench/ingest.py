"""Ingest load: ORU over MLLP on eight connections, MPPS pairs over eight associations.

MLLP: an asyncio client (not the product's code) keeps the connections open and sends one
message at a time on each, waiting for its ACK: closed loop for the maximum rate, or paced
at a fixed offered rate with latency counted from each message's scheduled send time, so a
slow ACK delays the next message and is not hidden (no coordinated omission).

MPPS: one process per association (`python -m tests.bench.ingest mpps-worker ...`), each a
pynetdicom SCU doing N-CREATE + N-SET pairs, with default socket options or with TCP_NODELAY
set on the SCU's socket. A pair counts only when both answers are Success (0x0000).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass

from tests.bench.datagen import Generator, SyntheticStudy, make_trusts
from tests.bench.messages import CR, FS, mllp_frame, mpps_create, mpps_set_completed, oru_message

ACK_END = FS + CR
CALLED_AE = "LOCATOR"
SUCCESS = 0x0000


def percentile(values: Sequence[float], p: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    k = min(len(ordered) - 1, max(0, round(p / 100 * (len(ordered) - 1))))
    return ordered[k]


@dataclass(frozen=True)
class IngestResult:
    feed: str
    connections: int
    offered: float | None
    sent: int
    accepted: int
    other: int  # answers other than AA / Success
    seconds: float
    rate: float  # accepted per second
    p50_ms: float
    p95_ms: float
    p99_ms: float
    max_ms: float
    note: str = ""

    def as_dict(self) -> dict[str, object]:
        return asdict(self)


def summarise(
    feed: str,
    connections: int,
    offered: float | None,
    latencies: list[float],
    accepted: int,
    other: int,
    seconds: float,
    note: str = "",
) -> IngestResult:
    return IngestResult(
        feed=feed,
        connections=connections,
        offered=offered,
        sent=len(latencies),
        accepted=accepted,
        other=other,
        seconds=seconds,
        rate=accepted / seconds,
        p50_ms=percentile(latencies, 50),
        p95_ms=percentile(latencies, 95),
        p99_ms=percentile(latencies, 99),
        max_ms=max(latencies, default=float("nan")),
        note=note,
    )


# --------------------------------------------------------------------------- MLLP


def oru_frames(studies: Sequence[SyntheticStudy], run: str) -> list[bytes]:
    return [mllp_frame(oru_message(s, control_id=f"{run}-{i:07d}")) for i, s in enumerate(studies)]


async def _mllp_connection(
    port: int,
    frames: list[bytes],
    latencies: list[float],
    codes: list[str],
    *,
    interval: float,
    start: float,
    stop_at: float,
) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    sock = writer.get_extra_info("socket")
    if sock is not None:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    slot = start
    try:
        while frames and time.perf_counter() < stop_at:
            frame = frames.pop()
            if interval:
                slot += interval
                wait = slot - time.perf_counter()
                if wait > 0:
                    await asyncio.sleep(wait)
                t0 = slot  # scheduled time: a late send counts as latency
            else:
                t0 = time.perf_counter()
            writer.write(frame)
            ack = await reader.readuntil(ACK_END)
            latencies.append((time.perf_counter() - t0) * 1000)
            codes.append(_msa_code(ack))
    finally:
        writer.close()


def _msa_code(ack: bytes) -> str:
    for segment in ack.strip(b"\x0b\x1c\r\n").split(b"\r"):
        if segment.startswith(b"MSA|"):
            return segment.split(b"|")[1].decode()
    return "?"


async def mllp_load(
    port: int,
    frames: list[bytes],
    *,
    connections: int = 8,
    rate: float = 0.0,
    seconds: float = 20.0,
) -> IngestResult:
    """Send until the frames run out or `seconds` pass; rate 0 is closed loop."""
    latencies: list[float] = []
    codes: list[str] = []
    interval = connections / rate if rate else 0.0
    start = time.perf_counter()
    stop_at = start + seconds
    await asyncio.gather(
        *(
            _mllp_connection(
                port,
                frames,
                latencies,
                codes,
                interval=interval,
                start=start + i * interval / connections,
                stop_at=stop_at,
            )
            for i in range(connections)
        )
    )
    elapsed = time.perf_counter() - start
    accepted = sum(1 for c in codes if c in ("AA", "CA"))
    return summarise(
        "oru-mllp", connections, rate or None, latencies, accepted, len(codes) - accepted, elapsed
    )


# --------------------------------------------------------------------------- MPPS


def _set_nodelay() -> None:
    """TCP_NODELAY on every socket the SCU opens (pynetdicom 3.0.4 sets only SO_REUSEADDR)."""
    from pynetdicom import transport

    original = transport.AssociationSocket._create_socket

    def create(self: object, address: object) -> socket.socket:
        sock: socket.socket = original(self, address)  # type: ignore[arg-type]
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return sock

    transport.AssociationSocket._create_socket = create  # type: ignore[method-assign]


def mpps_worker(
    port: int,
    ae_title: str,
    trusts: int,
    worker: int,
    seconds: float,
    pairs: int,
    nodelay: bool,
    start_at: float,
) -> dict[str, object]:
    """One association: N-CREATE + N-SET pairs until `seconds` or `pairs`; JSON-able result."""
    from pynetdicom import AE
    from pynetdicom.sop_class import ModalityPerformedProcedureStep as MPPS

    if nodelay:
        _set_nodelay()
    trust = make_trusts(trusts)[int(ae_title[2:5])]
    # A fresh seed per run: the same UIDs again would be duplicate N-CREATEs (0x0111).
    gen = Generator(
        [trust],
        seed=time.time_ns() + worker,
        accession_start=worker * 10**8 + time.time_ns() // 10**9 % 10**4 * 10**4,
    )
    studies = [s for s in gen.studies(pairs * 2) if s.study_uid][:pairs]
    datasets = [(s, mpps_create(s, station_ae=ae_title), mpps_set_completed(s)) for s in studies]
    ae = AE(ae_title=ae_title)
    ae.add_requested_context(MPPS)
    while time.time() < start_at:
        time.sleep(0.005)
    assoc = ae.associate("127.0.0.1", port, ae_title=CALLED_AE)
    if not assoc.is_established:
        return {"error": "association rejected"}
    pair_ms: list[float] = []
    ok = other = 0
    t_start = time.perf_counter()
    try:
        for study, create, final in datasets:
            if time.perf_counter() - t_start > seconds:
                break
            t0 = time.perf_counter()
            st1, _ = assoc.send_n_create(create, MPPS, study.pps_uid)
            st2, _ = assoc.send_n_set(final, MPPS, study.pps_uid)
            pair_ms.append((time.perf_counter() - t0) * 1000)
            good = (st1 and st1.Status == SUCCESS) and (st2 and st2.Status == SUCCESS)
            ok, other = (ok + 1, other) if good else (ok, other + 1)
    finally:
        elapsed = time.perf_counter() - t_start
        assoc.release()
    return {"latencies": pair_ms, "ok": ok, "other": other, "seconds": elapsed}


def mpps_load(
    port: int,
    ae_titles: Sequence[str],
    *,
    trusts: int,
    seconds: float,
    pairs_per_association: int,
    nodelay: bool,
) -> IngestResult:
    """One worker process per AE title (association), started together."""
    start_at = time.time() + 2.0 + 0.25 * len(ae_titles)
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "tests.bench.ingest",
                "mpps-worker",
                "--port",
                str(port),
                "--ae",
                ae,
                "--trusts",
                str(trusts),
                "--worker",
                str(i),
                "--seconds",
                str(seconds),
                "--pairs",
                str(pairs_per_association),
                "--start-at",
                str(start_at),
                *(["--nodelay"] if nodelay else []),
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i, ae in enumerate(ae_titles)
    ]
    results = []
    for proc in procs:
        out, err = proc.communicate(timeout=seconds + 120)
        if proc.returncode != 0:
            raise RuntimeError(f"MPPS worker failed: {err[-1500:]}")
        results.append(json.loads(out.strip().splitlines()[-1]))
    errors = [r["error"] for r in results if "error" in r]
    if errors:
        raise RuntimeError(f"MPPS workers: {errors}")
    latencies = [x for r in results for x in r["latencies"]]
    ok = sum(int(r["ok"]) for r in results)
    other = sum(int(r["other"]) for r in results)
    elapsed = max(float(r["seconds"]) for r in results)
    note = "SCU TCP_NODELAY" if nodelay else "SCU default socket options"
    return summarise("mpps-pairs", len(ae_titles), None, latencies, ok, other, elapsed, note)


def _main(argv: Sequence[str]) -> None:
    parser = argparse.ArgumentParser(prog="python -m tests.bench.ingest")
    sub = parser.add_subparsers(dest="command", required=True)
    worker = sub.add_parser("mpps-worker", help="one MPPS SCU association (used by mpps_load)")
    worker.add_argument("--port", type=int, required=True)
    worker.add_argument("--ae", required=True)
    worker.add_argument("--trusts", type=int, required=True)
    worker.add_argument("--worker", type=int, required=True)
    worker.add_argument("--seconds", type=float, required=True)
    worker.add_argument("--pairs", type=int, required=True)
    worker.add_argument("--start-at", type=float, required=True)
    worker.add_argument("--nodelay", action="store_true")
    args = parser.parse_args(argv)
    result = mpps_worker(
        args.port,
        args.ae,
        args.trusts,
        args.worker,
        args.seconds,
        args.pairs,
        args.nodelay,
        args.start_at,
    )
    print(json.dumps(result))


if __name__ == "__main__":
    _main(sys.argv[1:])
