"""How the worker's Faust app is wired where Faust's or Python's defaults do not fit: the fetch wait its
consumer asks the broker for, the offsets it commits, the codec its tables write with, what is loaded frozen
before it starts, and the KPI samples a scrape reuses."""

import asyncio
import gc
import weakref

import orjson
import pytest
from faust.types import TP
from intervaltree import IntervalTree

from crm_pulse.agents.app import key_partition
from crm_pulse.agents.worker import freeze_what_is_loaded
from crm_pulse.streams.catalogue import apply_sums
from crm_pulse.streams.dedupe import already_applied


@pytest.mark.parametrize(("kind", "configured", "expected"),
                         [("tansu", None, 20), ("kafka", None, 1500), ("kafka", 100, 100), ("tansu", 5, 5)])  # fmt: skip
def test_the_consumer_asks_the_broker_to_hold_an_empty_fetch_no_longer_than_configured(
    app, settings, monkeypatch, kind, configured, expected
):
    # Faust's own value is 1,500 ms: Apache Kafka answers a fetch as soon as data arrives, but Tansu holds
    # every fetch that long, so on Tansu the worker asks for 20 ms unless told otherwise.
    configured_settings = settings.model_copy(update={"broker_kind": kind, "fetch_max_wait_ms": configured})
    monkeypatch.setattr(app, "fetch_max_wait_ms", configured_settings.effective_fetch_max_wait_ms)

    async def build():
        consumer = app.consumer._thread._create_worker_consumer(app.transport)
        await consumer.stop()  # never started: only releases what construction took
        return consumer

    assert asyncio.run(build())._fetch_max_wait_ms == expected


@pytest.fixture
def committable(app):
    def committable(acked: list[int], gaps: list[tuple[int, int]], committed: int) -> int | None:
        """The offset the worker's consumer would commit for a partition in this state of its bookkeeping."""
        consumer, tp = app.consumer, TP("offsets-under-test", 0)
        consumer._acked[tp], consumer._acked_index[tp] = list(acked), set(acked)
        consumer._gap[tp] = IntervalTree.from_tuples(gaps)
        consumer._committed_offset[tp] = committed
        try:
            return consumer._new_offset(tp)
        finally:
            for bookkeeping in (consumer._acked, consumer._acked_index, consumer._gap, consumer._committed_offset):
                bookkeeping.pop(tp)

    return committable


def test_a_gap_over_offsets_already_acked_does_not_hold_the_commit_back(committable):
    # As traced in a takeover: 242-255 were delivered and acked between the flow's resume and the seek back
    # to 242, the next one read was 256, and Faust filed 243-256 as a gap. (Faust alone commits 244 here,
    # then one offset more per commit interval.)
    before_seek, after_seek = list(range(242, 256)), list(range(256, 301))
    assert committable(before_seek + after_seek, [(243, 257)], committed=242) == 301


def test_a_gap_still_counts_as_read_and_a_hole_still_holds_the_commit(committable):
    # Offsets never delivered (transaction markers, compaction) are a gap; one delivered but unacked is not.
    assert committable([10, 11, 14, 15], [(12, 14)], committed=10) == 16
    assert committable([10, 11, 14, 15], [], committed=10) == 12


def test_every_table_writes_its_changelog_and_store_with_orjson(app):
    state = {"days": {"20400": {"leads": 3}}, "applied": {"leads@x:0": [7, 1]}, "share": 0.25}
    for table in app.tables.values():
        # Table.send_changelog encodes with the table's serializer; the store decodes what recovery reads.
        assert table.value_serializer == table.data.value_serializer == "orjson", table.name
        encoded, _headers = table.changelog_topic.prepare_value(state, table.value_serializer)
        assert encoded == orjson.dumps(state) and table.data._decode_value(encoded) == state, table.name


def test_before_the_worker_starts_what_is_loaded_is_frozen_and_garbage_collected():
    class Node:
        pass

    garbage = Node()
    garbage.me = garbage  # a cycle: only the cyclic GC frees it
    gone = weakref.ref(garbage)
    del garbage
    loaded = Node()
    try:
        freeze_what_is_loaded()
        assert gone() is None  # collected, not frozen for good
        assert not any(obj is loaded for obj in gc.get_objects())  # frozen: in no generation the GC walks
    finally:
        gc.unfreeze()


def test_a_scopes_kpi_samples_are_recomputed_once_its_deltas_or_the_day_move(pipeline):
    scope_samples = pipeline.gauges.scope_samples

    def new_leads(samples, window):
        return next(r for kpi, _dimension, labels, r in samples if kpi.name == "new_leads" and labels == ["rep-7", window])

    state, day = {}, 20_000
    for offset in (1, 2):  # two leads created on `day`, as aggregate_sums applies their deltas
        assert not already_applied(state, "leads@lead-events:0", offset, 0)
        apply_sums(state, day, {"leads": 1})
    first = scope_samples("rep:rep-7", state, day)
    assert new_leads(first, "7d") == new_leads(first, "all") == 2
    assert scope_samples("rep:rep-7", state, day) is first  # nothing moved: the cached samples

    assert not already_applied(state, "leads@lead-events:3", 1, 0)
    apply_sums(state, day + 1, {"leads": 1})
    assert new_leads(scope_samples("rep:rep-7", state, day + 1), "7d") == 3
    assert new_leads(scope_samples("rep:rep-7", state, day + 7), "7d") == 1  # the 7 days now start at day + 1


def test_a_rebalance_keeps_only_the_keys_of_the_tables_own_partitions(pipeline, settings):
    kpi_sums, drop_keys_now_owned_elsewhere = pipeline.aggregates.kpi_sums, pipeline.drop_keys_now_owned_elsewhere

    local = kpi_sums.data.data  # the in-memory store's dict
    own = key_partition("all", settings.partitions)
    changelog = kpi_sums.changelog_topic.get_topic_name()
    others = {TP(changelog, p) for p in range(settings.partitions) if p != own}
    # Faust's leader topic has one partition, 0: holding it (or any other topic's partition `own`) does not
    # make the key's changelog partition this worker's.
    for assigned, kept in ((others | {TP(f"{settings.app_id}-__assignor-__leader", own)}, False),
                           (others | {TP(changelog, own)}, True)):  # fmt: skip
        local["all"] = {"applied": {}}
        asyncio.run(drop_keys_now_owned_elsewhere(None, assigned))
        assert ("all" in local) is kept
    local.pop("all", None)
