"""Prometheus metrics shared by the feeds and the API (served at /metrics)."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

MESSAGES = Counter(
    "locator_messages",
    "Inbound feed messages by feed, trust and outcome",
    ["feed", "trust", "outcome"],
)
ACK_LATENCY = Histogram(
    "locator_ack_latency_seconds",
    "Time from a message's last byte to its acknowledgement",
    ["feed"],
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
)
SEARCH_LATENCY = Histogram(
    "locator_search_latency_seconds",
    "FHIR search and read latency",
    ["interaction"],
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1),
)
DB_ERRORS = Counter("locator_db_errors", "Database errors by where they happened", ["where"])
STALE_MPPS_STEPS = Gauge("locator_stale_mpps_steps", "MPPS steps IN PROGRESS past the stale age")
QUARANTINED_STUDIES = Gauge(
    "locator_quarantined_studies", "Studies whose patient assertions conflict"
)
AUDIT_WRITE_FAILURES = Counter(
    "locator_audit_write_failures", "Audit records that could not be written (data withheld)"
)
SUBSCRIPTION_DELIVERIES = Counter(
    "locator_subscription_deliveries",
    "Subscription notification attempts by outcome (delivered: a 2xx from the receiver)",
    ["outcome"],
)
