"""SQL tables (SQLModel). The schema is created only by Alembic migrations.

A study pointer holds identifiers, codes, times and counts: no names, no dates of birth, no
report text. The NHS Number on a study row is the *effective* one derived from the live
patient assertions (design.md, identity rules) and is NULL while the study is held under a
local id or quarantined, so the hot read path is one index range scan.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    BigInteger,
    Column,
    DateTime,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    UniqueConstraint,
    text,
)
from sqlalchemy.types import TypeDecorator
from sqlmodel import Field, SQLModel

NAMING_CONVENTION = {
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}

SQLModel.metadata = MetaData(naming_convention=NAMING_CONVENTION)
metadata = SQLModel.metadata


class UTCDateTime(TypeDecorator[datetime]):
    """Timezone-aware datetimes stored as UTC on every backend (SQLite keeps no offset)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Any) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime given to a timezone-aware column")
        value = value.astimezone(UTC)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: datetime | None, dialect: Any) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


def utcnow() -> datetime:
    return datetime.now(UTC)


def _ts(nullable: bool = False, **kw: Any) -> Any:
    return Field(sa_column=Column(UTCDateTime(), nullable=nullable, **kw))


class Trust(SQLModel, table=True):
    """A trust of the registry; `config` is its whole TOML table as JSON."""

    __tablename__ = "trust"
    ods_code: str = Field(sa_column=Column(String(16), primary_key=True))
    name: str = Field(sa_column=Column(String(200), nullable=False))
    config: str = Field(sa_column=Column(Text, nullable=False))
    updated_at: datetime = _ts()


class TrustAlias(SQLModel, table=True):
    """A feed identity owned by exactly one trust: an MSH-4 facility, a calling AE title,
    a TLS client name. The primary key enforces "belongs to one trust only"."""

    __tablename__ = "trust_alias"
    kind: str = Field(sa_column=Column(String(16), primary_key=True))
    value: str = Field(sa_column=Column(String(200), primary_key=True))
    ods_code: str = Field(
        sa_column=Column(
            String(16), ForeignKey("trust.ods_code", ondelete="CASCADE"), nullable=False
        )
    )


class Study(SQLModel, table=True):
    __tablename__ = "study"
    __table_args__ = (
        Index("ix_study_nhs_number_sort_time_id", "nhs_number", "sort_time", "id"),
        Index("ix_study_nhs_number_updated_at_id", "nhs_number", "updated_at", "id"),
        Index("ix_study_patient_state", "patient_state"),
    )
    id: str = Field(sa_column=Column(String(32), primary_key=True))
    trust_ods: str = Field(
        sa_column=Column(String(16), ForeignKey("trust.ods_code"), nullable=False)
    )
    study_uid: str | None = Field(sa_column=Column(String(64)))
    accession: str | None = Field(sa_column=Column(String(64)))
    nhs_number: str | None = Field(sa_column=Column(String(10)))
    patient_state: str = Field(sa_column=Column(String(20), nullable=False))
    local_id: str | None = Field(sa_column=Column(String(64)))
    status: str = Field(sa_column=Column(String(20), nullable=False))
    evidence_status: str = Field(sa_column=Column(String(20), nullable=False))
    report_status: str | None = Field(sa_column=Column(String(20)))
    report_time: datetime | None = _ts(nullable=True)
    report_hash: str | None = Field(sa_column=Column(String(64)))
    started: datetime | None = _ts(nullable=True)
    sort_time: datetime = _ts()
    modalities: str = Field(sa_column=Column(String(200), nullable=False, server_default=""))
    procedures: str = Field(sa_column=Column(Text, nullable=False, server_default="[]"))
    series: str = Field(sa_column=Column(Text, nullable=False, server_default="[]"))
    series_sources: str = Field(sa_column=Column(Text, nullable=False, server_default="{}"))
    number_of_series: int | None = Field(sa_column=Column(Integer))
    number_of_instances: int | None = Field(sa_column=Column(Integer))
    feeds: str = Field(sa_column=Column(String(40), nullable=False))
    created_at: datetime = _ts()
    first_seen: datetime = _ts()
    last_seen: datetime = _ts()
    updated_at: datetime = _ts()
    version: int = Field(sa_column=Column(Integer, nullable=False, server_default=text("1")))
    merged_into: str | None = Field(sa_column=Column(String(32), ForeignKey("study.id")))


class StudyKey(SQLModel, table=True):
    """(trust, Study Instance UID) and (trust, accession) keys, each naming one study."""

    __tablename__ = "study_key"
    __table_args__ = (Index("ix_study_key_study_id", "study_id"),)
    trust_ods: str = Field(sa_column=Column(String(16), primary_key=True))
    kind: str = Field(sa_column=Column(String(8), primary_key=True))
    value: str = Field(sa_column=Column(String(64), primary_key=True))
    study_id: str = Field(sa_column=Column(String(32), ForeignKey("study.id"), nullable=False))


class PatientAssertion(SQLModel, table=True):
    """One source's claim that a study belongs to a patient (NHS Number or local id).
    A withdrawal is permanent: the assertion stays as a tombstone."""

    __tablename__ = "patient_assertion"
    __table_args__ = (
        UniqueConstraint("study_id", "source", "patient_key"),
        Index("ix_patient_assertion_trust_ods_local_id", "trust_ods", "local_id"),
    )
    id: int | None = Field(default=None, sa_column=Column(Integer, primary_key=True))
    study_id: str = Field(sa_column=Column(String(32), ForeignKey("study.id"), nullable=False))
    source: str = Field(sa_column=Column(String(200), nullable=False))
    patient_key: str = Field(sa_column=Column(String(80), nullable=False))
    trust_ods: str = Field(sa_column=Column(String(16), nullable=False))
    nhs_number: str | None = Field(sa_column=Column(String(10)))
    local_id: str | None = Field(sa_column=Column(String(64)))
    withdrawn: bool = Field(default=False, nullable=False)
    first_seen: datetime = _ts()


class LocalLink(SQLModel, table=True):
    """A trust's statement that its local patient id belongs to an NHS Number."""

    __tablename__ = "local_link"
    trust_ods: str = Field(sa_column=Column(String(16), primary_key=True))
    local_id: str = Field(sa_column=Column(String(64), primary_key=True))
    nhs_number: str = Field(sa_column=Column(String(10), primary_key=True))
    first_seen: datetime = _ts()


class JournalEntry(SQLModel, table=True):
    """Every inbound feed message: who sent it, when, its hash, outcome and reason, and a
    copy stripped of report text and demographics beyond identifiers."""

    __tablename__ = "journal"
    __table_args__ = (
        Index(
            "ix_journal_sender_app_sender_facility_control_id",
            "sender_app",
            "sender_facility",
            "control_id",
        ),
        Index("ix_journal_trust_ods_received_at", "trust_ods", "received_at"),
        Index("ix_journal_outcome_received_at", "outcome", "received_at"),
    )
    id: int | None = Field(
        default=None,
        sa_column=Column(
            BigInteger().with_variant(Integer, "sqlite"), primary_key=True, autoincrement=True
        ),
    )
    received_at: datetime = _ts()
    feed: str = Field(sa_column=Column(String(8), nullable=False))
    trust_ods: str | None = Field(sa_column=Column(String(16)))
    peer: str | None = Field(sa_column=Column(String(100)))
    sender_app: str | None = Field(sa_column=Column(String(200)))
    sender_facility: str | None = Field(sa_column=Column(String(200)))
    control_id: str | None = Field(sa_column=Column(String(200)))
    sha256: str = Field(sa_column=Column(String(64), nullable=False))
    size: int = Field(sa_column=Column(Integer, nullable=False))
    truncated: bool = Field(default=False, nullable=False)
    outcome: str = Field(sa_column=Column(String(16), nullable=False))
    reason: str | None = Field(sa_column=Column(Text))
    ack: str | None = Field(sa_column=Column(Text))
    message: str = Field(sa_column=Column(Text, nullable=False))
    replayed_at: datetime | None = _ts(nullable=True)


class MppsStep(SQLModel, table=True):
    """A Modality Performed Procedure Step, kept between N-CREATE and N-SET."""

    __tablename__ = "mpps_step"
    __table_args__ = (Index("ix_mpps_step_status_created_at", "status", "created_at"),)
    sop_instance_uid: str = Field(sa_column=Column(String(64), primary_key=True))
    trust_ods: str = Field(sa_column=Column(String(16), nullable=False))
    calling_ae: str = Field(sa_column=Column(String(16), nullable=False))
    status: str = Field(sa_column=Column(String(16), nullable=False))
    version: int = Field(sa_column=Column(Integer, nullable=False, server_default=text("0")))
    attributes: str = Field(sa_column=Column(Text, nullable=False))
    create_hash: str = Field(sa_column=Column(String(64), nullable=False))
    last_set_hash: str | None = Field(sa_column=Column(String(64)))
    created_at: datetime = _ts()
    updated_at: datetime = _ts()
    stale_reported_at: datetime | None = _ts(nullable=True)


class AuditRecord(SQLModel, table=True):
    """Who looked at which patient, when, and what came of it. Append-only: triggers in
    the migration refuse UPDATE and DELETE."""

    __tablename__ = "audit"
    __table_args__ = (
        Index("ix_audit_nhs_number_recorded_at", "nhs_number", "recorded_at"),
        Index("ix_audit_recorded_at", "recorded_at"),
    )
    id: int | None = Field(
        default=None,
        sa_column=Column(
            BigInteger().with_variant(Integer, "sqlite"), primary_key=True, autoincrement=True
        ),
    )
    recorded_at: datetime = _ts()
    request_id: str = Field(sa_column=Column(String(100), nullable=False))
    action: str = Field(sa_column=Column(String(20), nullable=False))
    resource_type: str = Field(sa_column=Column(String(40), nullable=False))
    query: str = Field(sa_column=Column(Text, nullable=False))
    nhs_number: str | None = Field(sa_column=Column(String(10)))
    trust_ods: str | None = Field(sa_column=Column(String(200)))
    result_count: int | None = Field(sa_column=Column(Integer))
    outcome: int = Field(sa_column=Column(Integer, nullable=False))
    subject: str | None = Field(sa_column=Column(String(200)))
    client_id: str | None = Field(sa_column=Column(String(200)))
    organisation: str | None = Field(sa_column=Column(String(200)))
    role: str | None = Field(sa_column=Column(String(200)))
    purpose_of_use: str | None = Field(sa_column=Column(String(200)))
    remote_addr: str | None = Field(sa_column=Column(String(100)))


class ServiceSetting(SQLModel, table=True):
    """Small service-wide values kept in the database (the generated cursor secret)."""

    __tablename__ = "service_setting"
    key: str = Field(sa_column=Column(String(64), primary_key=True))
    value: str = Field(sa_column=Column(Text, nullable=False))


class Subscription(SQLModel, table=True):
    """A care record's FHIR R4 Subscription (rest-hook) to one patient's ImagingStudies.

    `owner` is the client that made it (the token's client id, else its subject); `headers`
    the channel.header lines as a JSON list. Delivery state lives here because delivery is in
    order per subscription: `failing_since` / `attempts` / `next_attempt_at` describe the
    notification at the head of its queue."""

    __tablename__ = "subscription"
    __table_args__ = (
        Index("ix_subscription_nhs_number_status", "nhs_number", "status"),
        Index("ix_subscription_owner_status", "owner", "status"),
    )
    id: str = Field(sa_column=Column(String(32), primary_key=True))
    owner: str = Field(sa_column=Column(String(200), nullable=False))
    status: str = Field(sa_column=Column(String(16), nullable=False))
    nhs_number: str = Field(sa_column=Column(String(10), nullable=False))
    endpoint: str = Field(sa_column=Column(Text, nullable=False))
    payload: str | None = Field(sa_column=Column(String(60)))
    headers: str = Field(sa_column=Column(Text, nullable=False, server_default="[]"))
    reason: str | None = Field(sa_column=Column(Text))
    end_at: datetime | None = _ts(nullable=True)
    error: str | None = Field(sa_column=Column(Text))
    version: int = Field(sa_column=Column(Integer, nullable=False, server_default=text("1")))
    created_at: datetime = _ts()
    updated_at: datetime = _ts()
    attempts: int = Field(sa_column=Column(Integer, nullable=False, server_default=text("0")))
    failing_since: datetime | None = _ts(nullable=True)
    next_attempt_at: datetime | None = _ts(nullable=True)


class SubscriptionOutbox(SQLModel, table=True):
    """A notification owed to a subscription: written in the transaction of the study change
    that causes it (locator.core.outbox), deleted once delivered (locator.notify)."""

    __tablename__ = "subscription_outbox"
    # AUTOINCREMENT on SQLite: an id is never reused (it is the notification id receivers
    # drop repeats by), even once every row has been delivered and deleted.
    __table_args__ = (
        Index("ix_subscription_outbox_subscription_id_id", "subscription_id", "id"),
        {"sqlite_autoincrement": True},
    )
    id: int | None = Field(
        default=None,
        sa_column=Column(
            BigInteger().with_variant(Integer, "sqlite"), primary_key=True, autoincrement=True
        ),
    )
    subscription_id: str = Field(
        sa_column=Column(
            String(32), ForeignKey("subscription.id", ondelete="CASCADE"), nullable=False
        )
    )
    study_id: str = Field(sa_column=Column(String(32), nullable=False))
    created_at: datetime = _ts()


class ServiceLease(SQLModel, table=True):
    """A job that one process of the deployment runs at a time (the subscription deliverer):
    who holds it and until when."""

    __tablename__ = "service_lease"
    name: str = Field(sa_column=Column(String(64), primary_key=True))
    holder: str = Field(sa_column=Column(String(200), nullable=False))
    expires_at: datetime = _ts()


def _table(model: type[SQLModel]) -> Table:
    table: Table = model.__table__  # type: ignore[attr-defined]
    return table


# Core tables for the hot paths (typed for mypy; SQLModel's class attributes are not).
trust_table = _table(Trust)
trust_alias_table = _table(TrustAlias)
study_table = _table(Study)
study_key_table = _table(StudyKey)
patient_assertion_table = _table(PatientAssertion)
local_link_table = _table(LocalLink)
journal_table = _table(JournalEntry)
mpps_step_table = _table(MppsStep)
audit_table = _table(AuditRecord)
service_setting_table = _table(ServiceSetting)
subscription_table = _table(Subscription)
subscription_outbox_table = _table(SubscriptionOutbox)
service_lease_table = _table(ServiceLease)
