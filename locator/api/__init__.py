"""The FHIR R4 API (FastAPI): app factory, auth, search parsing, paging, rendering, outcomes."""
