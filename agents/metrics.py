"""Prometheus counters every worker owns (sum them across workers in PromQL), and what a worker serves at
/metrics: these, its pipeline's gauges computed from the tables at scrape time (`agents.gauges`), and its
consumer's offsets, also read at scrape time (`ConsumerOffsets`)."""

from __future__ import annotations

from aiohttp.web import Response
from faust import web
from faust.exceptions import ConsumerNotStarted
from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

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


OFFSET_LABELS = ("topic", "partition")


class ConsumerOffsets(Collector):
    """Per partition of the topics this worker's agents read: the committed offset, the last offset read, the
    end offset and the lag, read from the consumer at scrape time; and the rebalances the worker took part in.
    They replace Faust's Prometheus sensor, which updated its series on every message and event (14% of the
    event loop's samples in the profile of docs/performance.md) for what a scrape can read when it happens."""

    def __init__(self, app):
        self.app = app
        self.rebalances = 0
        app.on_partitions_assigned.connect(self.count_rebalance)

    async def count_rebalance(self, sender, assigned, **kwargs) -> None:
        self.rebalances += 1  # Faust sends the signal once per rebalance, at its end

    def describe(self):
        return self.families()

    def families(self):
        return (
            GaugeMetricFamily("crm_consumer_committed_offset", "Offset committed for the worker's group: the next "
                              "message the group reads after a restart.", labels=OFFSET_LABELS),
            GaugeMetricFamily("crm_consumer_read_offset", "Offset of the last message the worker read and handed "
                              "to its agent (after a seek: the offset sought to).", labels=OFFSET_LABELS),
            GaugeMetricFamily("crm_consumer_end_offset", "End offset (high-water mark: the next offset to be "
                              "written) as of the consumer's latest fetch.", labels=OFFSET_LABELS),
            GaugeMetricFamily("crm_consumer_lag_messages", "End offset - committed offset: messages of the "
                              "partition not yet committed.", labels=OFFSET_LABELS),
            CounterMetricFamily("crm_consumer_rebalances", "Rebalances this worker completed (partitions "
                                "assigned), since it started."),
        )  # fmt: skip

    def collect(self):
        committed, read, end, lag, rebalances = self.families()
        rebalances.add_metric([], self.rebalances)
        consumer = self.app.consumer
        changelogs = self.app.tables.changelog_topics
        try:
            assigned = consumer.assignment()
        except ConsumerNotStarted:  # a scrape while the worker starts
            assigned = set()
        # Changelogs are only read to restore tables, and their fetches paused after: no offsets worth showing.
        for tp in sorted(tp for tp in assigned if tp.topic not in changelogs):
            labels = [tp.topic, str(tp.partition)]
            # What this consumer committed, or found committed when assigned the partition. None: nothing
            # committed (Faust files a commit of 0 so too), and the group reads the partition from its start.
            done = consumer._committed_offset.get(tp) or 0
            committed.add_metric(labels, done)
            if (offset := consumer._read_offset.get(tp)) is not None:
                read.add_metric(labels, offset)
            if (highwater := self.highwater(consumer, tp)) is not None:
                end.add_metric(labels, highwater)
                # The end offset is as of the last fetch, a commit can be newer.
                lag.add_metric(labels, max(highwater - done, 0))
        return committed, read, end, lag, rebalances

    @staticmethod
    def highwater(consumer, tp) -> int | None:
        """The end offset the consumer's last fetch of `tp` returned; None before one, or when a rebalance
        (on the consumer's own thread) took the partition away since the assignment was read."""
        try:
            return consumer.highwater(tp)
        except (AssertionError, AttributeError):
            return None


def serve_metrics(pipeline: Pipeline, registry: CollectorRegistry = REGISTRY) -> None:
    """Add the pipeline's gauges and its consumer's offsets to `registry`, and serve it at /metrics: once per
    registry, which takes each metric name once (the counters above are in the default one)."""
    registry.register(pipeline.gauges)
    registry.register(pipeline.deals)
    registry.register(ConsumerOffsets(pipeline.app))

    @pipeline.app.page("/metrics")
    async def metrics(self: web.View, request: web.Request) -> web.Response:
        return Response(body=generate_latest(registry), headers={"Content-Type": CONTENT_TYPE_LATEST})
