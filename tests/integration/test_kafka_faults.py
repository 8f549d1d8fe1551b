"""Real broker faults on Apache Kafka (issue 16): each test runs a Kafka broker of its own with its log on
disk and a worker on it, and while a producer keeps sending events the broker is stopped with SIGTERM for
30 s, or killed with SIGKILL, and restarted on the same log; in the third fault the worker is also killed
with SIGKILL just as it recovers, and restarted. Each ends with the KPIs that a batch computation over the
events gives, and with exactly the KPIs and alerts of a clean worker that read the same events. The last
test pins down a producer hang that the clean worker ran into (crm_pulse.agents.faust_fixes.TopicTrackingProducer)."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections import Counter, deque
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack

import orjson
import pytest
from kafka import KafkaAdminClient, KafkaProducer
from kafka.admin import NewTopic

from crm_pulse.agents.faust_fixes import TopicTrackingProducer
from crm_pulse.generator import SyntheticCrm
from crm_pulse.kafka import KafkaBroker

from .conftest import Worker, on_kafka_only
from .test_broker_outage import landed
from .test_reliability import STABLE, by_id, kpis, processed, run_to_end, synthetic_events

pytestmark = [pytest.mark.integration, on_kafka_only]

OUTAGE_SECONDS = 30
EVENTS = synthetic_events(days=14)
# The first 30% are sent before the fault; the next 40% while the broker is away (paced over the outage,
# or all at once after a SIGKILL, whose broker restarts at once); the last 30% once it is back, paced over
# RECOVERY_FEED_SECONDS, while the worker recovers.
HEAD, DURING = len(EVENTS) * 3 // 10, len(EVENTS) * 7 // 10
RECOVERY_FEED_SECONDS = 10
# Sums over the `all` window that the batch computation checks: metric → (event type, payload field
# summed, or None to count the events).
BATCH = {
    "crm_new_leads": ("lead.created", None),
    "crm_activities": ("lead.activity", None),
    "crm_deals_won": ("deal.won", None),
    "crm_deals_lost": ("deal.lost", None),
    "crm_won_revenue": ("deal.won", "amount"),
    "crm_purchases": ("customer.purchase", None),
    "crm_purchase_revenue": ("customer.purchase", "amount"),
    "crm_renewals": ("customer.renewed", None),
    "crm_cancellations": ("customer.cancelled", None),
    "crm_nps_responses": ("survey.response", None),  # every synthetic survey has an NPS answer
    "crm_tickets_opened": ("ticket.opened", None),
    "crm_complaints": ("complaint.filed", None),
    "crm_user_actions": ("crm.user_activity", None),
}


def distinct(events: list[dict]) -> list[dict]:
    return list({event["event_id"]: event for event in events}.values())


def batch_kpis(events: list[dict]) -> dict[str, float]:
    """The `all` window of the BATCH metrics, computed from the distinct events alone."""
    return {metric: sum(1 if field is None else e["payload"][field] for e in distinct(events) if e["type"] == kind)
            for metric, (kind, field) in BATCH.items()}  # fmt: skip


def all_window(snapshot: dict) -> dict[str, float]:
    return {metric: dict(snapshot[metric])[(("window", "all"),)] for metric in BATCH}


def at_least_once_producer(worker: Worker) -> KafkaProducer:
    """A CRM's producer: idempotent, retrying each send for its default delivery timeout (120 s), and
    reconnecting within a second of the broker's return (kafka-python backs off up to 30 s by default)."""
    return KafkaProducer(bootstrap_servers=worker.bootstrap, linger_ms=5, reconnect_backoff_max_ms=1000)


def feed(producer: KafkaProducer, topic: str, events: list[dict], seconds: float) -> int:
    """Sends `events` at a steady pace over `seconds`, whatever the broker does meanwhile, until every one
    is acknowledged: any that fail even so are sent again (the worker drops copies by event_id). Returns
    how many sends it took."""
    failed: deque[dict] = deque()
    sends = 0

    def send(event: dict) -> None:
        nonlocal sends
        sends += 1
        future = producer.send(topic, key=SyntheticCrm.key(event), value=orjson.dumps(event))
        future.add_errback(lambda _: failed.append(event))

    began = time.monotonic()
    for i, event in enumerate(events):
        while failed:
            send(failed.popleft())
        send(event)
        time.sleep(max(0.0, began + (i + 1) * seconds / len(events) - time.monotonic()))
    producer.flush()
    while failed:
        while failed:
            send(failed.popleft())
        producer.flush()
    return sends


def ride_out(worker: Worker, seconds: float) -> None:
    """`seconds` without a broker: the worker must stay up and keep answering /metrics."""
    until = time.monotonic() + seconds
    while time.monotonic() < until:
        worker.metrics()  # raises if /metrics does not answer within 5 s
        assert worker.process.poll() is None, f"worker exited in the outage: {worker.log_path.read_text()[-5000:]}"
        time.sleep(1)


def all_alerts(worker: Worker) -> list[bytes]:
    """Every record on the worker's alerts topic, up to its end offsets."""
    return [record.value for record in worker.read("alerts", landed(worker, "alerts"))]


@pytest.fixture(scope="module")
def reference(broker, tmp_path_factory) -> tuple[dict, dict]:
    """(KPIs, alerts by id) of a clean worker over EVENTS on the session broker, for every fault."""
    worker = Worker(broker, tmp_path_factory.mktemp("reference"), **STABLE).start()
    try:
        worker.send(*EVENTS)
        final = run_to_end(worker, len(EVENTS))
        alerts = all_alerts(worker)
        assert final["crm_deals_won"] and alerts  # the scenario exercises KPIs and alerts
        assert len(by_id(alerts)) == len(alerts)
        assert all_window(final) == pytest.approx(batch_kpis(EVENTS))
        return final, by_id(alerts)
    finally:
        worker.stop()


# (c) restarts the worker: with RocksDB its tables come back from its data dir plus the changelogs' tail.
@pytest.mark.parametrize("fault, store", [("sigterm", "memory://"), ("sigkill", "memory://"),
                                          ("sigterm+worker-sigkill", "rocksdb://")])  # fmt: skip
def test_broker_fault_while_events_arrive_loses_nothing_and_counts_nothing_twice(reference, tmp_path, fault, store):
    reference_kpis, reference_alerts = reference
    timings: dict[str, float] = {}
    with ExitStack() as cleanup:
        broker = KafkaBroker(log_dir=tmp_path / "kafka").start()
        cleanup.callback(broker.stop)
        worker = Worker(broker, tmp_path, **STABLE, CRM_PULSE_STORE=store)
        cleanup.callback(worker.stop)
        producer = at_least_once_producer(worker)  # while the broker is up: it bootstraps from it
        cleanup.callback(producer.close, timeout=10)
        pool = ThreadPoolExecutor(1)  # one thread: each feed follows the one before, in order
        cleanup.callback(pool.shutdown, wait=False, cancel_futures=True)
        worker.start()
        worker.send(*EVENTS[:HEAD])
        worker.wait_for(lambda m: processed(m) >= HEAD, what="the first 30% processed")

        faulted_at = time.monotonic()
        if fault == "sigkill":
            broker.kill()  # as in a power loss: restarted at once, the log recovered from what was written
            fed = [pool.submit(feed, producer, worker.topic("input"), EVENTS[HEAD:DURING], 0)]
        else:
            broker.stop()
            fed = [pool.submit(feed, producer, worker.topic("input"), EVENTS[HEAD:DURING], OUTAGE_SECONDS)]
            ride_out(worker, OUTAGE_SECONDS)
        before = processed(worker.metrics())
        broker.start()
        back_at = time.monotonic()
        timings["broker away"] = back_at - faulted_at
        fed.append(pool.submit(feed, producer, worker.topic("input"), EVENTS[DURING:], RECOVERY_FEED_SECONDS))
        worker.wait_for(lambda m: processed(m) > before, what="processing to resume", timeout=120)
        timings["resumed after"] = time.monotonic() - back_at
        if fault == "sigterm+worker-sigkill":
            os.kill(worker.process.pid, signal.SIGKILL)  # mid-recovery: the backlog of the outage half read
            killed_at = time.monotonic()
            worker.process.wait(10)
            worker.start()  # same app id, topics and data dir
            timings["worker restarted in"] = time.monotonic() - killed_at
        sends = sum(sent.result(timeout=240) for sent in fed)
        timings["feed ended after"] = time.monotonic() - back_at

        # Every event processed: the restarted worker's counters began anew, so wait by the KPIs themselves.
        deadline = time.monotonic() + 180
        while kpis(worker) != reference_kpis and time.monotonic() < deadline:
            time.sleep(1)
        timings["caught up after"] = time.monotonic() - back_at
        final = worker.wait_until_settled("all topics committed to their end", timeout=120)
        time.sleep(2)  # a few stall scans at the final watermark
        alerts = all_alerts(worker)

        # Nothing lost, nothing counted twice: the batch computation, and the clean worker in full.
        assert all_window(kpis(worker)) == pytest.approx(batch_kpis(EVENTS))
        assert kpis(worker) == reference_kpis
        input_records = landed(worker, "input")
        assert input_records >= len(EVENTS) and landed(worker, "dlq") == 0
        if fault != "sigterm+worker-sigkill":  # one process all along: its counters saw every event
            assert worker.log_path.read_text().count("[^Worker]: Ready") == 1
            by_type = Counter(e["type"] for e in distinct(EVENTS))
            assert {dict(labels)["type"]: v for (name, labels), v in final.items()
                    if name == "crm_events_processed_total"} == by_type  # fmt: skip
            assert final[("crm_events_received_total", ())] >= input_records

        # Alerts at least once: the very records of the clean run, some maybe more than once. A fault re-sends
        # at most what was in flight when it struck (a produce whose answer it cut, a batch the killed worker
        # had not saved), once: an alert has at most one copy more per fault ("+" joins the faults).
        assert by_id(alerts) == reference_alerts
        copies = Counter(orjson.loads(alert)["alert_id"] for alert in alerts)
        assert max(copies.values()) <= 1 + len(fault.split("+")), copies.most_common(3)
        duplicates = len(alerts) - len(copies)
        print(f"\n[{fault}, {store}] events {len(EVENTS)} ({len(distinct(EVENTS))} distinct), sent {HEAD + sends}, "
              f"{input_records} on the input topic; lost 0, counted twice 0; alerts {len(alerts)} "
              f"({len(copies)} distinct, {duplicates} duplicates, at most {max(copies.values())} copies); "
              + ", ".join(f"{k} {v:.1f} s" for k, v in timings.items()))  # fmt: skip


def test_the_worker_producer_keeps_the_metadata_of_every_topic_it_sends_to(broker):
    """The hang behind TopicTrackingProducer (agents/app.py), which stalled a worker starting on a fresh
    broker twice in some 25 starts: a batch waits for a topic known from a full metadata fetch while a topic
    missing from it gets tracked. With aiokafka's own producer the topic drops out of the metadata and the
    batch is never delivered (its sender asks for metadata in a tight loop until the batch expires)."""
    bootstrap = broker.url.removeprefix("kafka://")
    topic = f"tracked-{os.getpid()}"
    admin = KafkaAdminClient(bootstrap_servers=bootstrap)
    admin.create_topics([NewTopic(topic, 1, 1)])
    admin.close()

    async def send_while_a_missing_topic_gets_tracked():
        producer = TopicTrackingProducer(bootstrap_servers=bootstrap, linger_ms=1000)
        await producer.start()
        try:
            while producer.client.cluster.partitions_for_topic(topic) is None:  # a full fetch, nothing tracked
                await producer.client.force_metadata_update()
            delivery = await producer.send(topic, b"x")  # lingers in the batch for 1 s
            await producer.client.add_topic(f"{topic}-missing")
            return await asyncio.wait_for(delivery, 10)
        finally:
            await producer.stop()

    assert asyncio.run(send_while_a_missing_topic_gets_tracked()).offset == 0
