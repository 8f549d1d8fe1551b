"""The Faust app, its topics and the shared clock. Settings are read once, when the worker imports this."""

from __future__ import annotations

import asyncio

import aiokafka
import faust
import orjson
from faust.serializers import codecs
from faust.transport.drivers import aiokafka as aiokafka_driver
from mode.utils.objects import cached_property
from mode.utils.queues import FlowControlEvent

from kafka.partitioner.default import murmur2

from crm_pulse.broker import CHANGELOG_SEAL_KEY, DEAD_LETTER_MAX_BYTES, ssl_context
from crm_pulse.config import Settings
from streams.clock import Clock


class OrjsonCodec(codecs.Codec):
    def _dumps(self, obj) -> bytes:
        return orjson.dumps(obj)

    def _loads(self, s: bytes):
        return orjson.loads(s)


codecs.register("orjson", OrjsonCodec())

settings = Settings()


def _credentials(settings: Settings):
    # The protocol decides: a SASL mechanism left set beside SECURITY_PROTOCOL=SSL must not drop TLS.
    tls = ssl_context(settings) if settings.security_protocol in ("SSL", "SASL_SSL") else None
    if settings.security_protocol.startswith("SASL_"):
        return faust.SASLCredentials(
            username=settings.sasl_username,
            password=settings.sasl_password.get_secret_value() if settings.sasl_password else None,
            mechanism=settings.sasl_mechanism,
            ssl_context=tls,
        )
    return faust.SSLCredentials(tls) if tls else None


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
        # Faust fixes it at 1.5 s, which Tansu holds every fetch for (see Settings.fetch_max_wait_ms);
        # aiokafka reads it when the consumer starts, to build its fetcher.
        if settings.effective_fetch_max_wait_ms is not None:
            consumer._fetch_max_wait_ms = settings.effective_fetch_max_wait_ms
        return consumer

    async def seek_to_committed(self):
        """aiokafka's, with every stream partition that has no committed offset (or 0) sought back to its
        beginning, where the reset policy (Faust's default, earliest) started it (a Faust and aiokafka
        matter, on either broker). During recovery the fetcher already reads stream partitions and Faust
        drops what it brings, trusting this seek to go back; aiokafka seeks only to a committed offset
        > 0, so a partition never committed stayed past everything fetched meanwhile: a worker killed
        before its first commit came back on Apache Kafka, restored its tables, and never read its input."""
        committed = await super().seek_to_committed()
        changelogs = self.app.tables.changelog_topics
        never_committed = [tp for tp, offset in committed.items() if not offset and tp.topic not in changelogs]
        if never_committed:
            await self.seek_to_beginning(*never_committed)
        return committed


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
    expires (Faust's request timeout: 20 min), with `ingest` awaiting it and every commit behind it."""

    async def send(self, topic, *args, **kwargs):
        self.client.add_topic(topic)  # a set lookup once tracked
        return await super().send(topic, *args, **kwargs)


class Producer(aiokafka_driver.Producer):
    """Faust's, whose flush (awaited before every commit) waits for every message of its buffer to be
    delivered (a Faust matter, on either broker). Faust's gives up on the buffer as soon as a send takes
    over 0.1 s and then waits only for what aiokafka already holds; on Apache Kafka the first writes to a
    changelog Faust has just created wait for its metadata that long, and the offsets of the events behind
    those table writes were committed before the writes left: a crash then would lose that state."""

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


class App(faust.App):
    @cached_property
    def flow_control(self) -> FlowControlEvent:
        return KeepQueuesOnResume(loop=self.loop)

    def _new_transport(self) -> Transport:
        return Transport(self.conf.broker_consumer, self)


app = App(
    settings.app_id,
    broker=settings.broker,
    broker_credentials=_credentials(settings),
    # Both brokers: a worker that died stays in the group until its session times out, holding back the
    # rebalance that hands its partitions on (Faust's default is 60 s). Tansu also needs these for quick joins.
    broker_session_timeout=6,
    broker_heartbeat_interval=1,
    store=settings.store,
    recovery_consistency_check=settings.effective_recovery_consistency_check,
    datadir=settings.data_dir,
    topic_partitions=settings.partitions,
    topic_replication_factor=settings.replication_factor,
    key_serializer="raw",
    value_serializer="orjson",
    web_bind=settings.metrics_host,
    web_host=settings.metrics_host,
    web_port=settings.metrics_port,
    # Standby copies would live in the same in-memory store and be counted as this worker's own.
    table_standby_replicas=0,
    # A dead letter carries its input base64-encoded (4/3 of its size): room for any input the broker took.
    producer_max_request_size=DEAD_LETTER_MAX_BYTES,
    # Apache Kafka: a topic Faust has just created may be missing from the metadata the group leader
    # assigns with (KRaft publishes it a moment later); the leader rebalances once its metadata shows the
    # topic, which by default it refreshes every 5 minutes: all that time nobody read it.
    consumer_metadata_max_age_ms=5_000,
    autodiscover=False,
)


def key_partition(key: str, partitions: int) -> int:
    """The partition the producers' default (murmur2) partitioner gives a key: every table here is
    written in the context of messages keyed like the table, so this is also the key's changelog partition."""
    return (murmur2(key.encode()) & 0x7FFFFFFF) % partitions


@app.on_partitions_assigned.connect
async def drop_keys_now_owned_elsewhere(sender, assigned, **kwargs) -> None:
    """The in-memory store keeps every key it ever held; after a rebalance, keys of partitions another
    worker now owns would be exported and scanned twice. (RocksDB stores filter by partition themselves.)
    A table's own partitions are those of its changelog: the assignment spans every topic, and a partition
    number held of one topic (the single partition of Faust's leader topic, say) says nothing of another."""
    def held(topic: str) -> set[int]:
        return {tp.partition for tp in assigned if tp.topic == topic}

    clock.keep_only(held(input_topic.get_topic_name()))
    for table in app.tables.values():
        local = getattr(table.data, "data", None)
        if isinstance(local, dict):
            mine = held(table.changelog_topic.get_topic_name())
            partition_of = int if table is event_time else lambda key: key_partition(key, table.partitions)
            for key in [k for k in local if partition_of(k) not in mine]:
                del local[key]


async def seal_given_up_changelogs(partitions: set[int]) -> None:
    """The changelog partitions this worker gives up end with a batch of one record, for the worker that
    restores them next (see `crm_pulse.broker.seal_changelogs`, which does the same before a start): on
    Tansu only, whose end offsets stop short of a partition's last batch."""
    if not settings.on_tansu:
        return
    producer = app.producer
    await producer.flush()
    for table in app.tables.values():
        changelog = table.changelog_topic
        key, _ = changelog.prepare_key(CHANGELOG_SEAL_KEY, table.key_serializer)
        for partition in partitions & set(range(table.partitions)):
            # Raw None, not a serialized null: only that is a tombstone the stores delete on recovery.
            await producer.send(changelog.get_topic_name(), key, None, partition, None, None)
    await producer.flush()


@app.on_partitions_revoked.connect
async def seal_revoked_changelogs(sender, revoked, **kwargs) -> None:
    await seal_given_up_changelogs({tp.partition for tp in revoked})


@app.on_before_shutdown.connect
async def seal_changelogs_on_shutdown(sender, **kwargs) -> None:
    await seal_given_up_changelogs({tp.partition for tp in app.consumer.assignment()})


def table(name: str, default=dict) -> faust.Table:
    """A table keyed by str, partitioned like every topic here, its values written with orjson: for
    untyped values Faust picks its stdlib json codec, which made serialising the large aggregate states
    a visible share of the worker's time. (Keys keep Faust's json: their bytes are their changelog identity.)"""
    created = app.Table(name, default=default, partitions=settings.partitions, key_type=str)
    # Read by every changelog write and when the store is made (lazily, after this).
    created.value_serializer = "orjson"
    return created


# Latest event time per input partition, keyed by the partition it describes and written while reading
# it, so it is restored with that partition when a worker restarts or takes it over.
event_time = table("event-time", default=None)
clock = Clock(settings.clock, int(settings.grace_seconds * 1000), saved=event_time)


def internal_topic(suffix: str) -> faust.TopicT:
    return app.topic(f"{settings.app_id}-{suffix}", internal=True, partitions=settings.partitions, key_type=str)


input_topic = app.topic(settings.input_topic, key_serializer="raw", value_serializer="raw")
alerts_topic = app.topic(settings.alerts_topic, value_serializer="orjson")
dlq_topic = app.topic(settings.dlq_topic, value_serializer="orjson")
# Validated events, re-keyed by their own entity whatever key the producer used, one topic per family:
# a topic several agents read hands each message to all their queues, and Faust clears queues on
# rebalance and shutdown, so a message one agent took and another lost is never acknowledged (the
# commit sticks there, and shutdown waits for it forever). Packed per ingest batch into one message per
# partition (see agents.ingest.Envelopes).
family_topics = {family: internal_topic(f"{family}-events") for family in ("lead", "customer", "signal")}
# Deltas for the keyed aggregates: histograms by "dwell:<stage>" / "cycle:all" / "resolution:all",
# KPI sums by scope ("all", "rep:<id>", "source:<s>", ...), churn spells by "all", rep activity by "rep:<id>".
histogram_deltas_topic = internal_topic("histogram-deltas")
sums_deltas_topic = internal_topic("kpi-sum-deltas")
churn_deltas_topic = internal_topic("churn-deltas")
actor_activity_topic = internal_topic("actor-activity")
# Stall levels the timer raised, keyed by lead: the lead agent folds them into the lead's state.
stall_levels_topic = internal_topic("stall-levels")
DAY_S = 86400
# Daily buckets are kept for the longest window (and the one before it, for growth rates) plus grace.
RETENTION_DAYS = 60 + int(settings.grace_seconds // DAY_S) + 2
