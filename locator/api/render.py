"""FHIR R4 JSON from plain rows and the trust registry: dicts in, orjson bytes out.

No fhir.resources here (the tests prove the shapes with its R4B models). The shape follows
the IHE MADO manifest where it can (Study UID `urn:dicom:uid` / `urn:oid:`, accession typed
ACSN with the trust as assigner, a web viewer Endpoint and a WADO-RS Endpoint) and departs
where the index knows less: report-only studies may have no Study UID and no series.

- "View it": an Endpoint contained in the study (`ihe-iid`, `text/html`, address = the
  trust's viewer template filled for this study).
- "Source it": the trust's one DICOMweb Endpoint, `Endpoint/<ODS>-dicomweb`
  (`dicom-wado-rs`, address = the DICOMweb base URL; a client appends /studies/{uid}).
- Both name the trust's `Organization/<ODS>` (ODS identifier) as managingOrganization.
"""

from __future__ import annotations

import string
import urllib.parse
import uuid
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

import orjson

from locator.api.search import (
    ACSN,
    DCM_SYSTEM,
    DICOM_UID_SYSTEM,
    ODS_SYSTEM,
    OID_PREFIX,
    V2_0203,
)
from locator.core.nhs_number import NHS_NUMBER_SYSTEM
from locator.trusts import TrustConfig

REPORT_STATUS_URL = "https://locator.example/fhir/StructureDefinition/report-status"
CONNECTION_TYPE_SYSTEM = "http://terminology.hl7.org/CodeSystem/endpoint-connection-type"
PAYLOAD_TYPE_SYSTEM = "http://terminology.hl7.org/CodeSystem/endpoint-payload-type"
IHE_IID = "ihe-iid"
DICOM_WADO_RS = "dicom-wado-rs"
DCM_STUDY = "113014"
VIEWER_ENDPOINT_ID = "viewer"
DICOMWEB_SUFFIX = "-dicomweb"
ENTERED_IN_ERROR = "entered-in-error"
UNKNOWN_MODALITY = "OT"  # DICOM "Other": R4 series.modality is 1..1

OPTS = orjson.OPT_UTC_Z


def dumps(data: Any) -> bytes:
    return orjson.dumps(data, option=OPTS)


def instant(value: datetime) -> str:
    """FHIR instant/dateTime text (UTC, `Z`); a naive value is already UTC (SQLite)."""
    text = value.isoformat()
    if value.tzinfo is None:
        return text + "Z"
    if text.endswith("+00:00"):
        return text[:-6] + "Z"
    return value.astimezone(UTC).isoformat().replace("+00:00", "Z")


def dicomweb_endpoint_id(ods: str) -> str:
    return ods + DICOMWEB_SUFFIX


def organization_ref(trust: TrustConfig) -> dict[str, Any]:
    return {
        "reference": f"Organization/{trust.ods_code}",
        "identifier": {"system": ODS_SYSTEM, "value": trust.ods_code},
        "display": trust.name,
    }


def organization(trust: TrustConfig) -> dict[str, Any]:
    return {
        "resourceType": "Organization",
        "id": trust.ods_code,
        "identifier": [{"system": ODS_SYSTEM, "value": trust.ods_code}],
        "active": True,
        "name": trust.name,
        "endpoint": [{"reference": f"Endpoint/{dicomweb_endpoint_id(trust.ods_code)}"}],
    }


def dicomweb_endpoint(trust: TrustConfig) -> dict[str, Any]:
    return {
        "resourceType": "Endpoint",
        "id": dicomweb_endpoint_id(trust.ods_code),
        "status": "active",
        "connectionType": {"system": CONNECTION_TYPE_SYSTEM, "code": DICOM_WADO_RS},
        "name": f"{trust.name}: DICOMweb (WADO-RS)",
        "managingOrganization": organization_ref(trust),
        "payloadType": [
            {
                "coding": [{"system": DCM_SYSTEM, "code": DCM_STUDY, "display": "Study"}],
                "text": "DICOM WADO-RS",
            }
        ],
        "payloadMimeType": ["application/dicom"],
        "address": trust.dicomweb_url,
    }


def viewer_endpoint(trust: TrustConfig, address: str) -> dict[str, Any]:
    return {
        "resourceType": "Endpoint",
        "id": VIEWER_ENDPOINT_ID,
        "status": "active",
        "connectionType": {"system": CONNECTION_TYPE_SYSTEM, "code": IHE_IID},
        "name": f"{trust.name}: web viewer",
        "managingOrganization": organization_ref(trust),
        "payloadType": [
            {
                "coding": [{"system": PAYLOAD_TYPE_SYSTEM, "code": "none"}],
                "text": "Web viewer (IHE Invoke Image Display)",
            }
        ],
        "payloadMimeType": ["text/html"],
        "address": address,
    }


class ViewerTemplate:
    """A trust's viewer URL template, parsed once; filled exactly as TrustConfig.viewer_link
    fills it (URL-encoded values; None when a placeholder has no value)."""

    __slots__ = ("parts",)

    def __init__(self, template: str) -> None:
        self.parts = [(literal, name) for literal, name, _, _ in string.Formatter().parse(template)]

    def fill(self, values: dict[str, str | None]) -> str | None:
        out = []
        for literal, name in self.parts:
            out.append(literal)
            if name is not None:
                value = values.get(name)
                if not value:
                    return None
                out.append(urllib.parse.quote(value, safe=""))
        return "".join(out)


class TrustParts:
    """The per-trust pieces of every study's resource, built once per trust."""

    __slots__ = (
        "acc_type",
        "by_accession",
        "by_uid",
        "dicomweb_ref",
        "org_ref",
        "trust",
        "viewer_static",
    )

    def __init__(self, trust: TrustConfig) -> None:
        self.trust = trust
        self.org_ref = organization_ref(trust)
        self.dicomweb_ref = {"reference": f"Endpoint/{dicomweb_endpoint_id(trust.ods_code)}"}
        self.viewer_static = viewer_endpoint(trust, "")
        self.by_uid = ViewerTemplate(trust.viewer_url)
        self.by_accession = (
            ViewerTemplate(trust.viewer_url_by_accession) if trust.viewer_url_by_accession else None
        )
        self.acc_type = {"coding": [{"system": V2_0203, "code": ACSN}]}

    def viewer_link(self, study_uid: str | None, accession: str | None) -> str | None:
        template = self.by_uid if study_uid else self.by_accession
        if template is None:
            return None
        return template.fill({"study_uid": study_uid, "accession": accession})


_PARTS: dict[str, TrustParts] = {}


def trust_parts(trust: TrustConfig) -> TrustParts:
    parts = _PARTS.get(trust.ods_code)
    if parts is None or parts.trust is not trust:
        parts = _PARTS[trust.ods_code] = TrustParts(trust)
    return parts


def _series(raw: str) -> list[dict[str, Any]]:
    items: list[dict[str, Any]] = []
    for s in orjson.loads(raw):
        item: dict[str, Any] = {
            "uid": s["uid"],
            "modality": {"system": DCM_SYSTEM, "code": s.get("modality") or UNKNOWN_MODALITY},
        }
        if s.get("number_of_instances") is not None:
            item["numberOfInstances"] = s["number_of_instances"]
        items.append(item)
    return items


def _procedures(raw: str) -> list[dict[str, Any]]:
    """Procedure codes, stored as [system, code, display] (or {system, code, display})."""
    concepts = []
    for p in orjson.loads(raw):
        system, code, display = (
            (p.get("system"), p.get("code"), p.get("display"))
            if isinstance(p, dict)
            else [*p, None, None, None][:3]
        )
        coding = {k: v for k, v in (("system", system), ("code", code), ("display", display)) if v}
        if coding.get("code"):
            concepts.append({"coding": [coding]})
    return concepts


def study_status(row: Any) -> str:
    return "entered-in-error" if row.patient_state == "entered-in-error" else str(row.status)


def imaging_study(row: Any, trust: TrustConfig) -> dict[str, Any]:
    """One ImagingStudy from a study row (see the module docstring for the shape)."""
    (
        sid,
        _ods,
        uid,
        accession,
        nhs,
        state,
        status,
        report,
        started,
        _sort,
        modalities,
        procedures,
        series,
        n_series,
        n_instances,
        updated,
        version,
    ) = tuple(row)[:17]
    parts = trust_parts(trust)
    res: dict[str, Any] = {
        "resourceType": "ImagingStudy",
        "id": sid,
        "meta": {"versionId": str(version), "lastUpdated": instant(updated)},
    }
    endpoints = []
    link = parts.viewer_link(uid, accession)
    if link:
        res["contained"] = [{**parts.viewer_static, "address": link}]
        endpoints.append({"reference": "#" + VIEWER_ENDPOINT_ID})
    if report:
        res["extension"] = [{"url": REPORT_STATUS_URL, "valueCode": report}]
    identifiers = []
    if uid:
        identifiers.append({"system": DICOM_UID_SYSTEM, "value": OID_PREFIX + uid})
    if accession:
        identifiers.append(
            {
                "type": parts.acc_type,
                "system": trust.accession_system,
                "value": accession,
                "assigner": parts.org_ref,
            }
        )
    if identifiers:
        res["identifier"] = identifiers
    res["status"] = ENTERED_IN_ERROR if state == ENTERED_IN_ERROR else status
    if modalities:
        res["modality"] = [{"system": DCM_SYSTEM, "code": m} for m in modalities.split(",")]
    res["subject"] = {"type": "Patient", "identifier": {"system": NHS_NUMBER_SYSTEM, "value": nhs}}
    if started is not None:
        res["started"] = instant(started)
    endpoints.append(parts.dicomweb_ref)
    res["endpoint"] = endpoints
    if n_series is not None:
        res["numberOfSeries"] = n_series
    if n_instances is not None:
        res["numberOfInstances"] = n_instances
    procedure_codes = _procedures(procedures) if procedures and procedures != "[]" else None
    if procedure_codes:
        res["procedureCode"] = procedure_codes
    series_items = _series(series) if series and series != "[]" else None
    if series_items:
        res["series"] = series_items
    return res


def entry(base: str, resource: dict[str, Any], mode: str) -> dict[str, Any]:
    return {
        "fullUrl": f"{base}/{resource['resourceType']}/{resource['id']}",
        "resource": resource,
        "search": {"mode": mode},
    }


def outcome_entry(resource: dict[str, Any]) -> dict[str, Any]:
    return {
        "fullUrl": f"urn:uuid:{uuid.uuid4()}",
        "resource": resource,
        "search": {"mode": "outcome"},
    }


def bundle(
    *,
    entries: Sequence[dict[str, Any]],
    links: Sequence[tuple[str, str]],
    total: int | None,
    now: datetime,
) -> dict[str, Any]:
    result: dict[str, Any] = {
        "resourceType": "Bundle",
        "id": str(uuid.uuid4()),
        "meta": {"lastUpdated": instant(now)},
        "type": "searchset",
    }
    if total is not None:
        result["total"] = total
    result["link"] = [{"relation": rel, "url": url} for rel, url in links]
    if entries:
        result["entry"] = list(entries)
    return result
