"""The processing path of one HL7 message, shared by the MLLP listener and `locator replay`.

Two halves. `decide_message` is pure and fast (no I/O): frame bytes -> header checks, trust
binding, the ORU reading, the ACK to send and the journal copy. `commit_decisions` runs
inside the caller's transaction: idempotency against the journal, the notices of the
accepted messages applied (apply_notices), and the journal rows. The caller commits, and only
then sends the ACKs (interface.md, Feeds: "sent only after the message's effect is committed").
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime

from sqlalchemy.orm import Session

from ingest.hl7_ack import build_ack
from ingest.hl7_errors import (
    ErrorCode,
    ErrorLocation,
    Hl7Error,
    MessageContentError,
    MessageRejectedError,
)
from ingest.hl7_oru import read_oru
from ingest.hl7_redact import strip_for_journal
from ingest.hl7_segments import (
    Hl7Header,
    Hl7Message,
    check_header,
    declared_charset,
    decode_message,
    parse_message,
)
from locator.core import journal
from locator.core.index import apply_notices, lock_local_ids, look_up_stored
from locator.core.journal import NewEntry, Outcome, PreviousEntry
from locator.core.notice import StudyNotice
from locator.metrics import MESSAGES
from locator.store.db import Reads, Writes
from locator.trusts import TrustConfig, TrustRegistry

log = logging.getLogger(__name__)

FEED = "hl7"
JOURNAL_COPY_MAX_CHARS = 64 * 1024  # an oversize message is journaled truncated to this
UNKNOWN_TRUST = "unknown"
UNSTORABLE = "[content not kept: the message could not be stripped or stored]"


@dataclass(frozen=True, slots=True)
class Binding:
    """Who a connection may speak for (interface.md, Trusts file; design.md, Identity).

    `trust_ods`: the trust of a dedicated port or of the TLS client certificate (None on
    the shared port without a certificate name). `tls_names`: the names the client
    certificate carries; a trust with `tls_client_names` is only accepted from a connection
    presenting one of them when the listener runs TLS. `replay`: an operator's replay,
    bound by the facility alone.
    """

    label: str = "mllp"
    trust_ods: str | None = None
    peer_address: str | None = None
    tls: bool = False
    tls_names: tuple[str, ...] = ()
    replay: bool = False


@dataclass(slots=True)
class Decision:
    """Everything known about one message before the database is touched."""

    received_at: datetime
    sha256: str
    size: int
    outcome: Outcome
    ack: str
    stored_text: str
    header: Hl7Header | None = None
    trust_ods: str | None = None
    notices: tuple[StudyNotice, ...] = ()
    reason: str | None = None
    truncated: bool = False
    peer: str | None = None
    codec: str = "utf-8"
    replay_of: int | None = None
    final_outcome: Outcome | None = field(default=None)

    @property
    def check_duplicate(self) -> bool:
        # AR ones are re-evaluated (interface.md): only a readable header is looked up.
        return self.header is not None and self.outcome != Outcome.REJECTED


def _codec(raw: bytes | str) -> str:
    if isinstance(raw, str):
        return "utf-8"
    from ingest.hl7_segments import CHARSETS

    return CHARSETS.get(declared_charset(raw).upper(), "utf-8")


def resolve_trust(header: Hl7Header, registry: TrustRegistry, binding: Binding) -> TrustConfig:
    """MSH-4 -> the trust that owns it, if this connection may speak for it (else AR 204)."""
    facility = header.sending_facility
    where = ErrorLocation("MSH", 1, 4)
    trust = registry.by_facility(facility)
    if trust is None:
        raise MessageRejectedError(
            ErrorCode.UNKNOWN_KEY_IDENTIFIER,
            f"sending facility {facility or '(empty)'} is not registered",
            where,
        )
    if binding.replay:
        return trust
    if binding.trust_ods is not None and trust.ods_code != binding.trust_ods:
        raise MessageRejectedError(
            ErrorCode.UNKNOWN_KEY_IDENTIFIER,
            f"sending facility {facility} may not be sent on this "
            f"connection (bound to {binding.trust_ods})",
            where,
        )
    if (
        binding.tls
        and trust.tls_client_names
        and not set(binding.tls_names) & set(trust.tls_client_names)
    ):
        raise MessageRejectedError(
            ErrorCode.UNKNOWN_KEY_IDENTIFIER,
            f"sending facility {facility} needs its trust's TLS client certificate",
            where,
        )
    if (
        binding.label == "mllp"
        and binding.peer_address
        and not trust.allows_address(binding.peer_address)
    ):
        raise MessageRejectedError(
            ErrorCode.UNKNOWN_KEY_IDENTIFIER,
            f"sending facility {facility} may not be sent from this address",
            where,
        )
    return trust


def decide_message(
    payload: bytes | str,
    *,
    sha256: str,
    size: int,
    oversize: bool,
    registry: TrustRegistry,
    binding: Binding,
    accept_test_numbers: bool,
    received_at: datetime,
) -> Decision:
    """Read one message and decide its outcome and ACK (pure; never raises)."""
    text = decode_message(payload) if isinstance(payload, bytes) else payload
    base = Decision(
        received_at,
        sha256,
        size,
        Outcome.ACCEPTED,
        "",
        UNSTORABLE,
        truncated=oversize,
        peer=binding.peer_address,
        codec=_codec(payload),
    )
    message: Hl7Message | None = None
    trust: TrustConfig | None = None
    try:
        message = parse_message(text)
        base.header = message.header
        if oversize:
            raise MessageRejectedError(
                ErrorCode.APPLICATION_INTERNAL_ERROR,
                f"message of {size} bytes is over the size cap",
            )
        check_header(message.header)
        trust = resolve_trust(message.header, registry, binding)
        base.trust_ods = trust.ods_code
        base.notices = read_oru(
            message, trust=trust, accept_test_numbers=accept_test_numbers, received_at=received_at
        )
    except Hl7Error as error:
        _refuse(base, error)
    except Exception as exc:  # any reader failure is answered (AE 207), never silence
        log.exception(
            "HL7 reader failed on control id %s", message.header.control_id if message else "?"
        )
        _refuse(base, internal_error(text, exc))
    else:
        base.ack = build_ack(base.header)
    try:  # the message as parsed (split once), or its first characters when oversize
        if oversize:
            base.stored_text = strip_for_journal(text[:JOURNAL_COPY_MAX_CHARS])
        else:
            base.stored_text = strip_for_journal(text, message)
    except Exception:  # the journal copy must never cost the sender its ACK
        log.exception("stripping a message for the journal failed")
    return base


def _refuse(base: Decision, error: Hl7Error) -> Decision:
    if base.header is None and error.code != ErrorCode.APPLICATION_INTERNAL_ERROR:
        error = MessageContentError(
            ErrorCode.APPLICATION_INTERNAL_ERROR, error.text, error.location
        )
    base.outcome = Outcome.REJECTED if error.rejected else Outcome.ERROR
    base.reason = f"{int(error.code)} {error.text}"
    base.ack = build_ack(base.header, error=error)
    base.notices = ()
    return base


def internal_error(text: str, exc: Exception) -> Hl7Error:
    """An unexpected reader failure: AE 207, located by hl7apy where it can (off the hot
    path: errors are rare)."""
    from ingest.hl7_validate import locate_error

    return MessageContentError(
        ErrorCode.APPLICATION_INTERNAL_ERROR,
        f"the message could not be read ({type(exc).__name__})",
        locate_error(text),
    )


# --------------------------------------------------------------------------- commit


def commit_decisions(session: Session, decisions: Sequence[Decision]) -> list[str]:
    """Apply and journal each decision in the caller's transaction; the ACK of each.

    Few statements per batch: first, together (one round trip on PostgreSQL, with the
    BEGIN), the batch's local ids locked (PostgreSQL), earlier entries looked up for every
    message and the stored keys of its notices; then the notices of the messages that are
    not duplicates applied together (apply_notices), and the new studies' and the journal's
    rows sent together (one round trip on PostgreSQL)."""
    everything = [n for d in decisions for n in d.notices]
    reads = Reads(session.connection())
    lock_local_ids(reads, notices=everything)
    keys = [_key(d) for d in decisions if d.check_duplicate]
    found = journal.look_up_previous(reads, feed=FEED, keys=[k for k in keys if k])
    stored = look_up_stored(reads, notices=everything)  # duplicates' too: the answer covers more
    reads.run()
    previous = found()
    rows: list[NewEntry] = []
    notices: list[StudyNotice] = []
    acks = [_sort_one(session, d, previous, rows, notices) for d in decisions]
    writes = Writes()
    if notices:
        apply_notices(session, notices=notices, writes=writes, stored=stored)
    journal.add_entries(writes, entries=rows)
    writes.run(session.connection())
    return acks


def _key(d: Decision) -> journal.MessageKey | None:
    h = d.header
    return (h.sending_application, h.sending_facility, h.control_id) if h else None


def _sort_one(
    session: Session,
    d: Decision,
    previous: dict[journal.MessageKey, list[PreviousEntry]],
    rows: list[NewEntry],
    notices: list[StudyNotice],
) -> str:
    """Journal one message; its notices go to `notices` unless it is a duplicate."""
    key = _key(d)
    if d.check_duplicate and key is not None:
        earlier = previous.get(key, [])
        match = _same_message(d, earlier)
        if match is not None and match.ack is not None:
            where = f"journal entry {match.id}" if match.id > 0 else "an earlier message"
            _journal(session, d, Outcome.DUPLICATE, f"same message as {where}", match.ack, rows)
            return match.ack
        if any(p.sha256 != d.sha256 and p.outcome != Outcome.REJECTED for p in earlier):
            log.warning(
                "control id %s from %s/%s reused with different content: processed as "
                "a new message",
                *reversed(key),
            )
    notices += d.notices
    _journal(session, d, d.outcome, d.reason, d.ack, rows)
    if key is not None:  # later messages of the same batch see this one
        previous.setdefault(key, []).insert(
            0, PreviousEntry(-1, d.sha256, d.outcome, d.ack, d.reason)
        )
    return d.ack


def _same_message(d: Decision, earlier: list[PreviousEntry]) -> PreviousEntry | None:
    wanted = (
        (Outcome.ACCEPTED,) if d.replay_of else (Outcome.ACCEPTED, Outcome.ERROR, Outcome.DUPLICATE)
    )
    return next(
        (
            p
            for p in earlier
            if p.sha256 == d.sha256
            and p.outcome in wanted
            and p.id != d.replay_of
            and p.ack
            and not _ours(p.reason)
        ),
        None,
    )


def _ours(reason: str | None) -> bool:
    """An AE 207 was our own failure: a resend is processed again, not answered from the
    journal."""
    return bool(reason and reason.startswith(f"{int(ErrorCode.APPLICATION_INTERNAL_ERROR)} "))


def _journal(
    session: Session,
    d: Decision,
    outcome: Outcome,
    reason: str | None,
    ack: str,
    rows: list[NewEntry],
) -> None:
    d.final_outcome = outcome
    h = d.header
    if d.replay_of is not None:
        journal.update_entry(
            session,
            entry_id=d.replay_of,
            outcome=outcome,
            reason=reason,
            ack=ack,
            trust_ods=d.trust_ods,
            replayed_at=d.received_at,
        )
        return
    rows.append(
        NewEntry(
            received_at=d.received_at,
            feed=FEED,
            sha256=d.sha256,
            size=d.size,
            outcome=outcome,
            message=d.stored_text,
            trust_ods=d.trust_ods,
            peer=d.peer,
            sender_app=h.sending_application if h else None,
            sender_facility=h.sending_facility if h else None,
            control_id=h.control_id if h else None,
            truncated=d.truncated,
            reason=reason,
            ack=ack,
        )
    )


def count_outcomes(decisions: Sequence[Decision]) -> None:
    """Metrics, after the commit: MESSAGES{feed, trust, outcome}."""
    for d in decisions:
        outcome = d.final_outcome or d.outcome
        MESSAGES.labels(feed=FEED, trust=d.trust_ods or UNKNOWN_TRUST, outcome=outcome.value).inc()


def as_internal_error(d: Decision, text: str, *, unstorable: bool = False) -> Decision:
    """The same message answered AE 207 (our own non-transient failure while applying)."""
    error = MessageContentError(ErrorCode.APPLICATION_INTERNAL_ERROR, text)
    return replace(
        d,
        outcome=Outcome.ERROR,
        reason=f"207 {text}",
        notices=(),
        ack=build_ack(d.header, error=error),
        final_outcome=None,
        stored_text=UNSTORABLE if unstorable else d.stored_text,
    )
