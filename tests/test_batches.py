"""agents/batches.Batch: what a batch writes, pruned once per key and batch."""

import asyncio

from crm_pulse.agents.batches import Batch
from crm_pulse.streams.catalogue import apply_sums, prune_sums


class Message:  # what a written key belongs to (Faust's event); only referenced here
    pass


def test_each_key_is_pruned_once_before_it_is_written_to_its_newest_delta():
    table: dict = {}
    batch = Batch(table, dict, prune_sums)
    all_scope, rep = batch.state("all"), batch.state("rep:r1")
    for day in (100, 130, 164, 99):
        apply_sums(all_scope, day, {"won": 1})
    batch.touch("all", all_scope, Message())
    # Deltas on days 164 and then 99, kept 64 days: prune before day 100 (164 - 64), not 35 (99 - 64).
    batch.prune_before("all", 164 - 64)
    batch.prune_before("all", 99 - 64)
    apply_sums(rep, 10, {"won": 1})
    batch.touch("rep:r1", rep, Message())
    batch.prune_before("rep:r1", 10 - 64)
    assert set(all_scope["days"]) == {"99", "100", "130", "164"}  # nothing pruned before the batch is written
    asyncio.run(batch.commit())
    assert set(table["all"]["days"]) == {"100", "130", "164"}
    assert table["all"]["total"] == {"won": 4}  # the all-time total keeps the pruned day
    assert set(table["rep:r1"]["days"]) == {"10"}
