"""Prometheus counters every worker owns (sum them across workers in PromQL), and what a worker serves at
/metrics: these, its pipeline's gauges computed from the tables at scrape time (`agents.gauges`), and Faust's
own sensors."""

from __future__ import annotations

from faust.sensors.prometheus import setup_prometheus_sensors
from prometheus_client import REGISTRY, CollectorRegistry, Counter, Histogram

from crm_pulse.agents.app import Pipeline
from crm_pulse.schemas.events import EVENT_TYPES
from crm_pulse.schemas.validate import REASONS
from crm_pulse.streams.deals import DEAL_ALERT_TYPES
from crm_pulse.streams.leads import ALERT_TYPES

EVENTS_RECEIVED = Counter("crm_events_received_total", "Messages read from the input topic, valid or not.")
EVENTS_PROCESSED = Counter(
    "crm_events_processed_total", "Valid, first-seen events applied to state, by event type.", ["type"]
)
EVENTS_INVALID = Counter(
    "crm_events_invalid_total", "Events sent to the dead-letter topic, by reason.", ["reason"]
)
EVENTS_DUPLICATE = Counter(
    "crm_events_duplicate_total", "Events ignored because their event_id was already applied.", ["type"]
)
ALERTS_EMITTED = Counter("crm_alerts_emitted_total", "Alerts published to the alerts topic, by type.", ["type"])
STALL_SCAN_SECONDS = Histogram(
    "crm_stall_scan_duration_seconds", "Stall scan ticks: finding the leads due, raising and publishing their alerts.",
    buckets=(0.001, 0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
)  # fmt: skip

# Known label values start at zero, so rate() and dashboards see the series before the first increment.
for _reason in REASONS:
    EVENTS_INVALID.labels(_reason)
for _type in EVENT_TYPES:
    EVENTS_PROCESSED.labels(_type)
    EVENTS_DUPLICATE.labels(_type)
for _type in ALERT_TYPES + DEAL_ALERT_TYPES:
    ALERTS_EMITTED.labels(_type)


def serve_metrics(pipeline: Pipeline, registry: CollectorRegistry = REGISTRY) -> None:
    """Add the pipeline's gauges and Faust's sensors to `registry`, served at /metrics: once per registry,
    which takes each metric name once (the counters above are in the default one)."""
    registry.register(pipeline.gauges)
    registry.register(pipeline.deals)
    setup_prometheus_sensors(pipeline.app, pattern="/metrics", registry=registry, name_prefix="crm_pulse_faust")
