"""Faust and aiokafka behaviours this worker cannot live with, corrected by subclassing (each names the broker
that needs it, its upstream report where there is one, and the test that shows it). They lean on private
attributes (`_acked`, `_gap`, `_fetch_max_wait_ms`), so `check_versions` warns at start when Faust or aiokafka
is not the release they were written and tested against; tests/test_faust_fixes.py pins the upstream
behaviour each one corrects and fails once upstream changes it."""

from __future__ import annotations

import asyncio
import logging

import aiokafka
import faust
from faust.transport.consumer import ensure_TPset
from faust.transport.drivers import aiokafka as aiokafka_driver
from mode.utils.objects import cached_property
from mode.utils.queues import FlowControlEvent

log = logging.getLogger(__name__)

# The releases (major.minor) these corrections were written and tested against.
TESTED_WITH = {"faust": "0.15", "aiokafka": "0.14"}


def check_versions() -> list[str]:
    """A warning per library whose installed release is not the one these corrections were tested with."""
    installed = {"faust": faust.__version__, "aiokafka": aiokafka.__version__}
    warnings = [
        f"{name} {version} is installed; crm_pulse.agents.faust_fixes was tested with {TESTED_WITH[name]}.x: "
        "check that each correction there is still needed and still right (tests/test_faust_fixes.py)"
        for name, version in installed.items() if not version.startswith(TESTED_WITH[name] + ".")
    ]  # fmt: skip
    for warning in warnings:
        log.warning(warning)
    return warnings


class KeepQueuesOnResume(FlowControlEvent):
    """Flow control whose resume keeps what the agents' queues hold (a Faust matter, on either broker).
    Faust empties them on every resume, and the last resume of a rebalance comes after it has resumed the
    stream partitions and sought them to their committed offsets: messages delivered in between were
    dropped unprocessed while the fetch position was past them, so their offsets were never acknowledged
    and the partition's commit stuck or crept there (and on a restart the events were lost to the worker).
    Kept, a message delivered before the seek is processed twice at worst, which entities and aggregates
    drop as a re-read. Revocation and shutdown still empty the queues (`clear`): those messages belong to
    partitions that may move."""

    def resume(self) -> None:
        self._suspend.clear()
        self._resume.set()


class ConsumerThread(aiokafka_driver.AIOKafkaConsumerThread):
    #: How long a fetch waits when every active partition still awaits its seek.
    SOUGHT_WAIT_SECONDS = 0.05

    def _create_worker_consumer(self, transport):
        consumer = super()._create_worker_consumer(transport)
        # Tansu: Faust fixes it at 1.5 s, which Tansu holds every fetch for (see Settings.fetch_max_wait_ms);
        # aiokafka reads it when the consumer starts, to build its fetcher.
        if self.app.fetch_max_wait_ms is not None:
            consumer._fetch_max_wait_ms = self.app.fetch_max_wait_ms
        return consumer

    async def getmany(self, active_partitions, timeout):
        """Faust's, fetching only stream partitions sought since they were last paused, from a copy of
        the active set (a Faust matter, on either broker). Faust resumes the stream partitions after a
        rebalance before it seeks them to their committed offsets, and drops what it fetched of a
        partition it no longer counts active: a message read in between moved the fetch position past
        messages dropped before it, which the seek then left behind (every agent here takes what lies
        below the highest offset it applied for a re-read, so such a hole is lost for good). Faust also
        passes its live set, which the consumer thread may find empty, and aiokafka takes an empty set
        for every partition."""
        if active_partitions is not None:
            active_partitions = set(active_partitions) - self.consumer.unsought
            if not active_partitions:
                await asyncio.sleep(min(timeout, self.SOUGHT_WAIT_SECONDS))
                return {}
        return await super().getmany(active_partitions, timeout)

    async def seek_to_committed(self):
        """aiokafka's, with every stream partition that has no committed offset (or 0) sought back to its
        beginning, where the reset policy (Faust's default, earliest) started it (a Faust and aiokafka
        matter, on either broker). Faust drops what it fetched of a partition it pauses, and a rebalance
        empties the agents' queues, both trusting this seek to go back; aiokafka seeks only to a committed
        offset > 0, so a partition never committed stayed past everything fetched meanwhile: a worker killed
        before its first commit came back on Apache Kafka, restored its tables, and never read its input
        (aio-libs/aiokafka#1003 reports the committed offset 0 case). What it had read already is read
        again, and dropped as a re-read by `ingest`."""
        committed = await super().seek_to_committed()
        changelogs = self.app.tables.changelog_topics
        never_committed = [tp for tp, offset in committed.items() if not offset and tp.topic not in changelogs]
        if never_committed:
            await self.seek_to_beginning(*never_committed)
        return committed


class Consumer(aiokafka_driver.Consumer):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        # Stream partitions paused (a rebalance starts with that) and not sought since: not fetched from.
        self.unsought: set = set()

    def _new_consumer_thread(self) -> ConsumerThread:
        return ConsumerThread(self, loop=self.loop, beacon=self.beacon)

    def pause_partitions(self, tps) -> None:
        tps = ensure_TPset(tps)
        super().pause_partitions(tps)
        changelogs = self.app.tables.changelog_topics
        self.unsought.update(tp for tp in tps if tp.topic not in changelogs)

    async def seek_to_committed(self):
        committed = await super().seek_to_committed()
        self.unsought.difference_update(committed)
        return committed

    def _new_offset(self, tp):
        """Faust's (a Faust matter, on either broker), with a gap in what was read merged into the acked
        offsets as a set. Faust appends the gap's offsets to the acked list as they are, but a gap also
        covers acked ones: the offset that ended it, and after a rebalance those delivered between the
        flow's resume and the seek to the committed offset. Each duplicate ended the consecutive run Faust
        commits up to, holding the partition's commit back one commit interval apiece (a takeover crept 1
        offset per 2.8 s; robinhood/faust#625)."""
        acked, gap = self._acked[tp], self._gap[tp]
        if acked and gap:
            highest = max(acked)
            filled = {offset for interval in gap.overlap(0, highest) for offset in range(interval.begin, interval.end)}
            if filled:
                acked[:] = sorted(filled.union(acked))
                gap.chop(0, max(acked[-1], highest + 1))
        return super()._new_offset(tp)


class TopicTrackingProducer(aiokafka.AIOKafkaProducer):
    """aiokafka's producer, with every topic it sends to tracked for metadata. aiokafka tracks a topic only
    if the cluster metadata it holds lacks it, and once it tracks any, every metadata update keeps only
    the tracked ones. So topics learned from a full fetch while none was tracked (at start) fall out of
    the metadata as soon as one missing topic is tracked (on Apache Kafka, a topic just created may not
    be in the broker's metadata yet). A batch already waiting for one of them then has no leader: the
    sender asks for metadata in a tight loop that never brings it back, and the batch waits until it
    expires (Faust's request timeout: 20 min), with `ingest` awaiting it and every commit behind it. (Apache
    Kafka; no upstream report found.)"""

    async def send(self, topic, *args, **kwargs):
        self.client.add_topic(topic)  # a set lookup once tracked
        return await super().send(topic, *args, **kwargs)

    async def send_batch(self, batch, topic, *, partition):
        self.client.add_topic(topic)  # the changelogs' batches (Producer.send_in_batches) wait on it as well
        return await super().send_batch(batch, topic, partition=partition)


class Producer(aiokafka_driver.Producer):
    """Faust's, whose flush (awaited before every commit) waits for every message of its buffer to be
    delivered (a Faust matter, on either broker). Faust's gives up on the buffer as soon as a send takes
    over 0.1 s and then waits only for what aiokafka already holds; on Apache Kafka the first writes to a
    changelog Faust has just created wait for its metadata that long, and the offsets of the events behind
    those table writes were committed before the writes left: a crash then would lose that state. (Faust
    flushes before committing since faust-streaming/faust#273; the flush's own time limit is the gap.)"""

    def __post_init__(self) -> None:
        super().__post_init__()
        self.undelivered: set[asyncio.Future] = set()

    def send_soon(self, fut) -> None:
        self.undelivered.add(fut)
        fut.add_done_callback(self.undelivered.discard)
        super().send_soon(fut)

    async def flush(self) -> None:
        await super().flush()
        if self.undelivered:
            await asyncio.wait(list(self.undelivered))

    async def send_in_batches(self, topic: str, records: dict[int, list[tuple[bytes, bytes]]]) -> dict[int, int]:
        """Each partition's (key, value) records, in order, in as few aiokafka batches as the producer's
        batch size allows (one, for a changelog's writes of one agent batch), instead of a message each
        through Faust's buffer; once all are delivered, each partition's offset of its last record. Until
        then they count as undelivered, so a flush (before a commit, or a changelog seal) waits for them too.
        Same records on the wire as Faust's sends with no timestamp and no headers: the producer stamps them."""
        producer = self._ensure_producer()
        deliveries: list[tuple[int, int, asyncio.Future]] = []  # (partition, records in the batch, delivery)

        async def send(partition: int, batch, count: int) -> None:
            delivery = await producer.send_batch(batch, topic, partition=partition)
            self.undelivered.add(delivery)
            delivery.add_done_callback(self.undelivered.discard)
            deliveries.append((partition, count, delivery))

        for partition, items in records.items():
            batch, count = producer.create_batch(), 0
            for key, value in items:
                if batch.append(key=key, value=value, timestamp=None) is None:  # full: the next one
                    await send(partition, batch, count)
                    batch, count = producer.create_batch(), 0
                    batch.append(key=key, value=value, timestamp=None)  # a batch's first record always fits
                count += 1
            await send(partition, batch, count)
        last_offsets = {}
        for partition, count, delivery in deliveries:
            last_offsets[partition] = (await delivery).offset + count - 1  # a batch's delivery: its first offset
        return last_offsets

    @property
    def _producer_type(self) -> type[aiokafka.AIOKafkaProducer]:
        return TopicTrackingProducer


class Transport(aiokafka_driver.Transport):
    Consumer = Consumer
    Producer = Producer


class App(faust.App):
    #: Tansu's fetch wait (Settings.effective_fetch_max_wait_ms); None leaves Faust's.
    fetch_max_wait_ms: int | None = None

    @cached_property
    def flow_control(self) -> FlowControlEvent:
        return KeepQueuesOnResume(loop=self.loop)

    def _new_transport(self) -> Transport:
        return Transport(self.conf.broker_consumer, self)
