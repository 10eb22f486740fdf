"""Read queries for the API: SQLAlchemy Core selects returning plain rows.

The hot path (a patient's studies, newest first) is one index range scan on
(nhs_number, sort_time, id), or (nhs_number, updated_at, id) for `_sort=_lastUpdated`; the
page after a cursor continues with a row-value comparison on the same index (keyset paging),
so inserts between pages neither skip nor repeat rows. Only studies linked to an NHS Number
are ever returned: held (local id only) and quarantined studies have nhs_number NULL,
merged-away rows have merged_into set, entered-in-error ones appear only when asked by status.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    ColumnElement,
    Connection,
    DateTime,
    Select,
    and_,
    bindparam,
    false,
    func,
    literal,
    or_,
    select,
    tuple_,
    type_coerce,
)

from locator.api.paging import Position
from locator.api.search import DateBound, DatePrefix, SearchQuery, SortOrder, StudyIdentifier
from locator.store.models import UTCDateTime, study_key_table, study_table
from locator.trusts import TrustRegistry

STUDY = study_table
KEY = study_key_table
LINKED = "linked"
ENTERED_IN_ERROR = "entered-in-error"
KIND_UID = "uid"
KIND_ACCESSION = "acc"
# A result row (SQLAlchemy Row with the STUDY_COLUMNS as attributes).
StudyRow = Any


def _plain_time(column: Any) -> Any:
    """A timestamp column read without the UTCDateTime decorator's per-value Python call:
    the driver's own value (SQLite: naive, in UTC; PostgreSQL: aware). render.instant and
    sort_value() make both UTC-aware where it matters."""
    return type_coerce(column, DateTime(timezone=True)).label(column.name)


# The columns the renderer needs, in one place (no ORM objects on the hot path); their
# order is relied on: render.imaging_study unpacks a row positionally.
STUDY_COLUMNS = (
    STUDY.c.id,
    STUDY.c.trust_ods,
    STUDY.c.study_uid,
    STUDY.c.accession,
    STUDY.c.nhs_number,
    STUDY.c.patient_state,
    STUDY.c.status,
    STUDY.c.report_status,
    _plain_time(STUDY.c.started),
    _plain_time(STUDY.c.sort_time),
    STUDY.c.modalities,
    STUDY.c.procedures,
    STUDY.c.series,
    STUDY.c.number_of_series,
    STUDY.c.number_of_instances,
    _plain_time(STUDY.c.updated_at),
    STUDY.c.version,
)


def _visible(statuses: frozenset[str] | None) -> list[ColumnElement[bool]]:
    """Linked to an NHS Number, not merged away; entered-in-error only when asked."""
    conditions: list[ColumnElement[bool]] = [
        STUDY.c.nhs_number.is_not(None),
        STUDY.c.merged_into.is_(None),
    ]
    if statuses is None:
        conditions += [STUDY.c.patient_state == LINKED, STUDY.c.status != ENTERED_IN_ERROR]
        return conditions
    plain = statuses - {ENTERED_IN_ERROR}
    wanted: list[ColumnElement[bool]] = []
    if plain:
        wanted.append(and_(STUDY.c.patient_state == LINKED, STUDY.c.status.in_(sorted(plain))))
    if ENTERED_IN_ERROR in statuses:
        wanted.append(
            or_(
                STUDY.c.patient_state == ENTERED_IN_ERROR,
                and_(STUDY.c.patient_state == LINKED, STUDY.c.status == ENTERED_IN_ERROR),
            )
        )
    conditions.append(or_(*wanted) if wanted else false())
    return conditions


def _date_condition(column: ColumnElement[Any], bound: DateBound) -> ColumnElement[bool]:
    """R4 §3.1.1.4.2 for a point-in-time value against the search value's range."""
    low, high = bound.low, bound.high
    match bound.prefix:
        case DatePrefix.EQ:
            return and_(column >= low, column < high)
        case DatePrefix.NE:
            return or_(column < low, column >= high)
        case DatePrefix.GT:
            return column >= high
        case DatePrefix.GE:
            return column >= low
        case DatePrefix.LT:
            return column < low
        case DatePrefix.LE:
            return column < high
    raise AssertionError(bound.prefix)


def _identifier_condition(
    group: Sequence[StudyIdentifier], registry: TrustRegistry
) -> ColumnElement[bool]:
    """OR over one identifier parameter's values, through the study_key table."""
    alternatives: list[ColumnElement[bool]] = []
    kinds: tuple[str, ...]
    every_trust = sorted(t.ods_code for t in registry)
    for ident in group:
        if ident.kind == "uid":
            kinds, trusts = (KIND_UID,), every_trust
        elif ident.kind == "acc":
            kinds = (KIND_ACCESSION,)
            trusts = sorted(t.ods_code for t in registry if t.accession_system == ident.system)
        elif ident.kind == "typed-acc":
            kinds, trusts = (KIND_ACCESSION,), every_trust
        elif ident.kind == "any":
            kinds, trusts = (KIND_UID, KIND_ACCESSION), every_trust
        else:
            continue  # `|value`: our identifiers always carry a system
        value = ident.value
        # The key's primary key leads with trust_ods: naming the trusts keeps it an index seek.
        keys = select(KEY.c.study_id).where(
            KEY.c.trust_ods.in_(trusts), KEY.c.kind.in_(kinds), KEY.c.value == value
        )
        alternatives.append(STUDY.c.id.in_(keys))
    return or_(*alternatives) if alternatives else false()


def _modality_condition(codes: frozenset[str]) -> ColumnElement[bool]:
    # modalities is "CT,MR": match a whole code between commas.
    padded = literal(",") + STUDY.c.modalities + literal(",")
    return or_(*(padded.like(f"%,{c},%") for c in sorted(codes))) if codes else false()


def filter_conditions(query: SearchQuery, registry: TrustRegistry) -> list[ColumnElement[bool]]:
    conditions = _visible(query.statuses)
    if query.nhs_number is not None:
        conditions.append(STUDY.c.nhs_number == query.nhs_number)
    if query.ids is not None:
        conditions.append(STUDY.c.id.in_(sorted(query.ids)))
    conditions += [_identifier_condition(g, registry) for g in query.identifiers]
    conditions += [_date_condition(STUDY.c.started, b) for b in query.started]
    conditions += [_date_condition(STUDY.c.updated_at, b) for b in query.last_updated]
    conditions += [_modality_condition(codes) for codes in query.modalities]
    conditions += [STUDY.c.trust_ods.in_(sorted(o)) if o else false() for o in query.organizations]
    return conditions


def sort_column(query: SearchQuery) -> Any:
    return STUDY.c.updated_at if query.sort.by_updated else STUDY.c.sort_time


def sort_value(query: SearchQuery, row: StudyRow) -> datetime:
    value: datetime = row.updated_at if query.sort.by_updated else row.sort_time
    return value if value.tzinfo is not None else value.replace(tzinfo=UTC)


def _keyset_after(query: SearchQuery, time_value: Any, id_value: Any) -> ColumnElement[bool]:
    keyset = tuple_(sort_column(query), STUDY.c.id)
    here = tuple_(time_value, id_value)
    return keyset < here if query.sort.descending else keyset > here


def _ordered(query: SearchQuery, stmt: Select[Any]) -> Select[Any]:
    column = sort_column(query)
    if query.sort.descending:
        return stmt.order_by(column.desc(), STUDY.c.id.desc())
    return stmt.order_by(column.asc(), STUDY.c.id.asc())


def is_plain_patient_search(query: SearchQuery) -> bool:
    """The hot path: one patient, default visibility, no filters besides the sort."""
    return (
        query.nhs_number is not None
        and query.ids is None
        and not (query.identifiers or query.started or query.last_updated)
        and not (query.modalities or query.organizations)
        and query.statuses is None
    )


@functools.cache
def _patient_statement(sort: SortOrder, after: bool) -> Select[Any]:
    """Built once per (sort, first page or not): only parameters change per request, so the
    compiled form is reused and nothing is rebuilt on the hot path."""
    query = SearchQuery(nhs_number="", sort=sort)
    conditions = [*_visible(None), STUDY.c.nhs_number == bindparam("nhs")]
    if after:
        conditions.append(
            _keyset_after(
                query, bindparam("after_time", type_=UTCDateTime()), bindparam("after_id")
            )
        )
    stmt = select(*STUDY_COLUMNS).where(*conditions)
    return _ordered(query, stmt).limit(bindparam("limit"))


def search_studies(
    conn: Connection,
    *,
    query: SearchQuery,
    registry: TrustRegistry,
    position: Position | None,
    limit: int,
) -> Sequence[StudyRow]:
    """One page of matching studies in the query's order (ask for count + 1 to see more)."""
    params: dict[str, Any] = {"limit": limit}
    if position is not None:
        params["after_time"] = datetime.fromisoformat(position.sort_value)
        params["after_id"] = position.study_id
    if is_plain_patient_search(query):
        params["nhs"] = query.nhs_number
        return conn.execute(_patient_statement(query.sort, position is not None), params).all()
    conditions = filter_conditions(query, registry)
    if position is not None:
        conditions.append(
            _keyset_after(
                query, bindparam("after_time", type_=UTCDateTime()), bindparam("after_id")
            )
        )
    stmt = _ordered(query, select(*STUDY_COLUMNS).where(*conditions)).limit(bindparam("limit"))
    return conn.execute(stmt, params).all()


def count_studies(conn: Connection, *, query: SearchQuery, registry: TrustRegistry) -> int:
    stmt = select(func.count()).select_from(STUDY).where(*filter_conditions(query, registry))
    return int(conn.execute(stmt).scalar_one())


def read_study(conn: Connection, study_id: str) -> StudyRow | None:
    """A study row by id, whatever its state (the caller decides what may be shown)."""
    stmt = select(*STUDY_COLUMNS, STUDY.c.merged_into).where(STUDY.c.id == study_id)
    return conn.execute(stmt).first()


def survivor_of(conn: Connection, study_id: str, *, max_hops: int = 16) -> str | None:
    """Follow merged_into to the surviving study id (merges can chain)."""
    current, seen = study_id, 0
    while seen < max_hops:
        nxt = conn.execute(select(STUDY.c.merged_into).where(STUDY.c.id == current)).scalar()
        if nxt is None:
            return current if current != study_id else None
        current, seen = nxt, seen + 1
    return current


def is_visible_row(row: StudyRow) -> bool:
    """Whether a study read by id may be shown (linked, or entered-in-error with its number)."""
    return row.nhs_number is not None and row.patient_state in (LINKED, ENTERED_IN_ERROR)


def count_quarantined(conn: Connection) -> int:
    stmt = (
        select(func.count())
        .select_from(STUDY)
        .where(STUDY.c.patient_state == "quarantined", STUDY.c.merged_into.is_(None))
    )
    return int(conn.execute(stmt).scalar_one())
