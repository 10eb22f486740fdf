"""ImagingStudy search: a registry of parameter definitions and a pure parser.

The registry (`IMAGING_STUDY_PARAMETERS`) is the single truth for what the search accepts:
the parser dispatches on it and the CapabilityStatement is generated from it. Parsing is
pure: (key, value) pairs in, a frozen `SearchQuery` out, or an `InvalidSearchError`.

FHIR R4 search rules applied here (https://hl7.org/fhir/R4/search.html): a comma within one
value is OR, repeating a parameter is AND (§3.1.1.3); token `system|code`, `|code`, `code`
(§3.1.1.4.9); date prefixes eq ne gt lt ge le with the value's precision as an implicit
range (§3.1.1.4.2); an unknown modifier is an error; unknown parameters are ignored unless
the client sends `Prefer: handling=strict` (§3.1.1.2.2).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from enum import StrEnum
from zoneinfo import ZoneInfo

from locator.api.outcomes import InvalidSearchError, UnsupportedParameterError
from locator.core.nhs_number import NHS_NUMBER_OID, NHS_NUMBER_SYSTEM, parse_nhs_number

DICOM_UID_SYSTEM = "urn:dicom:uid"
OID_PREFIX = "urn:oid:"
ODS_SYSTEM = "https://fhir.nhs.uk/Id/ods-organization-code"
V2_0203 = "http://terminology.hl7.org/CodeSystem/v2-0203"
ACSN = "ACSN"
DCM_SYSTEM = "http://dicom.nema.org/resources/ontology/DCM"
STUDY_STATUS_SYSTEM = "http://hl7.org/fhir/imagingstudy-status"
ORGANIZATION_SP_URL = "https://locator.example/fhir/SearchParameter/ImagingStudy-organization"
MODALITY_SP_URL = "https://locator.example/fhir/SearchParameter/ImagingStudy-modality"
STUDY_STATUSES = frozenset({"registered", "available", "cancelled", "entered-in-error", "unknown"})
DEFAULT_COUNT = 20
MAX_COUNT = 100
# Date-only and zone-less search values are read in the service's local time (R4 §3.1.1.4.2).
LOCAL_ZONE = ZoneInfo("Europe/London")
_NHS_SYSTEMS = frozenset({NHS_NUMBER_SYSTEM, OID_PREFIX + NHS_NUMBER_OID})


class SortOrder(StrEnum):
    STARTED_DESC = "-started"
    STARTED_ASC = "started"
    UPDATED_DESC = "-_lastUpdated"
    UPDATED_ASC = "_lastUpdated"

    @property
    def descending(self) -> bool:
        return self.value.startswith("-")

    @property
    def by_updated(self) -> bool:
        return self.value.endswith("_lastUpdated")


class DatePrefix(StrEnum):
    EQ = "eq"
    NE = "ne"
    GT = "gt"
    LT = "lt"
    GE = "ge"
    LE = "le"


@dataclass(frozen=True, slots=True)
class DateBound:
    """One date criterion: the value's implicit range [low, high) and the prefix."""

    prefix: DatePrefix
    low: datetime
    high: datetime


@dataclass(frozen=True, slots=True)
class StudyIdentifier:
    """A Study UID (`kind="uid"`) or an accession (`kind="acc"`); `system` None = any."""

    kind: str
    value: str
    system: str | None = None


@dataclass(frozen=True, slots=True)
class SearchQuery:
    nhs_number: str | None = None
    ids: frozenset[str] | None = None
    identifiers: tuple[tuple[StudyIdentifier, ...], ...] = ()
    started: tuple[DateBound, ...] = ()
    last_updated: tuple[DateBound, ...] = ()
    modalities: tuple[frozenset[str], ...] = ()
    statuses: frozenset[str] | None = None
    organizations: tuple[frozenset[str], ...] = ()
    sort: SortOrder = SortOrder.STARTED_DESC
    count: int = DEFAULT_COUNT
    include_endpoint: bool = False
    summary_count: bool = False
    ignored: tuple[str, ...] = ()


@dataclass(slots=True)
class _Draft:
    """The mutable state while parsing; frozen into a SearchQuery at the end."""

    nhs_number: str | None = None
    ids: frozenset[str] | None = None
    identifiers: list[tuple[StudyIdentifier, ...]] = field(default_factory=list)
    started: list[DateBound] = field(default_factory=list)
    last_updated: list[DateBound] = field(default_factory=list)
    modalities: list[frozenset[str]] = field(default_factory=list)
    statuses: frozenset[str] | None = None
    organizations: list[frozenset[str]] = field(default_factory=list)
    sort: SortOrder = SortOrder.STARTED_DESC
    count: int = DEFAULT_COUNT
    include_endpoint: bool = False
    summary_count: bool = False
    ignored: list[str] = field(default_factory=list)


Handler = Callable[[_Draft, str, str, bool], None]


@dataclass(frozen=True, slots=True)
class ParamDef:
    """One supported search parameter: how it is declared and which keys it accepts."""

    name: str
    type: str
    documentation: str
    handler: Handler
    keys: tuple[str, ...]
    definition: str | None = None


# --------------------------------------------------------------------------- values


def split_or(value: str) -> list[str]:
    """Comma-separated alternatives; `\\,` is a literal comma (R4 §3.1.1.5.7)."""
    parts = re.split(r"(?<!\\),", value)
    return [p.replace("\\,", ",").strip() for p in parts if p.strip()]


def split_token(value: str) -> tuple[str | None, str]:
    """`system|code` -> (system, code); `|code` -> ("", code); `code` -> (None, code)."""
    if "|" not in value:
        return None, value
    system, code = value.split("|", 1)
    return system, code


def parse_nhs_token(value: str, key: str, accept_test: bool) -> str:
    values = split_or(value)
    if len(values) != 1:
        raise InvalidSearchError(f"{key}: a search names exactly one patient", expression=key)
    system, code = split_token(values[0])
    if system is not None and system not in _NHS_SYSTEMS:
        raise InvalidSearchError(
            f"{key}: only NHS Numbers ({NHS_NUMBER_SYSTEM}) identify a patient here",
            expression=key,
        )
    try:
        return parse_nhs_number(code, accept_test_numbers=accept_test)
    except ValueError as exc:
        reason = getattr(exc, "reason", "invalid")
        raise InvalidSearchError(
            f"{key}: not a valid NHS Number ({reason})", expression=key
        ) from exc


_DATE_RE = re.compile(
    r"^(?P<prefix>eq|ne|gt|lt|ge|le|sa|eb|ap)?"
    r"(?P<year>\d{4})(?:-(?P<month>\d{2})(?:-(?P<day>\d{2})"
    r"(?:T(?P<time>\d{2}:\d{2}(?::\d{2}(?:\.\d{1,9})?)?)(?P<tz>Z|[+-]\d{2}:\d{2})?)?)?)?$"
)


def _add_months(moment: datetime, months: int) -> datetime:
    total = moment.year * 12 + moment.month - 1 + months
    return moment.replace(year=total // 12, month=total % 12 + 1)


def _time_range(match: re.Match[str], key: str) -> tuple[datetime, datetime]:
    date_text = f"{match['year']}-{match['month']}-{match['day']}"
    time_text = match["time"]
    tz_text = match["tz"]
    moment = datetime.fromisoformat(f"{date_text}T{time_text}")
    zone = (
        LOCAL_ZONE
        if tz_text is None
        else datetime.fromisoformat(f"2000-01-01T00:00{tz_text.replace('Z', '+00:00')}").tzinfo
    )
    moment = moment.replace(tzinfo=zone)
    if "." in time_text:
        step = timedelta(microseconds=1)
    elif time_text.count(":") == 2:
        step = timedelta(seconds=1)
    else:
        step = timedelta(minutes=1)
    return moment.astimezone(UTC), (moment + step).astimezone(UTC)


def parse_date_bound(value: str, key: str) -> DateBound:
    """One date search value with its prefix and implicit range (R4 §3.1.1.4.2)."""
    match = _DATE_RE.match(value)
    if match is None:
        raise InvalidSearchError(
            f"{key}: {value!r} is not a FHIR date (YYYY, YYYY-MM, YYYY-MM-DD or a dateTime)",
            expression=key,
        )
    prefix_text = match["prefix"] or "eq"
    if prefix_text in ("sa", "eb", "ap"):
        raise InvalidSearchError(f"{key}: prefix {prefix_text} is not supported", expression=key)
    try:
        if match["time"]:
            low, high = _time_range(match, key)
        else:
            year, month, day = int(match["year"]), match["month"], match["day"]
            start = datetime(year, int(month or 1), int(day or 1), tzinfo=LOCAL_ZONE)
            end = start + timedelta(days=1) if day else _add_months(start, 1 if month else 12)
            low, high = start.astimezone(UTC), end.astimezone(UTC)
    except ValueError as exc:
        raise InvalidSearchError(f"{key}: {value!r} is not a valid date", expression=key) from exc
    return DateBound(DatePrefix(prefix_text), low, high)


# --------------------------------------------------------------------------- handlers


def _patient(draft: _Draft, key: str, value: str, accept_test: bool) -> None:
    nhs = parse_nhs_token(value, key, accept_test)
    if draft.nhs_number is not None and draft.nhs_number != nhs:
        raise InvalidSearchError(f"{key}: a search names exactly one patient", expression=key)
    draft.nhs_number = nhs


def _identifier_value(text: str, key: str) -> StudyIdentifier:
    system, value = split_token(text)
    if not value:
        raise InvalidSearchError(f"{key}: empty identifier value", expression=key)
    if system == DICOM_UID_SYSTEM:
        uid = value[len(OID_PREFIX) :] if value.startswith(OID_PREFIX) else value
        return StudyIdentifier("uid", uid, DICOM_UID_SYSTEM)
    if system is None:
        return StudyIdentifier("any", value, None)
    if system == "":
        # `|value`: an identifier without a system; ours always have one (R4 §3.1.1.4.9).
        return StudyIdentifier("none", value, "")
    return StudyIdentifier("acc", value, system)


def _identifier(draft: _Draft, key: str, value: str, accept: bool) -> None:
    if key.endswith(":of-type"):
        _identifier_of_type(draft, key, value, accept)
        return
    draft.identifiers.append(tuple(_identifier_value(v, key) for v in split_or(value)))


def _identifier_of_type(draft: _Draft, key: str, value: str, _accept: bool) -> None:
    found: list[StudyIdentifier] = []
    for item in split_or(value):
        parts = item.split("|", 2)
        if len(parts) != 3 or not parts[2]:
            raise InvalidSearchError(
                f"{key}: expected {V2_0203}|{ACSN}|<accession number>", expression=key
            )
        type_system, type_code, number = parts
        if (type_system, type_code) != (V2_0203, ACSN):
            raise InvalidSearchError(
                f"{key}: only the type {V2_0203}|{ACSN} is supported", expression=key
            )
        found.append(StudyIdentifier("typed-acc", number, None))
    draft.identifiers.append(tuple(found))


def _started(draft: _Draft, key: str, value: str, _accept: bool) -> None:
    draft.started.append(parse_date_bound(value, key))


def _last_updated(draft: _Draft, key: str, value: str, _accept: bool) -> None:
    draft.last_updated.append(parse_date_bound(value, key))


def _codes(value: str, systems: frozenset[str]) -> frozenset[str]:
    """The codes of a token OR-list whose system is absent or one of `systems`."""
    codes = set()
    for item in split_or(value):
        system, code = split_token(item)
        if system is None or system in systems:
            codes.add(code)
    return frozenset(codes)


def _modality(draft: _Draft, _key: str, value: str, _accept: bool) -> None:
    draft.modalities.append(frozenset(c.upper() for c in _codes(value, frozenset({DCM_SYSTEM}))))


def _status(draft: _Draft, key: str, value: str, _accept: bool) -> None:
    codes = _codes(value, frozenset({STUDY_STATUS_SYSTEM}))
    unknown = codes - STUDY_STATUSES
    if unknown:
        raise InvalidSearchError(
            f"{key}: unknown status {', '.join(sorted(unknown))}; "
            f"one of {', '.join(sorted(STUDY_STATUSES))}",
            expression=key,
        )
    draft.statuses = codes if draft.statuses is None else draft.statuses & codes


def _organization(draft: _Draft, _key: str, value: str, _accept: bool) -> None:
    draft.organizations.append(frozenset(c.upper() for c in _codes(value, frozenset({ODS_SYSTEM}))))


def _id(draft: _Draft, _key: str, value: str, _accept: bool) -> None:
    ids = frozenset(split_or(value))
    draft.ids = ids if draft.ids is None else draft.ids & ids


def _sort(draft: _Draft, key: str, value: str, _accept: bool) -> None:
    try:
        draft.sort = SortOrder(value.strip())
    except ValueError as exc:
        allowed = ", ".join(s.value for s in SortOrder)
        raise InvalidSearchError(f"{key}: sort by one of {allowed}", expression=key) from exc


def _count(draft: _Draft, key: str, value: str, _accept: bool) -> None:
    if not value.strip().isdigit():
        raise InvalidSearchError(f"{key}: a whole number from 0 to {MAX_COUNT}", expression=key)
    count = int(value)
    if count == 0:
        draft.summary_count = True
    draft.count = max(1, min(count, MAX_COUNT))


INCLUDE_ENDPOINT = ("ImagingStudy:endpoint", "ImagingStudy:endpoint:Endpoint")


def _include(draft: _Draft, key: str, value: str, _accept: bool) -> None:
    if value.strip() in INCLUDE_ENDPOINT:
        draft.include_endpoint = True
    else:
        draft.ignored.append(f"{key}={value}")


def _summary(draft: _Draft, key: str, value: str, _accept: bool) -> None:
    if value.strip() == "count":
        draft.summary_count = True
    elif value.strip() != "false":
        draft.ignored.append(f"{key}={value}")


def _no_reference_search(_draft: _Draft, key: str, _value: str, _accept: bool) -> None:
    raise InvalidSearchError(
        f"{key}: this server has no Patient resources; search by "
        f"patient.identifier={NHS_NUMBER_SYSTEM}|<NHS Number>",
        expression=key,
    )


IMAGING_STUDY_PARAMETERS: tuple[ParamDef, ...] = (
    ParamDef(
        "patient",
        "reference",
        "The patient, by NHS Number only: patient.identifier, patient:identifier or "
        f"subject:identifier = {NHS_NUMBER_SYSTEM}|<NHS Number> (check digit validated).",
        _patient,
        ("patient.identifier", "patient:identifier", "subject:identifier", "subject.identifier"),
        "http://hl7.org/fhir/SearchParameter/clinical-patient",
    ),
    ParamDef(
        "subject",
        "reference",
        "Only as subject:identifier with an NHS Number (see patient).",
        _no_reference_search,
        ("subject",),
        "http://hl7.org/fhir/SearchParameter/ImagingStudy-subject",
    ),
    ParamDef(
        "identifier",
        "token",
        f"Study Instance UID as {DICOM_UID_SYSTEM}|{OID_PREFIX}<uid>; accession as "
        "<the trust's accession_system>|<accession>; identifier:of-type="
        f"{V2_0203}|{ACSN}|<accession> together with a patient or organization.",
        _identifier,
        ("identifier", "identifier:of-type"),
        "http://hl7.org/fhir/SearchParameter/clinical-identifier",
    ),
    ParamDef(
        "started",
        "date",
        "When the study started; prefixes eq ne gt lt ge le; partial dates (year, "
        "year-month, date) and dateTimes. Dates without a zone are read in Europe/London.",
        _started,
        ("started",),
        "http://hl7.org/fhir/SearchParameter/ImagingStudy-started",
    ),
    ParamDef(
        "modality",
        "token",
        f"A modality of the study ({DCM_SYSTEM}, system optional), from the study's "
        "modalities rather than only its series, so report-only studies are found.",
        _modality,
        ("modality",),
        MODALITY_SP_URL,
    ),
    ParamDef(
        "status",
        "token",
        "registered | available | cancelled | entered-in-error. Entered-in-error studies "
        "are returned only when asked for here.",
        _status,
        ("status",),
        "http://hl7.org/fhir/SearchParameter/ImagingStudy-status",
    ),
    ParamDef(
        "organization",
        "token",
        f"The holding trust by ODS code ({ODS_SYSTEM}|<ODS>, system optional).",
        _organization,
        ("organization",),
        ORGANIZATION_SP_URL,
    ),
    ParamDef(
        "_id",
        "token",
        "The study's logical id.",
        _id,
        ("_id",),
        "http://hl7.org/fhir/SearchParameter/Resource-id",
    ),
    ParamDef(
        "_lastUpdated",
        "date",
        "When the study last changed (meta.lastUpdated).",
        _last_updated,
        ("_lastUpdated",),
        "http://hl7.org/fhir/SearchParameter/Resource-lastUpdated",
    ),
    ParamDef(
        "_sort",
        "special",
        "-started (default), started, _lastUpdated, -_lastUpdated; a study without a start "
        "time sorts by when the locator first heard of it.",
        _sort,
        ("_sort",),
        None,
    ),
    ParamDef(
        "_count",
        "number",
        f"Page size, default {DEFAULT_COUNT}, at most {MAX_COUNT}.",
        _count,
        ("_count",),
        None,
    ),
    ParamDef(
        "_include",
        "special",
        "ImagingStudy:endpoint (the trust's DICOMweb Endpoint).",
        _include,
        ("_include",),
        None,
    ),
    ParamDef("_summary", "special", "count: the total only.", _summary, ("_summary",), None),
)

# Parameters handled outside the parser (content negotiation and paging).
RESERVED_KEYS = frozenset({"_format", "_cursor", "_pretty"})
_BY_KEY: dict[str, ParamDef] = {k: p for p in IMAGING_STUDY_PARAMETERS for k in p.keys}
_KNOWN_NAMES = frozenset(k.split(":")[0].split(".")[0] for k in _BY_KEY)


def _unknown(draft: _Draft, key: str, strict: bool) -> None:
    base = key.split(":")[0].split(".")[0]
    if base in _KNOWN_NAMES:
        # A known parameter with a modifier or chain we do not support is an error
        # (R4 §3.1.1.2.2: servers SHALL reject unknown modifiers).
        raise InvalidSearchError(f"{key}: modifier or chain not supported", expression=key)
    if strict:
        raise UnsupportedParameterError(f"unknown search parameter {key}", expression=key)
    draft.ignored.append(key)


def parse_search(
    pairs: Iterable[tuple[str, str]], *, accept_test_numbers: bool, strict: bool = False
) -> SearchQuery:
    """Parse ImagingStudy search parameters; raise InvalidSearchError on a refusal."""
    draft = _Draft()
    for key, value in pairs:
        if key in RESERVED_KEYS or not value.strip():
            continue
        param = _BY_KEY.get(key)
        if param is None:
            _unknown(draft, key, strict)
            continue
        param.handler(draft, key, value.strip(), accept_test_numbers)
    if strict and draft.ignored:
        raise UnsupportedParameterError(f"unsupported value {draft.ignored[0]}")
    query = _freeze(draft)
    check_scope(query)
    return query


def _freeze(draft: _Draft) -> SearchQuery:
    return SearchQuery(
        nhs_number=draft.nhs_number,
        ids=draft.ids,
        identifiers=tuple(draft.identifiers),
        started=tuple(draft.started),
        last_updated=tuple(draft.last_updated),
        modalities=tuple(draft.modalities),
        statuses=draft.statuses,
        organizations=tuple(draft.organizations),
        sort=draft.sort,
        count=draft.count,
        include_endpoint=draft.include_endpoint,
        summary_count=draft.summary_count,
        ignored=tuple(draft.ignored),
    )


def _qualified(identifiers: Sequence[StudyIdentifier], has_org: bool) -> bool:
    """Every alternative names its system (or the organization scopes a bare accession)."""
    return all(
        i.kind in ("uid", "acc") or (has_org and i.kind in ("any", "typed-acc"))
        for i in identifiers
    )


def check_scope(query: SearchQuery) -> None:
    """Nobody browses the index: a search names a patient, an _id or a qualified identifier."""
    if query.nhs_number is not None or query.ids:
        return
    has_org = bool(query.organizations)
    if any(_qualified(group, has_org) for group in query.identifiers):
        return
    raise InvalidSearchError(
        "a search must name a patient (patient.identifier="
        f"{NHS_NUMBER_SYSTEM}|<NHS Number>), an _id, or a fully qualified identifier "
        f"({DICOM_UID_SYSTEM}|{OID_PREFIX}<uid> or <accession system>|<accession>; "
        f"identifier:of-type={V2_0203}|{ACSN}|<accession> needs a patient or organization)"
    )
