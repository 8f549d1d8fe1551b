"""The loops every agent is made of. Events are taken in batches: an entity agent applies each event once,
an aggregate agent each delta once, both against the batch's working copy of their state; the batch then
waits for everything it sent and writes each touched key once, its changelog records in one producer batch
per changelog partition. One broker round trip per batch, not per event, is what lets the pipeline keep up
with Faust itself."""

from __future__ import annotations

import weakref
from collections import defaultdict
from contextlib import contextmanager
from typing import AsyncIterator, Callable, Iterator

from faust.streams import _current_event
from faust.types import TP

from crm_pulse.agents.app import Pipeline
from crm_pulse.agents.metrics import EVENTS_DUPLICATE
from crm_pulse.streams.clock import UpstreamWatermark
from crm_pulse.streams.dedupe import already_applied, first_seen

# A batch closes when full or when no more events came within this time: the latency it may add.
BATCH_MAX_EVENTS = 1000
BATCH_WITHIN_SECONDS = 0.05


@contextmanager
def part_of(event):
    """Table writes inside belong to `event` (Faust has no public setter for the event a write belongs to;
    the stream's own current event is left alone, as take_events() reads it)."""
    token = _current_event.set(weakref.ref(event))
    try:
        yield
    finally:
        _current_event.reset(token)


class Batch:
    """The keys of a table touched by one batch of events. Anything the batch sends is delivered before
    any key is written: a crash in between replays the batch, whose sends carry the same ids, instead of
    leaving state that claims events whose deltas or alerts were never delivered."""

    def __init__(self, table, new: Callable[[], dict], prune: Callable[[dict, int], None] | None = None):
        self.table, self.new, self.prune = table, new, prune
        self.touched: dict[str, tuple[dict, object]] = {}
        # Per key, the day before which `prune` drops its daily cells when the batch is written: once per key
        # and batch, not a scan of every day on each delta.
        self.oldest_day: dict[str, int] = {}
        self.pending: list = []
        # Deltas for keyed aggregates, one message per (topic, key) for the whole batch: (topic, key) →
        # origin → entries.
        self.outbox: dict[tuple, dict[str, list]] = defaultdict(lambda: defaultdict(list))

    def state(self, key: str) -> dict:
        if key in self.touched:
            return self.touched[key][0]
        return self.table.get(key) or self.new()

    def touch(self, key: str, state: dict, event) -> None:
        self.touched[key] = (state, event)

    def prune_before(self, key: str, day: int) -> None:
        self.oldest_day[key] = max(day, self.oldest_day.get(key, day))

    def add_delta(self, topic, key: str, origin: str, entry: list) -> None:
        self.outbox[(topic, key)][origin].append(entry)

    def sent(self, future, on_delivered: Callable[[], None] | None = None) -> None:
        self.pending.append((future, on_delivered))

    async def commit(self) -> None:
        for (topic, key), by_origin in self.outbox.items():
            self.sent(await topic.send(key=key, value={"origins": by_origin}))
        for future, on_delivered in self.pending:
            await future
            if on_delivered:
                on_delivered()
        await write_changelogged(self.table, self.write_touched())

    def write_touched(self) -> dict[int, list[tuple[bytes, bytes]]]:
        """Prunes and writes each touched key to the table's store, and returns the changelog records that
        go with those writes, per changelog partition, for `write_changelogged` to send."""
        for key, day in self.oldest_day.items():
            self.prune(self.touched[key][0], day)
        table = self.table
        changelog = table.changelog_topic
        records: dict[int, list[tuple[bytes, bytes]]] = defaultdict(list)
        for key, (state, event) in self.touched.items():
            # Each key is written as part of its own last message: a RocksDB store files it under that
            # message's partition, and so does the changelog (the key's partition: every message here is on
            # its keys' partition). The store's own mapping, not the table's: Faust's table sends a
            # changelog message per key (Table.on_key_set), which write_changelogged replaces.
            with part_of(event):
                table.data[key] = state
            # The bytes Faust's Table.send_changelog writes for the key and value (the store reads them back).
            key_bytes, _ = changelog.prepare_key(key, table.key_serializer)
            value_bytes, _ = changelog.prepare_value(state, table.value_serializer)
            records[event.message.partition].append((key_bytes, value_bytes))
        return records


async def write_changelogged(table, records: dict[int, list[tuple[bytes, bytes]]]) -> None:
    """Sends a batch's changelog records of `table`, one producer batch per changelog partition, and
    returns once the broker has them all: before the batch is acknowledged, so before Faust can commit its
    offsets, as Faust's own flush before a commit guaranteed for its per-key sends. Like Faust's
    Table._on_changelog_sent outside a transaction (this app opens none), it then records in a RocksDB
    store the changelog offset its partitions now hold (the memory store keeps none), so a restart reads
    back only what lies beyond it. A send that fails raises here, before anything is acknowledged."""
    if not records:
        return
    topic = table.changelog_topic.get_topic_name()
    last_offsets = await table.app.producer.send_in_batches(topic, records)
    for partition, offset in last_offsets.items():
        table.data.set_persisted_offset(TP(topic, partition), offset)


async def batches(stream, table, new: Callable[[], dict] = dict,
                  prune: Callable[[dict, int], None] | None = None) -> AsyncIterator[tuple[Batch, list]]:  # fmt: skip
    """(batch, events) per batch taken from the stream; the batch is committed before the next is taken
    and before Faust acknowledges (and later commits) the batch's offsets."""
    async for events in stream.take_events(BATCH_MAX_EVENTS, BATCH_WITHIN_SECONDS):
        batch = Batch(table, new, prune)
        yield batch, events
        await batch.commit()


def upstream_watermark(pipeline: Pipeline, topic) -> UpstreamWatermark:
    """The watermarks forwarded to the partitions of `topic` this worker holds, followed by one agent."""
    # The input topic has the app's partition count (crm_pulse.broker.ensure_topics creates it so).
    upstream = UpstreamWatermark(sources=pipeline.settings.partitions)

    @pipeline.app.on_partitions_assigned.connect
    async def keep_own_partitions(sender, assigned, **kwargs) -> None:
        upstream.keep_only(tp.partition for tp in assigned if tp.topic == topic.get_topic_name())

    return upstream


async def envelopes(stream, table, new: Callable[[], dict] = dict) -> AsyncIterator[tuple[Batch, object]]:
    """(batch, message) for every message of packed events (see `agents.ingest.Envelopes`)."""
    async for batch, events in batches(stream, table, new):
        for received in events:
            yield batch, received


def unseen_events(
    pipeline: Pipeline, batch: Batch, received, upstream: UpstreamWatermark
) -> Iterator[tuple[str, dict, dict]]:
    """(key, event, state) for each event of a message of packed events its entity has not applied yet;
    `upstream` follows the watermarks the message carries, and so does the pipeline's clock."""
    envelope = received.value
    # Ids are forgotten by the watermarks heard before this message: its own are those at the end of its
    # batch, ahead of events in it that were on time when ingest read them (and maybe of their duplicates).
    watermark = upstream.watermark_ms
    forget_before = None if watermark is None else watermark - pipeline.forget_behind_watermark_ms
    for key, source, offset, event in envelope["events"]:
        state = batch.state(key)
        if not first_seen(state, event, source, offset, forget_before):
            EVENTS_DUPLICATE.labels(event["type"]).inc()
            continue
        batch.touch(key, state, received)
        yield key, event, state
    for source, watermark in envelope["watermarks"]:
        upstream.observe(received.message.partition, source, watermark)
        pipeline.clock.hear(watermark)


async def unapplied_deltas(stream, table, prune: Callable[[dict, int], None] | None = None) -> AsyncIterator:
    """(batch, event, state, deltas) per message: the deltas in it the aggregate has not applied yet
    (deltas are re-sent after a crash). `prune(state, day)` drops a state's daily cells before `day`, as the
    batch's `prune_before` asks."""
    async for batch, events in batches(stream, table, prune=prune):
        for event in events:
            state = batch.state(event.key)
            fresh = [delta for origin, entries in event.value["origins"].items() for offset, seq, delta in entries
                     if not already_applied(state, origin, offset, seq)]  # fmt: skip
            if fresh:
                batch.touch(event.key, state, event)
                yield batch, event, state, fresh
