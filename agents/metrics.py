"""Prometheus counters every worker owns (sum them across workers in PromQL), and the hook by which each
KPI family exports gauges computed from its tables at scrape time."""

from __future__ import annotations

from typing import Callable, Iterable

from prometheus_client import REGISTRY, Counter
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector

from crm_pulse.schemas.events import EVENT_TYPES
from crm_pulse.schemas.validate import REASONS
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

# Known label values start at zero, so rate() and dashboards see the series before the first increment.
for _reason in REASONS:
    EVENTS_INVALID.labels(_reason)
for _type in EVENT_TYPES:
    EVENTS_PROCESSED.labels(_type)
    EVENTS_DUPLICATE.labels(_type)
for _type in ALERT_TYPES:
    ALERTS_EMITTED.labels(_type)


class _ScrapeTimeCollector(Collector):
    def __init__(self, collect: Callable[[], Iterable[Metric]]):
        self._collect = collect

    def collect(self) -> Iterable[Metric]:
        return self._collect()


def export_gauges(collect: Callable[[], Iterable[Metric]]) -> Callable[[], Iterable[Metric]]:
    """Decorator: register `collect` so that its gauges are computed from live state on every scrape."""
    REGISTRY.register(_ScrapeTimeCollector(collect))
    return collect
