"""The clinicians' page: static files served at `/`, a client of the FHIR API."""
