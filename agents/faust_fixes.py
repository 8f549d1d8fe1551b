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
from faust.tables import TableManager as FaustTableManager
from faust.tables.recovery import Recovery as FaustRecovery
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
    def _create_worker_consumer(self, transport):
        consumer = super()._create_worker_consumer(transport)
        # Tansu: Faust fixes it at 1.5 s, which Tansu holds every fetch for (see Settings.fetch_max_wait_ms);
        # aiokafka reads it when the consumer starts, to build its fetcher.
        if self.app.fetch_max_wait_ms is not None:
            consumer._fetch_max_wait_ms = self.app.fetch_max_wait_ms
        return consumer


class Consumer(aiokafka_driver.Consumer):
    def _new_consumer_thread(self) -> ConsumerThread:
        return ConsumerThread(self, loop=self.loop, beacon=self.beacon)

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

    @property
    def _producer_type(self) -> type[aiokafka.AIOKafkaProducer]:
        return TopicTrackingProducer


class Transport(aiokafka_driver.Transport):
    Consumer = Consumer
    Producer = Producer


class Recovery(FaustRecovery):
    async def _resume_streams(self, generation_id: int = 0) -> None:
        """Faust's, with the stream partitions sought to their committed offsets before they are resumed,
        not after (a Faust matter, on either broker). Resumed first, the fetcher delivered what it read from
        where recovery had left them while the seek was on its way to the broker, past the messages it had
        dropped during recovery; those were then never processed, as every agent here applies a partition's
        messages in order and takes what it has passed for a re-read (a worker that lost its group in a
        broker outage, and the older of two workers as the second joined, lost dozens of events on Apache
        Kafka). Sought while paused, the first message delivered after a rebalance is the committed one."""
        app, consumer = self.app, self.app.consumer
        await app.on_rebalance_complete.send()
        assignment = consumer.assignment()
        if app.consumer_generation_id != generation_id:
            self.log.warning("Recovery rebalancing again")
            return
        if assignment:
            streams = {tp for tp in assignment if not self._is_changelog_tp(tp)}
            self.log.info("Seek stream partitions to committed offsets.")
            await self._wait(consumer.perform_seek(), timeout=app.conf.broker_request_timeout)
            await self._wait(self._rewind_never_committed(streams), timeout=app.conf.broker_request_timeout)
            consumer.resume_partitions(streams)
        else:
            self.log.info("Resuming streams with empty assignment")
        self.completed.set()
        self.log.info("Resuming flow...")
        app.flow_control.resume()
        consumer.resume_flow()
        await app._fetcher.maybe_start()
        self.tables.on_actives_ready()
        self.tables.on_standbys_ready()
        app.on_rebalance_end()
        self.log.info("Worker ready")


    async def _rewind_never_committed(self, streams: set) -> None:
        """Every stream partition with no committed offset (or 0) back to its beginning, where the reset policy
        (Faust's default, earliest) started it (a Faust and aiokafka matter, on either broker). During recovery
        the fetcher already reads stream partitions and Faust drops what it brings, trusting the seek to the
        committed offsets to go back; aiokafka seeks only to a committed offset > 0, so a partition never
        committed stayed past everything fetched meanwhile: a worker killed before its first commit came back
        on Apache Kafka, restored its tables, and never read its input (aio-libs/aiokafka#1003 reports the
        committed offset 0 case). What this process had read of it before is read again, and dropped as a
        re-read. Here, not in every seek to the committed offsets: Faust also seeks when its fetcher finds the
        flow stopped, in the middle of a revocation."""
        consumer = self.app.consumer
        never_committed = [tp for tp in streams if not consumer._committed_offset.get(tp)]
        if never_committed:
            await consumer._thread.seek_to_beginning(*never_committed)


class TableManager(FaustTableManager):
    @property
    def recovery(self) -> Recovery:
        if self._recovery is None:
            self._recovery = Recovery(self.app, self, beacon=self.beacon, loop=self.loop)
        return self._recovery


class App(faust.App):
    #: Tansu's fetch wait (Settings.effective_fetch_max_wait_ms); None leaves Faust's.
    fetch_max_wait_ms: int | None = None

    @cached_property
    def flow_control(self) -> FlowControlEvent:
        return KeepQueuesOnResume(loop=self.loop)

    def _new_transport(self) -> Transport:
        return Transport(self.conf.broker_consumer, self)

    @cached_property
    def tables(self) -> TableManager:
        return TableManager(app=self, beacon=self.beacon)
