"""Subscription delivery benchmark: from an ORU's ACK to the receiver's request, at a steady
offered rate with many active subscriptions, and deliveries per second to a local receiver.

    python -m tests.bench.notify                        # SQLite, 200 ORU/s, 1,000 subscriptions
    python -m tests.bench.notify --postgres URL         # the same on PostgreSQL
    python -m tests.bench.notify --rate 200 --seconds 30 --subscriptions 1000 --burst 3000

It starts `locator serve` (all roles, default settings but for
LOCATOR_SUBSCRIPTION_ALLOWED_NETWORKS=127.0.0.0/8, access log off) on a fresh database,
a receiver in its own process (asyncio HTTP/1.1, answers 200 at once, records each request's
arrival with time.time()), and subscribes `--subscriptions` patients with payload
application/fhir+json. Phase 1: `--rate` ORU/s for `--seconds`, paced over 4 MLLP connections,
each ORU for a random subscribed patient and a new study; latency = receiver arrival - ACK
received, matched by accession. Phase 2: `--burst` ORUs as fast as 8 connections go;
deliveries/s = deliveries / (last arrival - first arrival), while the same process ingests.
Phase 3: `--burst` more ORUs into a `serve --only mllp` (no deliverer), then one
`serve --only api` delivers that backlog alone: deliveries/s without ingest beside it.
Prints a JSON summary.
Everything talks over loopback; the load generator, the receiver, the service and the
database share this machine's cores.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import multiprocessing
import random
import socket
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import httpx

from tests.api_helpers import nhs_numbers
from tests.bench.ingest import percentile
from tests.notify_helpers import oru, subscription
from tests.serve_helpers import start_serve

VT, FS, CR = b"\x0b", b"\x1c", b"\x0d"
ENV = {
    "LOCATOR_SUBSCRIPTION_ALLOWED_NETWORKS": "127.0.0.0/8",
    "LOCATOR_ACCESS_LOG": "false",
    "LOCATOR_LOG_LEVEL": "WARNING",
    "LOCATOR_PATIENT_LOOKUPS_PER_MINUTE": "100000000",
}


# --------------------------------------------------------------------------- the receiver


def _accession(body: bytes) -> str | None:
    try:
        study = json.loads(body)
    except ValueError:
        return None
    for ident in study.get("identifier", []):
        if ident.get("value", "").startswith("ACC"):
            return str(ident["value"])
    return None


async def _handle(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, seen: list[tuple[str, float]]
) -> None:
    try:
        while True:
            head = await reader.readuntil(b"\r\n\r\n")
            length = 0
            handshake = False
            for line in head.split(b"\r\n")[1:]:
                name, _, value = line.partition(b":")
                if name.strip().lower() == b"content-length":
                    length = int(value)
                elif name.strip().lower() == b"x-locator-event" and b"handshake" in value:
                    handshake = True
            body = await reader.readexactly(length) if length else b""
            arrived = time.time()
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
            if not handshake:
                acc = _accession(body)
                if acc:
                    seen.append((acc, arrived))
    except (asyncio.IncompleteReadError, ConnectionError, asyncio.CancelledError):
        pass
    finally:
        writer.close()


def receiver_process(ports: Any, results: Any, stop: Any) -> None:
    seen: list[tuple[str, float]] = []

    async def main() -> None:
        server = await asyncio.start_server(
            lambda r, w: _handle(r, w, seen), "127.0.0.1", 0, backlog=1024
        )
        ports.put(server.sockets[0].getsockname()[1])
        done = asyncio.Event()
        loop = asyncio.get_running_loop()
        threading.Thread(target=lambda: (stop.wait(), loop.call_soon_threadsafe(done.set))).start()
        await done.wait()
        server.close()

    asyncio.run(main())
    results.put(seen)


# --------------------------------------------------------------------------- the load


async def _sender(
    port: int,
    messages: list[tuple[str, str]],
    acks: dict[str, float],
    *,
    interval: float,
    start: float,
) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.get_extra_info("socket").setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    slot = start
    for acc, message in messages:
        if interval:
            slot += interval
            wait = slot - time.perf_counter()
            if wait > 0:
                await asyncio.sleep(wait)
        writer.write(VT + message.encode() + FS + CR)
        ack = await reader.readuntil(FS + CR)
        if b"MSA|AA" not in ack:
            raise RuntimeError(f"not accepted: {ack[:200]!r}")
        acks[acc] = time.time()
    writer.close()


def send_load(
    port: int, messages: list[tuple[str, str]], *, connections: int, rate: float | None
) -> dict[str, float]:
    acks: dict[str, float] = {}
    shares = [messages[i::connections] for i in range(connections)]
    interval = connections / rate if rate else 0.0

    async def main() -> None:
        start = time.perf_counter()
        await asyncio.gather(
            *(_sender(port, s, acks, interval=interval, start=start) for s in shares)
        )

    asyncio.run(main())
    return acks


def messages_for(patients: Sequence[str], count: int, first: int) -> list[tuple[str, str]]:
    chosen = random.Random(first).choices(patients, k=count)
    return [(f"ACC{first + i:06d}", oru(nhs, first + i)) for i, nhs in enumerate(chosen)]


def subscribe_all(base: str, patients: Sequence[str], endpoint: str) -> None:
    with httpx.Client(timeout=30) as client:
        ids = []
        for nhs in patients:
            response = client.post(
                f"{base}/fhir/Subscription",
                content=json.dumps(subscription(nhs, endpoint)),
                headers={"Content-Type": "application/fhir+json"},
            )
            response.raise_for_status()
            ids.append(response.json()["id"])
        deadline = time.monotonic() + 120
        while True:
            listed = client.get(f"{base}/fhir/Subscription", params={"status": "active"})
            if listed.json()["total"] == len(ids):
                return
            if time.monotonic() > deadline:
                raise RuntimeError("subscriptions did not all become active")
            time.sleep(0.2)


def wait_arrivals(results: Any, stop: Any, expected: set[str], timeout: float) -> dict[str, float]:
    stop.set()
    seen: list[tuple[str, float]] = results.get(timeout=timeout)
    arrivals: dict[str, float] = {}
    for acc, at in seen:
        arrivals.setdefault(acc, at)
    return {acc: at for acc, at in arrivals.items() if acc in expected}


def run(args: argparse.Namespace) -> dict[str, Any]:
    ctx = multiprocessing.get_context("spawn")
    ports, results, stop = ctx.Queue(), ctx.Queue(), ctx.Event()
    receiver = ctx.Process(target=receiver_process, args=(ports, results, stop), daemon=True)
    receiver.start()
    endpoint = f"http://127.0.0.1:{ports.get(timeout=30)}/hook"
    patients = list(itertools.islice(nhs_numbers(), args.subscriptions))
    with tempfile.TemporaryDirectory() as folder:
        db = args.postgres or f"sqlite:///{Path(folder) / 'notify.db'}"
        cmd = ["--db", db, "--demo-trusts"]
        served = start_serve(cmd, cwd=Path(folder), env=ENV)
        try:
            t0 = time.perf_counter()
            subscribe_all(served.base_url, patients, endpoint)
            subscribed_s = time.perf_counter() - t0
            steady = messages_for(patients, int(args.rate * args.seconds), 1)
            acks = send_load(served.ports["mllp"], steady, connections=4, rate=args.rate)
            burst = messages_for(patients, args.burst, 500_000)
            burst_acks = send_load(served.ports["mllp"], burst, connections=8, rate=None)
            _wait_drained(db, time.monotonic() + 300)
        finally:
            served.stop()
        # Phase 3: a backlog written with no deliverer running (`--only mllp`), then one
        # `--only api` process delivers it alone: deliveries/s without ingest beside it.
        feeder = start_serve([*cmd, "--only", "mllp"], cwd=Path(folder), env=ENV, expect=("mllp",))
        try:
            backlog = messages_for(patients, args.burst, 800_000)
            backlog_acks = send_load(feeder.ports["mllp"], backlog, connections=8, rate=None)
        finally:
            feeder.stop()
        api = start_serve([*cmd, "--only", "api"], cwd=Path(folder), env=ENV, expect=("http",))
        try:
            _wait_drained(db, time.monotonic() + 300)
        finally:
            api.stop()
    expected = set(acks) | set(burst_acks) | set(backlog_acks)
    arrivals = wait_arrivals(results, stop, expected, timeout=60)
    latencies = [(arrivals[a] - t) * 1000 for a, t in acks.items() if a in arrivals]
    burst_times = sorted(arrivals[a] for a in burst_acks if a in arrivals)
    backlog_times = sorted(arrivals[a] for a in backlog_acks if a in arrivals)
    return {
        "backend": "postgresql" if args.postgres else "sqlite",
        "subscriptions": args.subscriptions,
        "subscribe_seconds": round(subscribed_s, 1),
        "offered_oru_per_s": args.rate,
        "steady_messages": len(acks),
        "delivered": len(latencies),
        "ack_to_receiver_ms": {
            "p50": round(percentile(latencies, 50), 1),
            "p90": round(percentile(latencies, 90), 1),
            "p99": round(percentile(latencies, 99), 1),
            "max": round(max(latencies), 1) if latencies else None,
        },
        "burst_messages": len(burst_acks),
        "burst_delivered": len(burst_times),
        "deliveries_per_second_while_ingesting": _rate(burst_times),
        "backlog_delivered": len(backlog_times),
        "deliveries_per_second_alone": _rate(backlog_times),
    }


def _rate(times: Sequence[float]) -> float:
    if len(times) < 2:
        return 0.0
    return round((len(times) - 1) / (times[-1] - times[0]), 1)


def _wait_drained(db: str, deadline: float) -> None:
    from sqlalchemy import func, select

    from locator.store.db import create_db_engine
    from locator.store.models import subscription_outbox_table

    engine = create_db_engine(db)
    try:
        while True:
            with engine.connect() as conn:
                left = conn.execute(select(func.count()).select_from(subscription_outbox_table))
                if left.scalar_one() == 0:
                    return
            if time.monotonic() > deadline:
                raise RuntimeError("the outbox did not drain")
            time.sleep(0.1)
    finally:
        engine.dispose()


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--postgres", help="a migrated, empty PostgreSQL database URL")
    parser.add_argument("--rate", type=float, default=200.0)
    parser.add_argument("--seconds", type=float, default=30.0)
    parser.add_argument("--subscriptions", type=int, default=1000)
    parser.add_argument("--burst", type=int, default=3000)
    args = parser.parse_args(argv)
    print(json.dumps(run(args), indent=2))


if __name__ == "__main__":
    main(sys.argv[1:])
