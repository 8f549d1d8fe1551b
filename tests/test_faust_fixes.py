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


def test_the_worker_seeks_partitions_never_committed_nor_read_to_their_beginning(app, monkeypatch):
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
    monkeypatch.setitem(app.consumer._read_offset, read_on, 41)  # this process delivered up to 41: it goes on
    assert asyncio.run(thread.seek_to_committed()) == committed
    # The changelog is Faust's recovery's to position, not this seek's.
    assert sorted(sought_to_beginning) == [never, zero]


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
