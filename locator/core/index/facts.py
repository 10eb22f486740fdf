"""A study's facts as a join-semilattice: what its notices said, joined in any order.

design.md, "One study, two feeds": status is the highest evidence seen (registered <
cancelled < available); the report the best (rank, OBR-22 time, content hash), so a late
preliminary never downgrades a final; started the earliest time; modalities, procedures and
feeds unions; per source (an MPPS step) the series list with the highest version, then their
union. Pure: rows in, columns out; no SQL is sent from here.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from locator.core.notice import (
    REPORT_RANK,
    STATUS_RANK,
    ReportStatus,
    SeriesRef,
    StudyNotice,
    StudyRef,
    StudyStatus,
)

_EPOCH = datetime(1, 1, 1, tzinfo=UTC)


@dataclass(frozen=True, slots=True)
class ReportKey:
    """Orders report versions: rank, then the report's status-change time, then content hash."""

    rank: int
    time: datetime
    hash: str
    status: ReportStatus

    @property
    def order(self) -> tuple[int, datetime, str]:
        return (self.rank, self.time, self.hash)


@dataclass(frozen=True, slots=True)
class StudyFacts:
    """What a study's notices said, as a join-semilattice (design.md, one study two feeds)."""

    evidence: StudyStatus | None = None
    report: ReportKey | None = None
    started: datetime | None = None
    modalities: frozenset[str] = frozenset()
    procedures: frozenset[tuple[str, str, str]] = frozenset()
    series_sources: dict[str, tuple[int, tuple[SeriesRef, ...]]] = field(default_factory=dict)
    feeds: frozenset[str] = frozenset()

    def join(self, other: StudyFacts) -> StudyFacts:
        sources = dict(self.series_sources)
        for source, entry in other.series_sources.items():
            sources[source] = max(sources.get(source, entry), entry, key=series_order)
        return StudyFacts(
            evidence=_max_status(self.evidence, other.evidence),
            report=_max_report(self.report, other.report),
            started=_min_time(self.started, other.started),
            modalities=self.modalities | other.modalities,
            procedures=self.procedures | other.procedures,
            series_sources=sources,
            feeds=self.feeds | other.feeds,
        )

    def series(self) -> list[SeriesRef]:
        """The union of every source's current list; a series named twice keeps its larger
        count."""
        merged: dict[str, SeriesRef] = {}
        for _, items in self.series_sources.values():
            for item in items:
                known = merged.get(item.uid)
                if known is None or _series_ref_order(item) > _series_ref_order(known):
                    merged[item.uid] = item
        return [merged[uid] for uid in sorted(merged)]


def _series_ref_order(s: SeriesRef) -> tuple[int, str]:
    return (s.number_of_instances, s.modality or "")


def series_order(entry: tuple[int, tuple[SeriesRef, ...]]) -> tuple[int, str]:
    version, items = entry
    return (version, json.dumps([_series_json(s) for s in items], sort_keys=True))


def _max_status(a: StudyStatus | None, b: StudyStatus | None) -> StudyStatus | None:
    if a is None or b is None:
        return a or b
    return a if STATUS_RANK[a] >= STATUS_RANK[b] else b


def _max_report(a: ReportKey | None, b: ReportKey | None) -> ReportKey | None:
    if a is None or b is None:
        return a or b
    return a if a.order >= b.order else b


def _min_time(a: datetime | None, b: datetime | None) -> datetime | None:
    if a is None or b is None:
        return a or b
    return min(a, b)


def facts_of_ref(notice: StudyNotice, ref: StudyRef) -> StudyFacts:
    """What one notice says about one study."""
    report = None
    if ref.report_status is not None:
        report = ReportKey(
            rank=REPORT_RANK[ref.report_status],
            time=ref.report_time or _EPOCH,
            hash=ref.report_hash or "",
            status=ref.report_status,
        )
    procedures: frozenset[tuple[str, str, str]] = frozenset()
    if ref.procedure is not None:
        p = ref.procedure
        procedures = frozenset({(p.system or "", p.code, p.display or "")})
    sources = {}
    if ref.series is not None:
        sources[notice.source] = (
            ref.series_version,
            tuple(sorted(ref.series, key=lambda s: s.uid)),
        )
    return StudyFacts(
        evidence=ref.status,
        report=report,
        started=ref.started,
        modalities=frozenset(m for m in ref.modalities if m),
        procedures=procedures,
        series_sources=sources,
        feeds=frozenset({notice.feed.value}),
    )


def _series_json(s: SeriesRef) -> dict[str, Any]:
    return {"uid": s.uid, "modality": s.modality, "number_of_instances": s.number_of_instances}


def _series_from_json(d: dict[str, Any]) -> SeriesRef:
    return SeriesRef(
        uid=d["uid"],
        modality=d.get("modality"),
        number_of_instances=int(d.get("number_of_instances") or 0),
    )


def facts_of_row(row: Any) -> StudyFacts:
    report = None
    if row.report_status:
        status = ReportStatus(row.report_status)
        report = ReportKey(
            REPORT_RANK[status], row.report_time or _EPOCH, row.report_hash or "", status
        )
    sources = {
        source: (int(entry["version"]), tuple(_series_from_json(s) for s in entry["series"]))
        for source, entry in json.loads(row.series_sources).items()
    }
    return StudyFacts(
        evidence=StudyStatus(row.evidence_status),
        report=report,
        started=row.started,
        modalities=frozenset(m for m in row.modalities.split(",") if m),
        procedures=frozenset(tuple(p) for p in json.loads(row.procedures)),
        series_sources=sources,
        feeds=frozenset(f for f in row.feeds.split(",") if f),
    )


def columns_of_facts(facts: StudyFacts) -> dict[str, Any]:
    """The study columns that the facts determine."""
    series = facts.series()
    told = bool(facts.series_sources)
    report = facts.report
    return {
        "evidence_status": (facts.evidence or StudyStatus.REGISTERED).value,
        "report_status": report.status.value if report else None,
        "report_time": report.time if report and report.time != _EPOCH else None,
        "report_hash": report.hash or None if report else None,
        "started": facts.started,
        "modalities": ",".join(sorted(facts.modalities)),
        "procedures": json.dumps(sorted(facts.procedures)),
        "series": json.dumps([_series_json(s) for s in series]),
        "series_sources": json.dumps(
            {
                source: {"version": v, "series": [_series_json(s) for s in items]}
                for source, (v, items) in sorted(facts.series_sources.items())
            },
            sort_keys=True,
        ),
        "number_of_series": len(series) if told else None,
        "number_of_instances": sum(s.number_of_instances for s in series) if told else None,
        "feeds": ",".join(sorted(facts.feeds)),
    }
