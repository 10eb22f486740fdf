"""Results out: the machine, a printed (Markdown) table, results.json and the PNG plot."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

TARGETS = {
    "oru_per_second": 1000,
    "oru_p99_ms_at_200": 50,
    "mpps_pairs_per_second": 100,
    "searches_per_second_pg_1m": 1500,
    "search_p99_ms_at_half_pg_1m": 25,
    "searches_per_second_sqlite_1m": 750,
}


def _first_line(cmd: list[str]) -> str:
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, check=False).stdout
    except OSError:
        return "n/a"
    return out.strip().splitlines()[0] if out.strip() else "n/a"


def machine() -> dict[str, Any]:
    """Cores, memory and versions, read from the machine itself."""
    meminfo = Path("/proc/meminfo").read_text().splitlines()
    mem_kb = int(next(line for line in meminfo if line.startswith("MemTotal")).split()[1])
    cpuinfo = Path("/proc/cpuinfo").read_text().splitlines()
    model = next(
        (line.split(":", 1)[1].strip() for line in cpuinfo if line.startswith("model name")),
        platform.processor(),
    )
    return {
        "cores": os.cpu_count(),
        "cpu": model,
        "memory_gib": round(mem_kb / 1024 / 1024, 1),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "postgresql": _first_line(["bash", "-c", "ls /usr/lib/postgresql | sort -V | tail -1"]),
        "sqlite": __import__("sqlite3").sqlite_version,
        "orthanc": _first_line(["dpkg-query", "-W", "-f=${Version}", "orthanc"]),
        "orthanc_dicomweb": _first_line(["dpkg-query", "-W", "-f=${Version}", "orthanc-dicomweb"]),
        "wrk": _first_line(["dpkg-query", "-W", "-f=${Version}", "wrk"]),
    }


def loadavg() -> list[float]:
    return [float(x) for x in Path("/proc/loadavg").read_text().split()[:3]]


_ECHO = "import os\nwhile (b := os.read(0, 1)):\n    os.write(1, b)\n"


def calibration(round_trips: int = 2000) -> dict[str, float]:
    """How fast this VM is right now, for comparing runs at different hours: a fixed piece
    of Python work (best of five, ms) and the median round trip of one byte to another
    process over pipes (µs; the closed-loop ingest figures are made of such hand-offs)."""
    best = float("inf")
    for _ in range(5):
        t0 = time.perf_counter()
        table: dict[int, int] = {}
        for i in range(300_000):
            table[i % 1000] = table.get(i % 1000, 0) + i
        best = min(best, time.perf_counter() - t0)
    child = subprocess.Popen(
        [sys.executable, "-c", _ECHO], stdin=subprocess.PIPE, stdout=subprocess.PIPE, bufsize=0
    )
    assert child.stdin is not None and child.stdout is not None
    trips = []
    try:
        for _ in range(round_trips):
            t0 = time.perf_counter()
            child.stdin.write(b"x")
            child.stdout.read(1)
            trips.append(time.perf_counter() - t0)
    finally:
        child.stdin.close()
        child.wait()
    trips.sort()
    return {
        "python_ms": round(best * 1000, 1),
        "round_trip_us": round(trips[len(trips) // 2] * 1e6, 1),
    }


def _fmt(value: Any, digits: int = 1) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:,.{digits}f}"
    return f"{value:,}" if isinstance(value, int) else str(value)


def table(results: dict[str, Any]) -> str:
    lines: list[str] = []
    if results.get("data"):
        lines += [
            "| bulk load | studies | patients | seconds | studies/s | bytes/study |",
            "|---|---:|---:|---:|---:|---:|",
        ]
        for d in results["data"]:
            lines.append(
                f"| {d['backend']} | {_fmt(d['studies'])} | {_fmt(d['patients'])} | "
                f"{_fmt(d['seconds'])} | {_fmt(d['studies_per_second'], 0)} | "
                f"{_fmt(d.get('bytes_per_study'))} |"
            )
        lines.append("")
    if results.get("ingest"):
        lines += [
            "| ingest | backend | connections | offered/s | committed/s | p50 ms | p95 ms "
            "| p99 ms | not accepted | note |",
            "|---|---|---:|---:|---:|---:|---:|---:|---:|---|",
        ]
        for r in results["ingest"]:
            lines.append(
                f"| {r['feed']} | {r['backend']} | {r['connections']} | {_fmt(r['offered'], 0)} | "
                f"{_fmt(r['rate'], 0)} | {_fmt(r['p50_ms'])} | {_fmt(r['p95_ms'])} | "
                f"{_fmt(r['p99_ms'])} | {r['other']} | {r['note']} |"
            )
        lines.append("")
    if results.get("search"):
        lines += [
            "| search | studies | API processes | _include | max searches/s | at half: "
            "p50 ms | p95 ms | p99 ms | errors |",
            "|---|---:|---:|---|---:|---:|---:|---:|---:|",
        ]
        for s in results["search"]:
            m, h = s["max"], s["at_half"]
            lines.append(
                f"| {s['backend']} | {_fmt(s['studies'])} | {s['api_processes']} | "
                f"{'yes' if s['include'] else 'no'} | {_fmt(m['rate'], 0)} | {_fmt(h['p50_ms'])} | "
                f"{_fmt(h['p95_ms'])} | {_fmt(h['p99_ms'])} | {m['errors'] + h['errors']} |"
            )
        lines.append("")
    fan = results.get("fanout")
    if fan and fan.get("rows"):
        loc = fan["locator"]
        lines += [
            "| trusts (PACS) | fan-out p50 ms | p95 ms | p99 ms | locator p50 ms | p95 ms "
            "| locator : fan-out (p50) | load (instances/s) |",
            "|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for r in fan["rows"]:
            f = r["fan_out"]
            lines.append(
                f"| {r['pacs']} | {_fmt(f['p50_ms'])} | {_fmt(f['p95_ms'])} | {_fmt(f['p99_ms'])} "
                f"| {_fmt(loc['p50_ms'])} | {_fmt(loc['p95_ms'])} | 1 : "
                f"{_fmt(1 / r['ratio_p50'])} | {_fmt(r['load_instances_per_second'], 0)} |"
            )
        lines.append("")
    return "\n".join(lines)


def write_json(results: dict[str, Any], path: Path) -> None:
    path.write_text(json.dumps(results, indent=2, default=str) + "\n")


def plot(results: dict[str, Any], path: Path) -> bool:
    """Left: fan-out vs locator latency by number of trusts. Right: search latency by index
    size. Returns False when there is nothing to draw."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fan = results.get("fanout") or {}
    searches = [s for s in results.get("search", []) if s["include"]]
    if not fan.get("rows") and not searches:
        return False
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    if fan.get("rows"):
        n = [r["pacs"] for r in fan["rows"]]
        for key, style, label in (("p50_ms", "o-", "p50"), ("p95_ms", "s--", "p95")):
            left.plot(
                n,
                [r["fan_out"][key] for r in fan["rows"]],
                style,
                color="tab:red",
                label=f"ask every PACS (QIDO-RS), {label}",
            )
            left.plot(
                n,
                [fan["locator"][key]] * len(n),
                style,
                color="tab:blue",
                label=f"ask the locator (FHIR), {label}",
            )
        left.set_xscale("log", base=2)
        left.set_xticks(n, [str(x) for x in n])
        left.set_xlabel("trusts (Orthanc PACS on loopback)")
        left.set_ylabel("time to find a patient's studies (ms)")
        left.set_title(f"Locator vs federated query, {fan['studies']:,} studies")
        left.set_ylim(bottom=0)
        left.legend(fontsize=8)
        left.grid(alpha=0.3)
    for backend, color in (("postgresql", "tab:blue"), ("sqlite", "tab:green")):
        rows = sorted(
            (s for s in searches if s["backend"] == backend),
            key=lambda s: (s["studies"], -s["api_processes"]),
        )
        best: dict[int, dict[str, Any]] = {}
        for s in rows:
            best.setdefault(s["studies"], s)
        if not best:
            continue
        sizes = sorted(best)
        right.plot(
            sizes,
            [best[x]["at_half"]["p50_ms"] for x in sizes],
            "o-",
            color=color,
            label=f"{backend} p50 at half max",
        )
        right.plot(
            sizes,
            [best[x]["at_half"]["p95_ms"] for x in sizes],
            "s--",
            color=color,
            label=f"{backend} p95 at half max",
        )
    if searches:
        right.set_xscale("log")
        right.set_xlabel("studies in the index")
        right.set_ylabel("search latency (ms)")
        right.set_title("Search latency by index size (_include=endpoint)")
        right.set_ylim(bottom=0)
        right.legend(fontsize=8)
        right.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def check_targets(results: dict[str, Any]) -> dict[str, Any]:
    """Each target of the issues against the best configuration measured for it."""
    out: dict[str, Any] = {}
    ingest = results.get("ingest", [])
    oru = [r for r in ingest if r["feed"] == "oru-mllp" and r["offered"] is None]
    paced = [r for r in ingest if r["feed"] == "oru-mllp" and r["offered"]]
    mpps = [r for r in ingest if r["feed"] == "mpps-pairs"]
    for backend in ("sqlite", "postgresql"):
        best = max((r["rate"] for r in oru if r["backend"] == backend), default=None)
        out[f"oru_per_second_{backend}"] = _verdict(best, TARGETS["oru_per_second"], higher=True)
        p99 = min((r["p99_ms"] for r in paced if r["backend"] == backend), default=None)
        out[f"oru_p99_ms_at_200_{backend}"] = _verdict(
            p99, TARGETS["oru_p99_ms_at_200"], higher=False
        )
        best = max((r["rate"] for r in mpps if r["backend"] == backend), default=None)
        out[f"mpps_pairs_per_second_{backend}"] = _verdict(
            best, TARGETS["mpps_pairs_per_second"], higher=True
        )
    search = [s for s in results.get("search", []) if s["include"]]
    biggest = {
        b: max((s["studies"] for s in search if s["backend"] == b), default=None)
        for b in ("postgresql", "sqlite")
    }
    pg = [
        s for s in search if s["backend"] == "postgresql" and s["studies"] == biggest["postgresql"]
    ]
    lite = [s for s in search if s["backend"] == "sqlite" and s["studies"] == biggest["sqlite"]]
    out["searches_per_second_pg"] = _verdict(
        max((s["max"]["rate"] for s in pg), default=None),
        TARGETS["searches_per_second_pg_1m"],
        higher=True,
    ) | {"studies": biggest["postgresql"]}
    out["search_p99_ms_at_half_pg"] = _verdict(
        min((s["at_half"]["p99_ms"] for s in pg), default=None),
        TARGETS["search_p99_ms_at_half_pg_1m"],
        higher=False,
    ) | {"studies": biggest["postgresql"]}
    out["searches_per_second_sqlite"] = _verdict(
        max((s["max"]["rate"] for s in lite), default=None),
        TARGETS["searches_per_second_sqlite_1m"],
        higher=True,
    ) | {"studies": biggest["sqlite"]}
    return out


def _verdict(value: float | None, target: float, *, higher: bool) -> dict[str, Any]:
    if value is None:
        return {"measured": None, "target": target, "met": None}
    met = value >= target if higher else value <= target
    return {"measured": round(value, 1), "target": target, "met": met}


def _calibration_text(results: dict[str, Any]) -> str:
    start, end = results.get("calibration_start"), results.get("calibration_end")
    if not start or not end:
        return ""  # runs before the calibration was recorded
    return (
        " Calibration (report.calibration: a fixed piece of Python work, best of five; a one-byte"
        f" round trip to another process, median): {start['python_ms']} ms and"
        f" {start['round_trip_us']} µs at the start, {end['python_ms']} ms and"
        f" {end['round_trip_us']} µs at the end."
    )


def summary(results: dict[str, Any]) -> str:
    """The machine, the conditions and the tables, as Markdown (docs/bench/summary.md)."""
    m = results["machine"]
    lines = [
        f"Measured {results['started']} to {results['finished']} with `{results['command']}` "
        f"({results['seconds']:.0f} s) on {m['cores']} cores ({m['cpu']}), "
        f"{m['memory_gib']} GiB memory, kernel {m['kernel']}, Python {m['python']}, "
        f"PostgreSQL {m['postgresql']}, SQLite {m['sqlite']}, Orthanc {m['orthanc']} with "
        f"DICOMweb {m['orthanc_dicomweb']}, wrk {m['wrk']}. Load average (1/5/15 min) "
        f"{results['loadavg_start']} at the start and {results['loadavg_end']} at the end."
        + _calibration_text(results),
        "",
        table(results),
    ]
    for key, verdict in results.get("targets", {}).items():
        state = {True: "met", False: "NOT met", None: "not measured"}[verdict["met"]]
        lines.append(f"- {key}: {verdict['measured']} (target {verdict['target']}): {state}")
    for item in results.get("not_measured", []):
        lines.append(f"- not measured: {item}")
    return "\n".join(lines) + "\n"
