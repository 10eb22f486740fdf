"""The CapabilityStatement (`GET /fhir/metadata`), generated from what the server does.

Search parameters come from the same registry the parser dispatches on
(`search.IMAGING_STUDY_PARAMETERS`), so the statement cannot claim a parameter the parser
does not take or omit one it does. The security section and the AuditEvent entry come from
the security work (smart.security_component, audit_routes.capability_resource).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from locator import __version__
from locator.api.audit_routes import capability_resource as audit_capability
from locator.api.conformance import CONFORMANCE_DATE, ORGANIZATION_SEARCH_PARAMETER
from locator.api.search import IMAGING_STUDY_PARAMETERS, ParamDef
from locator.api.smart import security_component
from locator.config import Settings

FHIR_VERSION = "4.0.1"
READ_ONLY = [{"code": "read"}, {"code": "search-type"}]


def search_params(params: Sequence[ParamDef]) -> list[dict[str, Any]]:
    declared = []
    for p in params:
        item: dict[str, Any] = {"name": p.name, "type": p.type, "documentation": p.documentation}
        if p.definition:
            item["definition"] = p.definition
        declared.append(item)
    return declared


def security_section(settings: Settings) -> dict[str, Any]:
    """rest.security: the security work's component (SMART on FHIR when a JWKS is set)."""
    return security_component(settings)


def _resource(rtype: str, profile: str | None = None, **extra: Any) -> dict[str, Any]:
    res: dict[str, Any] = {"type": rtype}
    if profile:
        res["profile"] = profile
    res["interaction"] = READ_ONLY
    res.update(extra)
    return res


def capability_statement(
    settings: Settings, *, base: str, extra_resources: Sequence[dict[str, Any]] = ()
) -> dict[str, Any]:
    imaging = _resource(
        "ImagingStudy",
        "http://hl7.org/fhir/StructureDefinition/ImagingStudy",
        versioning="versioned",
        readHistory=False,
        searchInclude=["ImagingStudy:endpoint"],
        searchParam=search_params(IMAGING_STUDY_PARAMETERS),
    )
    resources = [
        imaging,
        _resource("Endpoint", searchParam=[{"name": "organization", "type": "reference"}]),
        _resource("Organization", searchParam=[{"name": "identifier", "type": "token"}]),
        _resource("SearchParameter"),
        _resource("StructureDefinition"),
        audit_capability(),
        _resource(
            "Subscription",
            "http://hl7.org/fhir/StructureDefinition/Subscription",
            interaction=[
                {"code": code} for code in ("read", "search-type", "create", "update", "delete")
            ],
            searchParam=[{"name": "status", "type": "token"}],
            documentation=(
                "rest-hook; criteria ImagingStudy?patient.identifier="
                "https://fhir.nhs.uk/Id/nhs-number|<NHS Number> only; each delivery carries "
                "X-Locator-Notification-Id"
            ),
        ),
        *extra_resources,
    ]
    return {
        "resourceType": "CapabilityStatement",
        "id": "locator",
        "url": f"{base}/metadata",
        "version": __version__,
        "name": "LocatorCapabilityStatement",
        "title": "The locator: which NHS trust holds which imaging studies",
        "status": "active",
        "date": CONFORMANCE_DATE,
        "publisher": "The locator",
        "kind": "instance",
        "software": {"name": "locator", "version": __version__},
        "implementation": {"description": "Imaging study locator (FHIR R4)", "url": base},
        "fhirVersion": FHIR_VERSION,
        "format": ["application/fhir+json", "json"],
        "rest": [
            {
                "mode": "server",
                "documentation": (
                    "Read-only, but for Subscription. A search must name a patient (NHS "
                    "Number), an _id or a fully qualified identifier. Custom search parameter: "
                    f"{ORGANIZATION_SEARCH_PARAMETER['url']}."
                ),
                "security": security_section(settings),
                "resource": resources,
            }
        ],
    }
