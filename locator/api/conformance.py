"""The locator's own conformance resources, served as readable FHIR resources.

- SearchParameter `ImagingStudy-organization`: R4 has no search parameter for the holding
  organisation, so the locator defines one (a token on the ODS code of the trust whose
  Endpoints serve the study).
- SearchParameter `ImagingStudy-modality`: the locator's `modality` matches the study's
  modalities (ImagingStudy.modality), not only series.modality as R4's does, so studies
  known only from a report are found.
- StructureDefinition `report-status`: the extension carrying the best report status seen
  for a study, valued from DiagnosticReport.status codes.
"""

from __future__ import annotations

from typing import Any

from locator.api.render import REPORT_STATUS_URL
from locator.api.search import MODALITY_SP_URL, ODS_SYSTEM, ORGANIZATION_SP_URL

PUBLISHER = "The locator"
CONFORMANCE_DATE = "2026-11-28"
DIAGNOSTIC_REPORT_STATUS_VS = "http://hl7.org/fhir/ValueSet/diagnostic-report-status|4.0.1"

ORGANIZATION_SEARCH_PARAMETER: dict[str, Any] = {
    "resourceType": "SearchParameter",
    "id": "ImagingStudy-organization",
    "url": ORGANIZATION_SP_URL,
    "version": "1",
    "name": "organization",
    "status": "active",
    "date": CONFORMANCE_DATE,
    "publisher": PUBLISHER,
    "description": (
        "The holding trust of an imaging study, by ODS organisation code "
        f"({ODS_SYSTEM}|<ODS>, system optional): the managingOrganization of the study's "
        "Endpoints."
    ),
    "code": "organization",
    "base": ["ImagingStudy"],
    "type": "token",
    "expression": "ImagingStudy.endpoint.resolve().managingOrganization.resolve().identifier",
    "xpathUsage": "normal",
}

MODALITY_SEARCH_PARAMETER: dict[str, Any] = {
    "resourceType": "SearchParameter",
    "id": "ImagingStudy-modality",
    "url": MODALITY_SP_URL,
    "version": "1",
    "name": "modality",
    "derivedFrom": "http://hl7.org/fhir/SearchParameter/ImagingStudy-modality",
    "status": "active",
    "date": CONFORMANCE_DATE,
    "publisher": PUBLISHER,
    "description": (
        "A modality of the study (DICOM CID 29 code, system "
        "http://dicom.nema.org/resources/ontology/DCM optional). Matches the study's "
        "modalities, so studies known only from a report (no series) are found."
    ),
    "code": "modality",
    "base": ["ImagingStudy"],
    "type": "token",
    "expression": "ImagingStudy.modality | ImagingStudy.series.modality",
    "xpathUsage": "normal",
}

REPORT_STATUS_EXTENSION: dict[str, Any] = {
    "resourceType": "StructureDefinition",
    "id": "report-status",
    "url": REPORT_STATUS_URL,
    "version": "1",
    "name": "ReportStatus",
    "title": "Imaging study report status",
    "status": "active",
    "date": CONFORMANCE_DATE,
    "publisher": PUBLISHER,
    "description": (
        "The best report status the locator has seen for the study, as a DiagnosticReport "
        "status code: preliminary < final < corrected. Absent when no report was seen. "
        "The report itself stays at the holding trust."
    ),
    "fhirVersion": "4.0.1",
    "kind": "complex-type",
    "abstract": False,
    "context": [{"type": "element", "expression": "ImagingStudy"}],
    "type": "Extension",
    "baseDefinition": "http://hl7.org/fhir/StructureDefinition/Extension",
    "derivation": "constraint",
    "differential": {
        "element": [
            {
                "id": "Extension",
                "path": "Extension",
                "short": "Report status of the study",
                "max": "1",
            },
            {"id": "Extension.extension", "path": "Extension.extension", "max": "0"},
            {"id": "Extension.url", "path": "Extension.url", "fixedUri": REPORT_STATUS_URL},
            {
                "id": "Extension.value[x]",
                "path": "Extension.value[x]",
                "min": 1,
                "type": [{"code": "code"}],
                "binding": {"strength": "required", "valueSet": DIAGNOSTIC_REPORT_STATUS_VS},
            },
        ]
    },
}

SEARCH_PARAMETERS: dict[str, dict[str, Any]] = {
    r["id"]: r for r in (ORGANIZATION_SEARCH_PARAMETER, MODALITY_SEARCH_PARAMETER)
}
STRUCTURE_DEFINITIONS: dict[str, dict[str, Any]] = {
    REPORT_STATUS_EXTENSION["id"]: REPORT_STATUS_EXTENSION
}
