"""Two workers in one group give the same KPIs and alerts as one, each KPI series exported by exactly one,
and when one stops mid-stream the survivor ends with exactly what one worker would have."""

from __future__ import annotations

import time

import pytest

from tests.integration.test_reliability import (
    STABLE,
    alerts,
    by_id,
    kpis,
    processed,
    run_to_end,
    synthetic_events,
)

pytestmark = pytest.mark.integration

# Per-worker series: each worker counts its own leads (sum them).
SUMMABLE = {"crm_leads_open", "crm_pipeline_open_value", "crm_leads_stalled"}


def partitions(worker) -> list[int]:
    return worker.get_json("/kpis")[1]["partitions"]


def merged(*snapshots: dict) -> dict:
    """One view of several workers' /kpis: owned series must come from exactly one worker."""
    owned: dict[str, dict] = {}
    summed: dict[str, dict] = {}
    for snapshot in snapshots:
        for name, samples in snapshot.items():
            for labels, value in samples:
                if name in SUMMABLE:
                    summed.setdefault(name, {})[labels] = round(summed.get(name, {}).get(labels, 0) + value, 6)
                else:
                    assert labels not in owned.setdefault(name, {}), f"{name}{dict(labels)} exported twice"
                    owned[name][labels] = value
    return {name: sorted(series.items()) for name, series in {**owned, **summed}.items()}


def one_worker(start_worker, events: list[dict]) -> tuple[dict, dict]:
    """(KPIs, alerts by id) of a single worker over the events: what a group of workers must equal."""
    reference = start_worker(**STABLE)
    reference.send(*events)
    return merged(run_to_end(reference, len(events))), by_id(alerts(reference))


def test_two_workers_equal_one(start_worker):
    events = synthetic_events(days=20, seed=5)
    expected, expected_alerts = one_worker(start_worker, events)

    first = start_worker(**STABLE)
    second = start_worker(sibling_of=first)
    first.send(*events)
    for worker in (first, second):
        worker.wait_for(lambda m: len(partitions(worker)) == 2, what="two partitions each", timeout=120)
        worker.wait_until_settled("both workers caught up", timeout=300)
    first.wait_until_group_settled("the group caught up", timeout=300)
    time.sleep(2)  # a few stall scans at the final watermark
    two = merged(kpis(first), kpis(second))
    assert two == expected
    assert by_id(alerts(first)) == expected_alerts
    assert kpis(first) and kpis(second), "both workers own part of the work"


def test_when_one_of_two_stops_mid_stream_the_survivor_loses_nothing(start_worker):
    events = synthetic_events(days=20, seed=6)
    expected, expected_alerts = one_worker(start_worker, events)

    survivor = start_worker(**STABLE)
    leaving = start_worker(sibling_of=survivor)
    leaving.wait_for(lambda m: len(partitions(leaving)) == 2, what="two partitions each", timeout=120)
    survivor.send(*events)
    leaving.wait_for(lambda m: processed(m) >= len(events) * 0.2, what="part of the events", timeout=240)
    leaving.stop()
    survivor.wait_for(lambda m: len(partitions(survivor)) == 4, what="the survivor owning every partition", timeout=120)
    survivor.wait_until_settled("the survivor caught up", timeout=300)
    survivor.wait_until_group_settled("the group caught up", timeout=300)
    time.sleep(2)  # a few stall scans at the final watermark
    # The leaving worker's series left with it; the survivor alone must now export one worker's.
    assert merged(kpis(survivor)) == expected
    assert by_id(alerts(survivor)) == expected_alerts


def test_a_worker_joining_mid_stream_loses_nothing(start_worker):
    """The older worker is mid-stream when the group rebalances: it gives up half its partitions, restores
    nothing for those it keeps, and must not crash on leads that moved (its stall timer looked one up once it
    was gone, a KeyError that stopped the worker on Apache Kafka)."""
    events = synthetic_events(days=60, seed=5)
    expected, expected_alerts = one_worker(start_worker, events)

    first = start_worker(**STABLE)
    first.send(*events)
    first.wait_for(lambda m: processed(m) >= len(events) * 0.05, what="part of the events", timeout=240)
    second = start_worker(sibling_of=first)
    for worker in (first, second):
        worker.wait_for(lambda m: len(partitions(worker)) == 2, what="two partitions each", timeout=120)
        worker.wait_until_settled("both workers caught up", timeout=300)
    first.wait_until_group_settled("the group caught up", timeout=300)
    time.sleep(2)  # a few stall scans at the final watermark
    assert merged(kpis(first), kpis(second)) == expected
    assert by_id(alerts(first)) == expected_alerts
