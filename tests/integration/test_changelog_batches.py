"""A batch's changelog records on a real broker (agents/batches.write_changelogged): one aiokafka batch per
changelog partition, the bytes Faust's own table writes, delivered before the batch returns, and a table
restored from them, memory or RocksDB, equal to the state written."""

from __future__ import annotations

import asyncio
import itertools

import pytest
from faust.types import TP, Message
from kafka import KafkaAdminClient, KafkaConsumer, TopicPartition
from kafka.admin import NewTopic

from crm_pulse.agents.app import Pipeline, key_partition
from crm_pulse.agents.batches import Batch
from crm_pulse.config import Settings

from .conftest import BROKER_KIND

pytestmark = pytest.mark.integration
PARTITIONS = 4
_apps = itertools.count(1)


class Event:  # what a written key belongs to: the message it came in, on the key's partition
    def __init__(self, partition: int):
        self.message = Message("input", partition, 0, 0.0, 0, None, b"", b"", None)


def pipeline_on(broker, tmp_path, app_id: str, store: str) -> Pipeline:
    settings = Settings(app_id=app_id, partitions=PARTITIONS, broker=broker.url, broker_kind=BROKER_KIND,
                        store=store, data_dir=str(tmp_path / app_id))  # fmt: skip
    pipeline = Pipeline(settings)
    pipeline.probe = pipeline.table("probe")
    return pipeline


def read_changelog(broker, topic: str) -> list:
    consumer = KafkaConsumer(bootstrap_servers=broker.url.removeprefix("kafka://"), enable_auto_commit=False)
    try:
        tps = [TopicPartition(topic, p) for p in range(PARTITIONS)]
        consumer.assign(tps)
        consumer.seek_to_beginning(*tps)
        records = []
        for _ in range(100):
            records += [r for batch in consumer.poll(timeout_ms=200).values() for r in batch]
            if all(consumer.position(tp) >= end for tp, end in consumer.end_offsets(tps).items()):
                return records
        raise AssertionError(f"{topic} not read to its end")
    finally:
        consumer.close()


@pytest.mark.parametrize("store", ["memory://", "rocksdb://"])
def test_a_batch_sends_one_producer_batch_per_changelog_partition_that_restores_the_table(broker, tmp_path, store):
    app_id = f"changelog-batches-{next(_apps)}"
    writer = pipeline_on(broker, tmp_path, app_id, store)
    table = writer.probe
    topic = table.changelog_topic.get_topic_name()
    admin = KafkaAdminClient(bootstrap_servers=broker.url.removeprefix("kafka://"))
    admin.create_topics([NewTopic(topic, PARTITIONS, 1)])
    admin.close()
    # 400 keys, a state of ~1 KiB each: 25 of Faust's default 16 KiB batches per partition.
    states = {f"lead-{i}": {"n": i, "timeline": ["x" * 100] * 10} for i in range(400)}
    sends: list[tuple[str, int]] = []

    async def write_batch():
        producer = writer.app.producer
        await producer.start()
        aiokafka_producer = producer._ensure_producer()
        send_batch = aiokafka_producer.send_batch

        async def counted(batch, topic, *, partition):
            sends.append((topic, partition))
            return await send_batch(batch, topic, partition=partition)

        aiokafka_producer.send_batch = counted
        try:
            batch = Batch(table, dict)
            for key, state in states.items():
                batch.touch(key, {"stale": True}, Event(key_partition(key, PARTITIONS)))
                batch.touch(key, state, Event(key_partition(key, PARTITIONS)))
            await batch.commit()
            assert all(delivery.done() for delivery in producer.undelivered)  # delivered before commit() returned
            return {p: table.data.persisted_offset(TP(topic, p)) for p in range(PARTITIONS)}
        finally:
            await producer.stop()

    persisted = asyncio.run(write_batch())
    assert sorted(sends) == [(topic, p) for p in range(PARTITIONS)]  # one producer batch per partition

    records = read_changelog(broker, topic)
    by_partition = {p: [r for r in records if r.partition == p] for p in range(PARTITIONS)}
    assert sum(map(len, by_partition.values())) == len(states)  # each key once
    for partition, written in by_partition.items():
        assert all(key_partition(states_key(r), PARTITIONS) == partition for r in written)
        assert all(r.headers == [] and r.timestamp > 0 for r in written)
        expected = [(table.changelog_topic.prepare_key(k, "json")[0], table.changelog_topic.prepare_value(v, "orjson")[0])
                    for k, v in states.items() if key_partition(k, PARTITIONS) == partition]  # fmt: skip
        assert [(r.key, r.value) for r in written] == expected
        if store == "rocksdb://":  # what Faust's _on_changelog_sent records: the partition's last offset
            assert persisted[partition] == written[-1].offset
    assert store == "rocksdb://" or set(persisted.values()) == {None}

    async def restore():
        """A table of a new worker (its own data dir) fed those records as Faust's recovery feeds it."""
        reader = pipeline_on(broker, tmp_path / "restored", app_id, store)
        changelog = reader.probe.changelog_topic
        events = [await changelog.decode(Message(topic, r.partition, r.offset, r.timestamp / 1000, 0, r.headers,
                                                 r.key, r.value, None))  # fmt: skip
                  for r in records]  # fmt: skip
        reader.probe.apply_changelog_batch(events)
        return {key: reader.probe.data[key] for key in states}

    assert asyncio.run(restore()) == states


def states_key(record) -> str:
    return record.key.decode().strip('"')
