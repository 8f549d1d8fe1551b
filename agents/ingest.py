"""Validate every raw CRM event; bad ones go to the dead-letter topic with the reason, good ones onward to
their family's agent."""

from __future__ import annotations

import logging
from collections import defaultdict

from crm_pulse.agents.app import Pipeline, key_partition
from crm_pulse.agents.batches import BATCH_MAX_EVENTS, BATCH_WITHIN_SECONDS, part_of
from crm_pulse.agents.metrics import EVENTS_INVALID, EVENTS_RECEIVED
from crm_pulse.schemas.events import ms_to_iso
from crm_pulse.schemas.records import dead_letter_record
from crm_pulse.schemas.validate import InvalidEvent, parse_event
from crm_pulse.streams.families import FAMILY_OF_TYPE

# Well under the broker's default 1 MiB message limit (events are at most 64 KiB).
ENVELOPE_MAX_BYTES = 512 * 1024

log = logging.getLogger(__name__)


def dead_letter(error: InvalidEvent, message) -> dict:
    source = {"topic": message.topic, "partition": message.partition, "offset": message.offset}
    return dead_letter_record(error.reason, error.detail, source, message.key, message.value or b"")


class Ingest:
    """The ingest agent of one pipeline, and what it remembers of the input partitions it reads."""

    def __init__(self, pipeline: Pipeline):
        self.pipeline = pipeline
        # Input partition → the highest offset whose outcome (forwarded or dead-lettered) this process has
        # delivered. After a rebalance Faust seeks every partition it holds back to its committed offset, which
        # lags what was read when the commit on revocation failed (the group had dropped this worker: its
        # session timed out in a broker outage). A message read again is on its way already; judged again, it
        # would be late against the marks of the events read after it, and dead-lettered.
        self.delivered: dict[int, int] = {}

    async def ingest(self, stream):
        clock, delivered = self.pipeline.clock, self.delivered
        async for events in stream.take_events(BATCH_MAX_EVENTS, BATCH_WITHIN_SECONDS):
            # Faust acknowledges the batch's input offsets when the next batch is taken: whatever the batch sent
            # must be on the broker by then, or a send that failed (a dead letter over the topic's size limit,
            # say) would be committed past and lost without a word.
            sent = []
            packed = Envelopes(self.pipeline.family_topics, self.pipeline.settings.partitions)
            last_valid = {}  # input partition → its last valid event in the batch
            last_read = {}  # input partition → the offset of its last message in the batch
            for event in events:
                EVENTS_RECEIVED.inc()
                if event.message.offset <= delivered.get(event.message.partition, -1):
                    continue
                last_read[event.message.partition] = event.message.offset
                try:
                    crm_event = parse_event(event.value)
                    if clock.is_late(event.message.partition, crm_event.occurred_at):
                        raise InvalidEvent(
                            "late", f"occurred_at {ms_to_iso(crm_event.occurred_at)} is more than the grace period "
                            f"behind the latest event of its partition"
                        )
                except InvalidEvent as error:
                    EVENTS_INVALID.labels(error.reason).inc()
                    log.warning("dead-lettered %s/%s@%s: %s", event.message.topic, event.message.partition,
                                event.message.offset, error)  # fmt: skip
                    dead = dead_letter(error, event.message)
                    sent.append(await self.pipeline.dlq_topic.send(key=event.key, value=dead))
                    continue
                partition = event.message.partition
                clock.observe(partition, crm_event.occurred_at)
                last_valid[partition] = event
                packed.add(partition, event.message.offset, crm_event.key, crm_event.model_dump(by_alias=True),
                           len(event.value))  # fmt: skip
            sent.extend(await packed.send(clock.partition_watermark))
            for delivery in sent:
                await delivery
            # Once per batch and partition, as part of the partition's last event (the table is keyed by it), and
            # only once the batch's events are on the broker: after a crash the restored mark is announced to the
            # family agents as a watermark, and a mark ahead of the events forwarded let their stall checks run
            # before events that moved the leads (a restarted worker raised 18 stalls a clean run did not).
            for partition, event in last_valid.items():
                with part_of(event):
                    clock.save(partition)
            delivered.update(last_read)

    async def announce_restored_watermarks(self) -> None:
        """After every rebalance, every family partition hears from each input partition this worker now reads,
        from the mark restored with it. One that has nothing left to read would otherwise stay silent on the
        family partitions that just changed hands, holding their stall checks and id pruning back for good."""
        pipeline = self.pipeline
        if watermarks := pipeline.clock.saved_watermarks():
            for topic, partition in every_family_partition(pipeline.family_topics, pipeline.settings.partitions):
                await topic.send(partition=partition, value={"watermarks": watermarks, "events": []})


def install(pipeline: Pipeline) -> Ingest:
    ingest = Ingest(pipeline)
    pipeline.app.agent(pipeline.input_topic)(ingest.ingest)
    pipeline.event_time.on_recover(ingest.announce_restored_watermarks)
    return ingest


class Envelopes:
    """The valid events of one batch, one message per family topic and entity partition instead of one
    per event: each agent downstream pays Faust's per-message cost once per batch, not once per event of
    every family. Events keep their input order (an entity's events from one input partition stay in
    order; events from different input partitions never had an order between them) and their input
    position, by which entities tell a re-read after a crash from a new event."""

    def __init__(self, family_topics: dict, partitions: int):
        self.family_topics, self.partitions = family_topics, partitions
        self.chunks: dict[tuple, list[list]] = defaultdict(lambda: [[]])
        self.sizes: dict[tuple, int] = defaultdict(int)
        self.sources: set[int] = set()

    def add(self, source: int, offset: int, key: str, event: dict, size: int) -> None:
        self.sources.add(source)
        where = (self.family_topics[FAMILY_OF_TYPE[event["type"]]], key_partition(key, self.partitions))
        if self.sizes[where] + size > ENVELOPE_MAX_BYTES:
            self.chunks[where].append([])
            self.sizes[where] = 0
        self.chunks[where][-1].append([key, source, offset, event])
        self.sizes[where] += size

    async def send(self, watermark_of) -> list:
        """The deliveries of one message per family partition. The watermarks of the batch's input
        partitions go with the last message to each partition, and
        every partition of every family topic gets them, events or not: stall checks and id pruning wait
        until each has heard from every input partition (`streams.clock.UpstreamWatermark`), also from
        those whose events all went elsewhere (as when producers key by the same entity, or a partition
        carries no event of a family)."""
        if self.sources:
            for where in every_family_partition(self.family_topics, self.partitions):
                self.chunks.setdefault(where, [[]])
        watermarks = [[source, watermark_of(source)] for source in sorted(self.sources)]
        deliveries = []
        for (topic, partition), chunks in self.chunks.items():
            for n, events in enumerate(chunks, 1):
                # Only with the last: the lead agent may check stalls between two of them.
                value = {"watermarks": watermarks if n == len(chunks) else [], "events": events}
                deliveries.append(await topic.send(partition=partition, value=value))
        return deliveries


def every_family_partition(family_topics: dict, partitions: int) -> list[tuple]:
    return [(topic, partition) for topic in family_topics.values() for partition in range(partitions)]
