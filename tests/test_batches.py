"""agents/batches.Batch: what a batch writes, pruned once per key and batch, and the changelog records it
sends for those writes (tests/integration/test_changelog_batches.py sends them to a broker)."""

import asyncio
from types import SimpleNamespace

import pytest

from crm_pulse.agents.batches import Batch
from crm_pulse.streams.catalogue import apply_sums, prune_sums


class Event:  # what a written key belongs to (Faust's event): the message it came in
    def __init__(self, partition: int):
        self.message = SimpleNamespace(partition=partition)



@pytest.fixture
def table(pipeline):
    table = pipeline.aggregates.kpi_sums
    yield table
    table.data.clear()


def test_each_key_is_pruned_once_before_it_is_written_to_its_newest_delta(table):
    batch = Batch(table, dict, prune_sums)
    all_scope, rep = batch.state("all"), batch.state("rep:r1")
    for day in (100, 130, 164, 99):
        apply_sums(all_scope, day, {"won": 1})
    batch.touch("all", all_scope, Event(0))
    # Deltas on days 164 and then 99, kept 64 days: prune before day 100 (164 - 64), not 35 (99 - 64).
    batch.prune_before("all", 164 - 64)
    batch.prune_before("all", 99 - 64)
    apply_sums(rep, 10, {"won": 1})
    batch.touch("rep:r1", rep, Event(1))
    batch.prune_before("rep:r1", 10 - 64)
    assert set(all_scope["days"]) == {"99", "100", "130", "164"}  # nothing pruned before the batch is written
    batch.write_touched()
    assert set(table["all"]["days"]) == {"100", "130", "164"}
    assert table["all"]["total"] == {"won": 4}  # the all-time total keeps the pruned day
    assert set(table["rep:r1"]["days"]) == {"10"}


@pytest.fixture
def current_loop():
    """A current event loop for Faust's future messages, whatever an earlier test's asyncio.run() left."""
    loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)
    yield loop
    asyncio.set_event_loop(None)
    loop.close()


def test_a_batch_writes_each_key_once_with_the_changelog_record_fausts_table_would_send(table, current_loop):
    """Per changelog partition (its key's message's), in the order touched, the key and value bytes that
    Faust's Table.send_changelog gives its changelog topic for the same write: what recovery reads back."""
    batch = Batch(table, dict)
    writes = [("all", {"total": {"won": 3}}, 2), ("rep:r1", {"total": {"calls": 1}}, 0), ("source:web", {}, 2)]
    for key, state, partition in writes:
        batch.touch(key, {"stale": True}, Event(3))
        batch.touch(key, state, Event(partition))  # the key's last message decides
    records = batch.write_touched()

    def fausts(key, value, partition):
        pending = table.changelog_topic.as_future_message(
            key=key, value=value, partition=partition, key_serializer=table.key_serializer,
            value_serializer=table.value_serializer, eager_partitioning=True,
        ).message  # fmt: skip
        assert pending.headers == {} and pending.timestamp is None  # what the batch leaves out, the producer sets
        return pending.partition, (pending.key, pending.value)

    expected: dict[int, list] = {}
    for key, state, partition in writes:
        at, record = fausts(key, state, partition)
        expected.setdefault(at, []).append(record)
    assert records == expected
    assert records[2] == [(b'"all"', b'{"total":{"won":3}}'), (b'"source:web"', b"{}")]
    assert {key: table[key] for key, _, _ in writes} == {key: state for key, state, _ in writes}


def test_the_table_sends_nothing_through_fausts_per_key_path(table, monkeypatch):
    def per_key_send(*args, **kwargs):
        raise AssertionError("a changelog message sent per key")

    monkeypatch.setattr(table, "send_changelog", per_key_send)
    batch = Batch(table, dict)
    batch.touch("all", {"total": {}}, Event(1))
    assert list(batch.write_touched()) == [1]
