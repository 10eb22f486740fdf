"""The trust registry: which trust owns which feed identities, and its "view it" and
"source it" addresses. Read from the TOML of interface.md, stored in the database.
"""

from __future__ import annotations

import ipaddress
import json
import string
import tomllib
import urllib.parse
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Literal
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from sqlalchemy import delete, select
from sqlalchemy.orm import Session

from locator.store.models import Trust, TrustAlias, trust_alias_table, trust_table, utcnow

Network = ipaddress.IPv4Network | ipaddress.IPv6Network
AliasKind = Literal["facility", "ae_title", "tls_name"]

VIEWER_PLACEHOLDERS = frozenset({"study_uid", "accession", "patient_id"})
ACCESSION_FIELDS = ("OBR-18", "OBR-3")
_REQUIRED = ("ods_code", "name", "viewer_url", "dicomweb_url")
_KNOWN_KEYS = frozenset(
    {
        *_REQUIRED,
        "hl7_sending_facilities",
        "dicom_ae_titles",
        "viewer_url_by_accession",
        "accession_system",
        "accession_field",
        "timezone",
        "mllp_port",
        "tls_client_names",
        "source_addresses",
    }
)


class TrustFileError(ValueError):
    """A trusts file (or a stored registry) that cannot be used, with the reason."""


@dataclass(frozen=True, slots=True)
class TrustConfig:
    ods_code: str
    name: str
    viewer_url: str
    dicomweb_url: str
    hl7_sending_facilities: tuple[str, ...] = ()
    dicom_ae_titles: tuple[str, ...] = ()
    viewer_url_by_accession: str | None = None
    accession_system: str = ""
    accession_field: str = "OBR-18"
    timezone: str = "Europe/London"
    mllp_port: int | None = None
    tls_client_names: tuple[str, ...] = ()
    source_addresses: tuple[str, ...] = field(default=())

    @property
    def networks(self) -> tuple[Network, ...]:
        return tuple(ipaddress.ip_network(a, strict=False) for a in self.source_addresses)

    @property
    def zone(self) -> ZoneInfo:
        return ZoneInfo(self.timezone)

    def allows_address(self, address: str) -> bool:
        """True when no address list is set, or the address is inside it."""
        if not self.source_addresses:
            return True
        try:
            ip = ipaddress.ip_address(address)
        except ValueError:
            return False
        return any(ip in net for net in self.networks)

    def viewer_link(
        self, *, study_uid: str | None, accession: str | None, patient_id: str | None = None
    ) -> str | None:
        """The "view it" address for one study, or None when the template cannot be filled."""
        template = self.viewer_url if study_uid else self.viewer_url_by_accession
        if template is None:
            return None
        values = {"study_uid": study_uid, "accession": accession, "patient_id": patient_id}
        needed = _placeholders(template)
        if any(not values[name] for name in needed):
            return None
        return template.format_map(
            {name: urllib.parse.quote(values[name] or "", safe="") for name in needed}
        )

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> TrustConfig:
        data = json.loads(text)
        for key in (
            "hl7_sending_facilities",
            "dicom_ae_titles",
            "tls_client_names",
            "source_addresses",
        ):
            data[key] = tuple(data.get(key) or ())
        return cls(**data)


def _placeholders(template: str) -> set[str]:
    return {name for _, name, _, _ in string.Formatter().parse(template) if name is not None}


def _str_list(raw: dict[str, Any], key: str, where: str) -> tuple[str, ...]:
    value = raw.get(key, [])
    if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
        raise TrustFileError(f"{where}: {key} must be a list of non-empty strings")
    return tuple(value)


def _check_template(template: str, key: str, where: str) -> None:
    try:
        names = _placeholders(template)
    except ValueError as exc:
        raise TrustFileError(f"{where}: {key} is not a valid template ({exc})") from exc
    unknown = names - VIEWER_PLACEHOLDERS
    if unknown:
        raise TrustFileError(
            f"{where}: {key} has unknown placeholder(s) {', '.join(sorted(unknown))}; "
            f"allowed: {', '.join(sorted(VIEWER_PLACEHOLDERS))}"
        )


def parse_trust(raw: dict[str, Any], where: str) -> TrustConfig:
    missing = [key for key in _REQUIRED if not isinstance(raw.get(key), str) or not raw[key]]
    if missing:
        raise TrustFileError(f"{where}: missing or empty {', '.join(missing)}")
    ods = raw["ods_code"]
    where = f"{where} ({ods})"
    unknown = set(raw) - _KNOWN_KEYS
    if unknown:
        raise TrustFileError(f"{where}: unknown key(s) {', '.join(sorted(unknown))}")
    _check_template(raw["viewer_url"], "viewer_url", where)
    if "viewer_url_by_accession" in raw:
        _check_template(raw["viewer_url_by_accession"], "viewer_url_by_accession", where)
    accession_field = raw.get("accession_field", "OBR-18")
    if accession_field not in ACCESSION_FIELDS:
        raise TrustFileError(f"{where}: accession_field must be one of {ACCESSION_FIELDS}")
    timezone = raw.get("timezone", "Europe/London")
    try:
        ZoneInfo(timezone)
    except (ZoneInfoNotFoundError, ValueError) as exc:
        raise TrustFileError(f"{where}: unknown timezone {timezone!r}") from exc
    mllp_port = raw.get("mllp_port")
    if mllp_port is not None and (not isinstance(mllp_port, int) or not 0 <= mllp_port < 65536):
        raise TrustFileError(f"{where}: mllp_port must be a port number (0 picks a free one)")
    addresses = _str_list(raw, "source_addresses", where)
    for address in addresses:
        try:
            ipaddress.ip_network(address, strict=False)
        except ValueError as exc:
            raise TrustFileError(f"{where}: source_addresses: {exc}") from exc
    return TrustConfig(
        ods_code=ods,
        name=raw["name"],
        viewer_url=raw["viewer_url"],
        dicomweb_url=raw["dicomweb_url"].rstrip("/"),
        hl7_sending_facilities=_str_list(raw, "hl7_sending_facilities", where),
        dicom_ae_titles=_str_list(raw, "dicom_ae_titles", where),
        viewer_url_by_accession=raw.get("viewer_url_by_accession"),
        accession_system=raw.get("accession_system") or f"urn:locator:accession:{ods}",
        accession_field=accession_field,
        timezone=timezone,
        mllp_port=mllp_port,
        tls_client_names=_str_list(raw, "tls_client_names", where),
        source_addresses=addresses,
    )


def _aliases(trust: TrustConfig) -> Iterable[tuple[AliasKind, str]]:
    yield from (("facility", f) for f in trust.hl7_sending_facilities)
    yield from (("ae_title", a) for a in trust.dicom_ae_titles)
    yield from (("tls_name", n) for n in trust.tls_client_names)


_ALIAS_LABEL = {"facility": "sending facility", "ae_title": "AE title", "tls_name": "TLS name"}


def check_unique(trusts: Sequence[TrustConfig]) -> None:
    """A facility, AE title or TLS name belongs to one trust only; name both on a clash."""
    owner: dict[tuple[str, str], str] = {}
    seen_ods: set[str] = set()
    for trust in trusts:
        if trust.ods_code in seen_ods:
            raise TrustFileError(f"trust {trust.ods_code} is defined twice")
        seen_ods.add(trust.ods_code)
        for alias in _aliases(trust):
            other = owner.setdefault(alias, trust.ods_code)
            if other != trust.ods_code:
                raise TrustFileError(
                    f"{_ALIAS_LABEL[alias[0]]} {alias[1]!r} is claimed by both {other} "
                    f"and {trust.ods_code}"
                )


def parse_trusts_toml(text: str, *, source: str = "trusts file") -> list[TrustConfig]:
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise TrustFileError(f"{source}: not valid TOML: {exc}") from exc
    entries = data.get("trust")
    if not isinstance(entries, list) or not entries:
        raise TrustFileError(f"{source}: no [[trust]] tables")
    trusts = [parse_trust(raw, f"{source}: trust #{i + 1}") for i, raw in enumerate(entries)]
    check_unique(trusts)
    return trusts


def load_trusts_file(path: Path) -> list[TrustConfig]:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise TrustFileError(f"cannot read trusts file {path}: {exc.strerror}") from exc
    return parse_trusts_toml(text, source=str(path))


def example_trusts() -> list[TrustConfig]:
    text = resources.files("locator").joinpath("example_trusts.toml").read_text("utf-8")
    return parse_trusts_toml(text, source="example trusts")


def store_trusts(session: Session, *, trusts: Sequence[TrustConfig]) -> None:
    """Insert or update trusts; other stored trusts stay. Clashes with them are refused."""
    stored = {t.ods_code: t for t in read_trusts(session)}
    stored.update({t.ods_code: t for t in trusts})
    check_unique(list(stored.values()))
    now = utcnow()
    for trust in trusts:
        row = session.get(Trust, trust.ods_code)
        if row is None:
            session.add(
                Trust(
                    ods_code=trust.ods_code, name=trust.name, config=trust.to_json(), updated_at=now
                )
            )
        else:
            row.name, row.config, row.updated_at = trust.name, trust.to_json(), now
        session.flush()
        session.execute(
            delete(trust_alias_table).where(trust_alias_table.c.ods_code == trust.ods_code)
        )
        for kind, value in _aliases(trust):
            session.add(TrustAlias(kind=kind, value=value, ods_code=trust.ods_code))
    session.flush()


def read_trusts(session: Session) -> list[TrustConfig]:
    stmt = select(trust_table.c.config).order_by(trust_table.c.ods_code)
    rows = session.execute(stmt).scalars()
    return [TrustConfig.from_json(text) for text in rows]


class TrustRegistry:
    """An in-memory view of the stored registry for the feeds and the API."""

    def __init__(self, trusts: Iterable[TrustConfig]) -> None:
        self.trusts: dict[str, TrustConfig] = {t.ods_code: t for t in trusts}
        self._alias: dict[tuple[str, str], TrustConfig] = {
            alias: t for t in self.trusts.values() for alias in _aliases(t)
        }

    def get(self, ods_code: str) -> TrustConfig | None:
        return self.trusts.get(ods_code)

    def by_facility(self, facility: str) -> TrustConfig | None:
        return self._alias.get(("facility", facility))

    def by_ae_title(self, ae_title: str) -> TrustConfig | None:
        return self._alias.get(("ae_title", ae_title.strip()))

    def by_tls_name(self, name: str) -> TrustConfig | None:
        return self._alias.get(("tls_name", name))

    def __iter__(self) -> Any:
        return iter(self.trusts.values())

    def __len__(self) -> int:
        return len(self.trusts)


def load_registry(session: Session) -> TrustRegistry:
    return TrustRegistry(read_trusts(session))
