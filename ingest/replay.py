"""`locator journal` and `locator replay`: the journal seen by a trust's integration team.

Replay re-processes `error` and `rejected` entries through the listener's own path
(ingest.hl7_process) after a configuration fix (a trust's facility registered, the test-range
setting changed, a reader fixed): same header checks, same reading, same idempotency, same
journal. The entry is updated in place with its new outcome, ACK and `replayed_at`. A replay
is an operator's act, so the connection binding (dedicated port, source address, TLS name)
is not re-checked: the sending facility alone names the trust. Entries journaled truncated
(over the size cap) cannot be replayed. Listings never print an NHS Number in clear.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

from sqlalchemy.orm import Session, sessionmaker

from ingest.hl7_process import (
    FEED,
    Binding,
    commit_decisions,
    count_outcomes,
    decide_message,
)
from ingest.hl7_validate import describe_message
from locator.core.journal import REPLAYABLE, JournalView, Outcome, get_entry, list_entries
from locator.core.nhs_number import redact_text
from locator.store.db import is_conflict, transaction
from locator.trusts import TrustRegistry

_AGE = re.compile(r"^(\d+)\s*([mhdw])$")
_UNITS = {"m": "minutes", "h": "hours", "d": "days", "w": "weeks"}
CONFLICT_RETRIES = 3


def parse_since(value: str | None, *, now: datetime | None = None) -> datetime | None:
    """An ISO date/time (UTC when no offset) or an age such as `30m`, `24h`, `7d`, `2w`."""
    if not value:
        return None
    match = _AGE.match(value.strip().lower())
    if match:
        amount, unit = int(match.group(1)), _UNITS[match.group(2)]
        return (now or datetime.now(UTC)) - timedelta(**{unit: amount})
    try:
        parsed = datetime.fromisoformat(value.strip())
    except ValueError as exc:
        raise ValueError(f"--since: {value!r} is neither an ISO date/time nor an age") from exc
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)


def format_entry(entry: JournalView) -> str:
    """One line: time, trust, sender, control id, outcome, reason (NHS Numbers masked)."""
    sender = f"{entry.sender_app or '-'}@{entry.sender_facility or '-'}"
    flags = " (truncated)" if entry.truncated else ""
    if entry.replayed_at is not None:
        flags += f" (replayed {entry.replayed_at:%Y-%m-%d %H:%M:%S})"
    line = "\t".join(
        [
            f"#{entry.id}",
            f"{entry.received_at:%Y-%m-%d %H:%M:%S}Z",
            entry.trust_ods or "-",
            sender,
            entry.control_id or "-",
            entry.outcome.value + flags,
            entry.reason or "",
        ]
    )
    return redact_text(line)


def journal_lines(
    factory: sessionmaker[Session],
    *,
    trust_ods: str | None = None,
    outcomes: Sequence[str] = (),
    since: datetime | None = None,
    limit: int = 50,
) -> list[str]:
    with factory() as session:
        entries = list_entries(
            session,
            trust_ods=trust_ods,
            outcomes=[Outcome(o) for o in outcomes],
            since=since,
            limit=limit,
        )
    if not entries:
        return ["no journal entries match"]
    return [format_entry(e) for e in entries]


def describe_entry(factory: sessionmaker[Session], *, entry_id: int) -> list[str]:
    """One entry's stored (already stripped) copy, field by field, read by hl7apy."""
    with factory() as session:
        entry = get_entry(session, entry_id=entry_id)
    if entry is None:
        raise ValueError(f"no journal entry #{entry_id}")
    lines = [format_entry(entry)]
    lines += [
        redact_text(f"  {label}: {value}") for label, value in describe_message(entry.message)
    ]
    return lines


@dataclass
class ReplaySummary:
    outcomes: Counter[str] = field(default_factory=Counter)
    skipped: int = 0

    @property
    def total(self) -> int:
        return sum(self.outcomes.values()) + self.skipped

    def text(self) -> str:
        parts = [f"{n} {name}" for name, n in sorted(self.outcomes.items())]
        if self.skipped:
            parts.append(f"{self.skipped} skipped (journaled truncated)")
        return f"replayed {self.total} entr{'y' if self.total == 1 else 'ies'}: " + (
            ", ".join(parts) or "nothing to do"
        )


def entries_to_replay(
    factory: sessionmaker[Session], *, outcomes: Sequence[str] = ()
) -> list[JournalView]:
    wanted = [Outcome(o) for o in outcomes] or list(REPLAYABLE)
    if any(o not in REPLAYABLE for o in wanted):
        raise ValueError("only error and rejected entries can be replayed")
    with factory() as session:
        entries = list_entries(
            session, outcomes=wanted, limit=None, with_message=True, oldest_first=True
        )
    return [e for e in entries if e.feed == FEED]


def replay_entries(
    factory: sessionmaker[Session],
    entries: Sequence[JournalView],
    *,
    registry: TrustRegistry,
    accept_test_numbers: bool,
    progress: Callable[[int], None] | None = None,
) -> ReplaySummary:
    """Re-process each entry in its own transaction, oldest first."""
    summary = ReplaySummary()
    for entry in entries:
        if entry.truncated:
            summary.skipped += 1
        else:
            summary.outcomes[_replay_one(factory, entry, registry, accept_test_numbers)] += 1
        if progress is not None:
            progress(1)
    return summary


def _replay_one(
    factory: sessionmaker[Session],
    entry: JournalView,
    registry: TrustRegistry,
    accept_test_numbers: bool,
) -> str:
    for attempt in range(CONFLICT_RETRIES + 1):
        decision = decide_message(
            entry.message,
            sha256=entry.sha256,
            size=entry.size,
            oversize=False,
            registry=registry,
            binding=Binding(replay=True, peer_address=entry.peer),
            accept_test_numbers=accept_test_numbers,
            received_at=datetime.now(UTC),
        )
        decision.replay_of = entry.id
        try:
            with transaction(factory) as session:
                commit_decisions(session, [decision])
        except Exception as exc:
            if is_conflict(exc) and attempt < CONFLICT_RETRIES:
                continue
            raise
        count_outcomes([decision])
        return (decision.final_outcome or decision.outcome).value
    raise AssertionError("unreachable")
