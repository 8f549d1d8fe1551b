"""The consumer offsets a worker serves at /metrics instead of Faust's per-message sensor
(`agents.metrics.ConsumerOffsets`), read from a stand-in consumer whose offsets are set by hand."""

from __future__ import annotations

import asyncio

from faust.exceptions import ConsumerNotStarted
from faust.types import TP
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from crm_pulse.agents.metrics import ConsumerOffsets


class Signal:
    def __init__(self):
        self.receivers = []

    def connect(self, receiver):
        self.receivers.append(receiver)

    def send(self, assigned):
        for receiver in self.receivers:
            asyncio.run(receiver(None, assigned))


class StandInConsumer:
    def __init__(self, assigned, committed, read, highwaters, started=True):
        self.assigned, self._committed_offset, self._read_offset = assigned, committed, read
        self.highwaters, self.started = highwaters, started

    def assignment(self):
        if not self.started:
            raise ConsumerNotStarted("Consumer thread not yet started")
        return set(self.assigned)

    def highwater(self, tp):
        assert tp in self.highwaters, "Partition is not assigned"  # as aiokafka's, when a rebalance took it
        return self.highwaters[tp]


class StandInApp:
    def __init__(self, consumer):
        self.consumer = consumer
        self.on_partitions_assigned = Signal()
        self.tables = type("Tables", (), {"changelog_topics": {"app-leads-changelog"}})()


def scrape(collector: ConsumerOffsets) -> dict:
    registry = CollectorRegistry()
    registry.register(collector)
    text = generate_latest(registry).decode()
    return {(sample.name, tuple(sorted(sample.labels.items()))): sample.value
            for family in text_string_to_metric_families(text) for sample in family.samples}  # fmt: skip


def labels(topic: str, partition: int) -> tuple:
    return (("partition", str(partition)), ("topic", topic))


def test_offsets_and_lag_per_partition_read_at_scrape_time():
    events0, events1, events2 = TP("crm-events", 0), TP("crm-events", 1), TP("crm-events", 2)
    leads = TP("app-leads-changelog", 0)
    consumer = StandInConsumer(
        assigned=[events0, events1, events2, leads],
        # Partition 1: nothing committed yet (Faust keeps None); partition 2: taken away by a rebalance since
        # the assignment was read, so no end offset.
        committed={events0: 120, events1: None, leads: 7},
        read={events0: 149, events1: 11, leads: 9},
        highwaters={events0: 150, events1: 40, leads: 9},
    )
    metrics = scrape(ConsumerOffsets(StandInApp(consumer)))
    offsets = {key: value for key, value in metrics.items() if key[0] != "crm_consumer_rebalances_total"}
    assert offsets == {
        ("crm_consumer_committed_offset", labels("crm-events", 0)): 120,
        ("crm_consumer_read_offset", labels("crm-events", 0)): 149,
        ("crm_consumer_end_offset", labels("crm-events", 0)): 150,
        ("crm_consumer_lag_messages", labels("crm-events", 0)): 30,  # 150 - 120
        # Never committed: the group reads it from offset 0, so all 40 messages are lag.
        ("crm_consumer_committed_offset", labels("crm-events", 1)): 0,
        ("crm_consumer_read_offset", labels("crm-events", 1)): 11,
        ("crm_consumer_end_offset", labels("crm-events", 1)): 40,
        ("crm_consumer_lag_messages", labels("crm-events", 1)): 40,
        # No read offset and no end offset: only what is known.
        ("crm_consumer_committed_offset", labels("crm-events", 2)): 0,
    }  # the changelog partition is not shown


def test_rebalances_are_counted_once_each_and_a_scrape_before_start_shows_no_partition():
    consumer = StandInConsumer(assigned=[], committed={}, read={}, highwaters={}, started=False)
    app = StandInApp(consumer)
    collector = ConsumerOffsets(app)
    assert scrape(collector) == {("crm_consumer_rebalances_total", ()): 0}
    app.on_partitions_assigned.send({TP("crm-events", 0)})
    app.on_partitions_assigned.send({TP("crm-events", 0), TP("crm-events", 1)})
    consumer.started = True
    assert scrape(collector) == {("crm_consumer_rebalances_total", ()): 2}


def test_the_committed_offset_follows_a_new_commit_between_scrapes():
    events0 = TP("crm-events", 0)
    consumer = StandInConsumer(assigned=[events0], committed={events0: 10}, read={events0: 19}, highwaters={events0: 20})
    collector = ConsumerOffsets(StandInApp(consumer))
    assert scrape(collector)[("crm_consumer_lag_messages", labels("crm-events", 0))] == 10
    consumer._committed_offset[events0] = 20
    assert scrape(collector)[("crm_consumer_lag_messages", labels("crm-events", 0))] == 0
    # A commit newer than the last fetch's end offset is no negative lag.
    consumer._committed_offset[events0] = 25
    assert scrape(collector)[("crm_consumer_lag_messages", labels("crm-events", 0))] == 0
