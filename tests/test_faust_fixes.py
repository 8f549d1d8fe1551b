"""The upstream behaviour each correction in crm_pulse.agents.faust_fixes exists for, pinned: a test here that
fails means Faust or aiokafka changed it, and the correction may be needed no more (or may now be wrong).
Each test also checks the correction against the same situation."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

import aiokafka
import faust
import pytest
from aiokafka.structs import TopicPartition
from faust.transport.producer import ProducerBuffer
from faust.types.tuples import FutureMessage, PendingMessage
from intervaltree import IntervalTree
from mode.utils.queues import FlowControlEvent, FlowControlQueue

from crm_pulse.agents import faust_fixes


def test_the_corrections_know_the_releases_installed():
    assert faust_fixes.check_versions() == []
    assert faust.__version__.startswith(faust_fixes.TESTED_WITH["faust"] + ".")


class Fetcher:
    def __init__(self):
        self.sought: dict[TopicPartition, int] = {}

    def seek_to(self, tp, offset):
        self.sought[tp] = offset


def test_aiokafka_seeks_only_to_a_committed_offset_above_0():
    """aio-libs/aiokafka#1003: what ConsumerThread.seek_to_committed corrects."""
    committed = {TopicPartition("t", 0): None, TopicPartition("t", 1): 0, TopicPartition("t", 2): 7}
    consumer = aiokafka.AIOKafkaConsumer.__new__(aiokafka.AIOKafkaConsumer)
    consumer._subscription = SimpleNamespace(assigned_partitions=lambda: set(committed))
    consumer._fetcher = Fetcher()

    async def committed_offset(tp):
        return committed[tp]

    consumer.committed = committed_offset
    assert asyncio.run(consumer.seek_to_committed()) == committed
    assert consumer._fetcher.sought == {TopicPartition("t", 2): 7}


def test_the_worker_seeks_partitions_never_committed_to_their_beginning(app, monkeypatch):
    thread = app.consumer._thread
    changelog = next(iter(app.tables.values())).changelog_topic.get_topic_name()
    never, zero, committed_7, read_on = (TopicPartition("input", p) for p in range(4))
    committed = {never: None, zero: 0, committed_7: 7, read_on: None, TopicPartition(changelog, 0): None}
    sought_to_beginning = []

    async def upstream(self):
        return committed

    async def seek_to_beginning(*partitions):
        sought_to_beginning.extend(partitions)

    monkeypatch.setattr(faust_fixes.aiokafka_driver.AIOKafkaConsumerThread, "seek_to_committed", upstream)
    monkeypatch.setattr(thread, "seek_to_beginning", seek_to_beginning)
    monkeypatch.setitem(app.consumer._read_offset, read_on, 41)  # delivered up to 41: read again, dropped by ingest
    assert asyncio.run(thread.seek_to_committed()) == committed
    # The changelog is Faust's recovery's to position, not this seek's.
    assert sorted(sought_to_beginning) == [never, zero, read_on]


def test_faust_resumes_stream_partitions_before_it_seeks_them():
    """What ConsumerThread.getmany corrects: between these two steps the fetcher delivers stream messages from
    wherever the fetch position was, and Faust's own getmany drops fetched messages of a partition it does
    not count active (pinned below)."""
    calls = []
    stream, changelog = faust.types.TP("input", 0), faust.types.TP("changelog", 0)

    async def perform_seek():
        calls.append("perform_seek")

    async def nothing(*args, **kwargs):
        pass

    async def wait(coro, timeout=None):
        await coro

    consumer = SimpleNamespace(
        assignment=lambda: {stream, changelog}, perform_seek=perform_seek,
        resume_partitions=lambda tps: calls.append(("resume_partitions", sorted(tps))),
        resume_flow=lambda: calls.append("resume_flow"),
    )  # fmt: skip
    app = SimpleNamespace(
        consumer=consumer, consumer_generation_id=0, on_rebalance_complete=SimpleNamespace(send=nothing),
        conf=SimpleNamespace(broker_request_timeout=1),
        flow_control=SimpleNamespace(resume=lambda: calls.append("flow_control.resume")),
        _fetcher=SimpleNamespace(maybe_start=nothing), on_rebalance_end=lambda: None,
    )  # fmt: skip
    recovery = SimpleNamespace(
        app=app, log=SimpleNamespace(dev=print, info=print), _is_changelog_tp=lambda tp: tp == changelog,
        _wait=wait, completed=asyncio.Event(), tables=SimpleNamespace(on_actives_ready=print, on_standbys_ready=print),
    )  # fmt: skip
    asyncio.run(faust.tables.recovery.Recovery._resume_streams(recovery, generation_id=0))
    assert calls[:2] == [("resume_partitions", [stream]), "perform_seek"]


def test_fausts_getmany_drops_what_it_fetched_of_a_partition_not_active(app, monkeypatch):
    consumer = app.consumer
    active, paused = faust.types.TP("input", 0), faust.types.TP("input", 1)
    records = {active: [SimpleNamespace(offset=5)], paused: [SimpleNamespace(offset=341)]}

    async def wait_next_records(timeout):
        return records, {active}

    monkeypatch.setattr(consumer, "_wait_next_records", wait_next_records)
    monkeypatch.setattr(consumer, "_to_message", lambda tp, record: (tp, record.offset))
    monkeypatch.setattr(consumer, "highwater", lambda tp: 0)
    monkeypatch.setattr(consumer, "flow_active", True)

    async def delivered():
        return [message async for _, message in consumer.getmany(timeout=0)]

    assert asyncio.run(delivered()) == [(active, 5)]


def test_the_worker_fetches_a_paused_stream_partition_only_once_it_is_sought(app, monkeypatch):
    consumer, thread = app.consumer, app.consumer._thread
    changelog = faust.types.TP(next(iter(app.tables.values())).changelog_topic.get_topic_name(), 0)
    kept, taken = faust.types.TP("input", 0), faust.types.TP("input", 1)
    fetched_from = []

    async def upstream_getmany(self, active_partitions, timeout):
        fetched_from.append(sorted(active_partitions))
        return {}

    async def upstream_seek_to_committed(self):
        return {TopicPartition("input", 0): 12}

    monkeypatch.setattr(faust_fixes.aiokafka_driver.AIOKafkaConsumerThread, "getmany", upstream_getmany)
    monkeypatch.setattr(faust_fixes.aiokafka_driver.AIOKafkaConsumerThread, "seek_to_committed",
                        upstream_seek_to_committed)  # fmt: skip
    monkeypatch.setattr(consumer, "unsought", set())
    live = {kept, taken, changelog}

    async def rebalance():
        consumer.pause_partitions([kept, taken, changelog])
        await thread.getmany(live, timeout=0.01)  # only the changelog: the streams wait for their seek
        await consumer.seek_to_committed()  # seeks the kept partition
        live.clear()
        await thread.getmany(live, timeout=0.01)  # an empty set is no partition, not every partition
        await thread.getmany({kept, taken}, timeout=0.01)

    try:
        asyncio.run(rebalance())
    finally:
        consumer._paused_partitions.clear()
        consumer._get_active_partitions().clear()
    assert fetched_from == [[changelog], [kept]]
    assert consumer.unsought == {taken}


class SlowChannel:
    """A topic whose publish takes `seconds`, as a send to a topic missing from aiokafka's metadata does."""

    def __init__(self, seconds: float):
        self.seconds = seconds

    async def publish_message(self, fut, wait=False):
        await asyncio.sleep(self.seconds)
        fut.set_result("delivered")


def slow_message(seconds: float) -> FutureMessage:
    return FutureMessage(PendingMessage(SlowChannel(seconds), None, None, None, None, None, None, None, None))


def test_fausts_buffer_flush_gives_up_on_a_send_that_takes_over_a_tenth_of_a_second():
    """What faust_fixes.Producer.flush corrects: Faust awaits this before every commit."""

    async def flush_with_a_slow_send():
        buffer = ProducerBuffer()
        buffer.app = SimpleNamespace(conf=SimpleNamespace(producer_threaded=False))
        await buffer.start()
        try:
            messages = [slow_message(0.3), slow_message(0.3)]
            for message in messages:
                buffer.put(message)
            await buffer.flush()
            flushed = [message.done() for message in messages], buffer.size
            await asyncio.wait(messages)  # its own stop would flush again, and refuse while messages wait
            return flushed
        finally:
            await buffer.stop()

    assert asyncio.run(flush_with_a_slow_send()) == ([False, False], 1)


def test_the_worker_producer_flush_waits_for_every_queued_message(app):
    async def flush_with_a_slow_send():
        producer = faust_fixes.Producer(app.transport)
        await producer.buffer.start()
        try:
            messages = [slow_message(0.3), slow_message(0.3)]
            for message in messages:
                producer.send_soon(message)
            await producer.flush()
            return [message.done() for message in messages], producer.buffer.size, producer.undelivered
        finally:
            await producer.buffer.stop()

    assert asyncio.run(flush_with_a_slow_send()) == ([True, True], 0, set())


def test_modes_flow_control_empties_the_queues_on_resume():
    """What faust_fixes.KeepQueuesOnResume corrects (tests/test_flow_control.py checks the correction)."""
    flow = FlowControlEvent()
    queue = FlowControlQueue(flow_control=flow, clear_on_resume=True)
    flow.resume()
    queue.put_nowait("offset 41")
    flow.resume()
    assert queue.empty()


def test_fausts_own_commit_offset_stops_at_a_gap_over_acked_offsets(app):
    """robinhood/faust#625, what faust_fixes.Consumer._new_offset corrects (tests/test_worker_wiring.py checks
    the correction on the state traced in a takeover)."""
    consumer, tp = app.consumer, faust.types.TP("offsets-under-test", 0)
    acked = list(range(242, 301))
    consumer._acked[tp], consumer._acked_index[tp] = list(acked), set(acked)
    consumer._gap[tp] = IntervalTree.from_tuples([(243, 257)])
    consumer._committed_offset[tp] = 242
    try:
        upstream = super(faust_fixes.Consumer, consumer)._new_offset(tp)
    finally:
        for bookkeeping in (consumer._acked, consumer._acked_index, consumer._gap, consumer._committed_offset):
            bookkeeping.pop(tp)
    assert upstream == 244


@pytest.mark.parametrize("name", ["faust", "aiokafka"])
def test_a_release_other_than_the_tested_one_is_named_in_a_warning(monkeypatch, name):
    module = {"faust": faust, "aiokafka": aiokafka}[name]
    monkeypatch.setattr(module, "__version__", "9.9.9")
    assert faust_fixes.check_versions() == [
        f"{name} 9.9.9 is installed; crm_pulse.agents.faust_fixes was tested with {faust_fixes.TESTED_WITH[name]}.x: "
        "check that each correction there is still needed and still right (tests/test_faust_fixes.py)"
    ]


def test_an_aiokafka_batch_is_delivered_with_the_offset_of_its_first_record():
    """Producer.send_in_batches counts a partition's last offset from it, as RocksDB stores record it."""

    async def deliver():
        producer = aiokafka.AIOKafkaProducer(bootstrap_servers="127.0.0.1:9")  # never started
        builder = producer.create_batch()
        for value in (b"a", b"b", b"c"):
            builder.append(key=b"k", value=value, timestamp=None)
        batch = producer._message_accumulator._append_batch(builder, TopicPartition("t", 0))
        batch.done(base_offset=40)
        return (await batch.future).offset

    assert asyncio.run(deliver()) == 40


def test_fausts_table_records_each_changelog_records_offset_in_its_store(pipeline, monkeypatch):
    """The bookkeeping agents.batches.write_changelogged does itself, once per partition and batch, for the
    changelog records it sends outside Faust's per-key path (outside transactions, which this app never opens)."""
    table = pipeline.aggregates.kpi_sums
    recorded = []
    monkeypatch.setattr(table.data, "set_persisted_offset", lambda tp, offset: recorded.append((tp, offset)))
    sent = SimpleNamespace(result=lambda: SimpleNamespace(topic_partition=TopicPartition("t", 1), offset=41))
    table._on_changelog_sent(sent)
    assert recorded == [(TopicPartition("t", 1), 41)]
