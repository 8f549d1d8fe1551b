"""Lead pipeline family: per-lead state (keyed by lead), its stage-dwell, sales-cycle and conversion
deltas, and stalled-lead alerts, from events and from a timer."""

from __future__ import annotations

import asyncio
import functools
import logging

from prometheus_client import Histogram
from prometheus_client.core import GaugeMetricFamily

from crm_pulse.agents.aggregates import DeltaSender, stage_p90
from crm_pulse.agents.app import (
    actor_activity_topic,
    alerts_topic,
    app,
    clock,
    family_topics,
    key_partition,
    settings,
    stall_levels_topic,
    table,
)
from crm_pulse.agents.batches import BATCH_MAX_EVENTS, BATCH_WITHIN_SECONDS, Batch, unseen_events, upstream_watermark
from crm_pulse.agents.metrics import ALERTS_EMITTED, EVENTS_PROCESSED, export_gauges
from crm_pulse.streams.kpis import day_of
from crm_pulse.streams.leads import apply_lead_event, apply_stall_record, check_stall, new_lead, stall_record
from crm_pulse.streams.stall_index import StallIndex

log = logging.getLogger(__name__)
policy = settings.stall_policy

leads = table("leads", default=None)
# The agent reads the lead events and the stall levels the timer raised, both keyed by lead.
lead_events = family_topics["lead"]
lead_inputs = app.topic(
    lead_events.get_topic_name(), stall_levels_topic.get_topic_name(),
    internal=True, partitions=settings.partitions, key_type=str,  # declared: created with the app's partitions
)  # fmt: skip
index = StallIndex(policy)
# Raised by the timer and not yet folded into the lead's state by the agent: applied first by either path.
raised_stalls: dict[str, dict] = {}
processed = upstream_watermark(lead_events)
between_batches = asyncio.Lock()
STALL_SCAN_SECONDS = Histogram(
    "crm_stall_scan_duration_seconds", "Stall scan ticks: finding the leads due, raising and publishing their alerts.",
    buckets=(0.001, 0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
)  # fmt: skip


def stall_now_ms() -> int | None:
    """The time idle leads are compared against: the wall clock live, else how far this agent has got."""
    return clock.now_ms() if clock.mode == "wall" else processed.watermark_ms


@app.on_partitions_assigned.connect
async def forget_moved_partitions(sender, assigned, **kwargs) -> None:
    # The leads' own partitions: a partition number held of another topic says nothing of these.
    mine = {tp.partition for tp in assigned if tp.topic == leads.changelog_topic.get_topic_name()}
    for lead_id in [k for k in raised_stalls if key_partition(k, settings.partitions) not in mine]:
        del raised_stalls[lead_id]


@leads.on_recover
async def rebuild_index() -> None:
    """After every rebalance, from the leads this worker now owns (restored from the changelog)."""
    index.rebuild(leads.items())


def threshold_at(now_ms: int):
    @functools.cache
    def threshold(stage: str) -> tuple[int, str]:
        return policy.threshold(stage, *stage_p90(stage, now_ms))

    return threshold


def publish_alerts(alerts: list[dict]) -> list[tuple]:
    """Queue alerts in order; (delivery future, count it) for each, to await before saving the stall levels
    they announce, so a crash in between raises an alert again (same alert_id) rather than losing it."""
    return [(alerts_topic.send_soon(key=alert["rep_id"], value=alert), ALERTS_EMITTED.labels(alert["type"]).inc)
            for alert in alerts]  # fmt: skip


def fold_raised_stall(lead_id: str, lead: dict) -> None:
    if (record := raised_stalls.pop(lead_id, None)) is not None:
        apply_stall_record(lead, record)


@app.agent(lead_inputs)
async def track_leads(stream):
    async for events in stream.take_events(BATCH_MAX_EVENTS, BATCH_WITHIN_SECONDS):
        # The stall timer decides only between batches: never on state a batch has changed but not saved.
        async with between_batches:
            batch = Batch(leads, new_lead)
            # Per day of event time: thresholds depend on the day's 30-day window and on the dwell
            # histograms, which do not change within a batch.
            thresholds: dict[int, object] = {}
            for received in events:
                if received.message.topic == stall_levels_topic.get_topic_name():
                    lead = batch.state(received.key)
                    if apply_stall_record(lead, received.value):
                        batch.touch(received.key, lead, received)
                    if raised_stalls.get(received.key) == received.value:
                        del raised_stalls[received.key]
                    continue
                deltas = DeltaSender("leads", batch, received)
                for lead_id, event, lead in unseen_events(batch, received, processed):
                    fold_raised_stall(lead_id, lead)
                    day = day_of(event["occurred_at"])
                    if day not in thresholds:
                        thresholds[day] = threshold_at(event["occurred_at"])
                    fact_deltas, alerts = apply_lead_event(lead, event, lead_id, policy, thresholds[day])
                    deltas.facts(fact_deltas, event)
                    if event["type"] == "lead.activity" and event.get("rep_id"):
                        deltas.send(actor_activity_topic, f"rep:{event['rep_id']}", {"at": event["occurred_at"]})
                    for future, on_delivered in publish_alerts(alerts):
                        batch.sent(future, on_delivered)
                    EVENTS_PROCESSED.labels(event["type"]).inc()
            await batch.commit()
            for lead_id, (lead, _) in batch.touched.items():
                index.update(lead_id, lead)


@app.timer(settings.stall_scan_seconds)
async def scan_for_stalls():
    now = stall_now_ms()
    if now is None:
        return
    with STALL_SCAN_SECONDS.time():
        async with between_batches:
            threshold = threshold_at(now)
            alerts: list[dict] = []
            raised: dict[str, dict] = {}
            for lead_id in index.due(now, threshold):
                lead = dict(leads[lead_id])  # a copy: the agent alone writes the table
                fold_raised_stall(lead_id, lead)
                alerts += check_stall(lead, lead_id, now, policy, threshold)
                raised[lead_id] = raised_stalls[lead_id] = stall_record(lead)
                index.update(lead_id, lead)
            # Queued before the agent can clear any of them: in the order decided.
            published = publish_alerts(alerts)
        for future, on_delivered in published:
            await future
            on_delivered()
        # Only after the alerts: a crash in between raises them again rather than losing them.
        for future in [stall_levels_topic.send_soon(key=lead_id, value=record) for lead_id, record in raised.items()]:
            await future


@export_gauges
def collect():
    open_leads = GaugeMetricFamily("crm_leads_open", "Open leads by current stage.", labels=["stage"])
    pipeline_value = GaugeMetricFamily(
        "crm_pipeline_open_value", "Open pipeline value (latest quote of each open lead) by stage.", labels=["stage"]
    )
    for stage, n in sorted(index.open_by_stage.items()):
        open_leads.add_metric([stage], n)
        pipeline_value.add_metric([stage], index.value_by_stage[stage])
    stalled = GaugeMetricFamily(
        "crm_leads_stalled", "Open leads currently stalled, by rep and stage.", labels=["rep", "stage"]
    )
    for (rep, stage), n in sorted(index.stalled_by_rep_stage.items()):
        stalled.add_metric([rep, stage], n)
    watermark = GaugeMetricFamily(
        "crm_event_time_watermark_seconds",
        "Event-time watermark: the latest event time of this worker's slowest input partition (Unix seconds).",
    )
    if clock.watermark_ms is not None:
        watermark.add_metric([], clock.watermark_ms / 1000)
    return [open_leads, pipeline_value, stalled, watermark]
