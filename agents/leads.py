"""Lead pipeline family: per-lead state (keyed by lead), its stage-dwell, sales-cycle and conversion
deltas, and stalled-lead alerts, from events and from a timer."""

from __future__ import annotations

import logging
from collections import Counter

from prometheus_client.core import GaugeMetricFamily

from agents.aggregates import DeltaSender, stage_p90
from agents.app import actor_activity_topic, alerts_topic, app, clock, settings, valid_topic
from agents.loops import first_seen_events
from agents.metrics import ALERTS_EMITTED, EVENTS_PROCESSED, export_gauges
from streams.clock import UpstreamWatermark
from streams.leads import UNASSIGNED, apply_lead_event, check_stall, current_stage, is_open, new_lead
from streams.routing import LEAD_TYPES

log = logging.getLogger(__name__)
policy = settings.stall_policy

# use_partitioner: the stall timer updates leads outside any event; the key's hash picks the partition,
# which is the lead's partition of the valid-events topic, keyed the same way.
leads = app.Table("leads", default=None, partitions=settings.partitions, key_type=str, use_partitioner=True)
# Refreshed by each stall scan, so scrapes never walk every lead.
lead_gauges: dict[str, Counter] = {"open": Counter(), "stalled": Counter(), "value": Counter()}
processed = UpstreamWatermark()


def stall_now_ms() -> int | None:
    """The time idle leads are compared against: the wall clock live, else how far this agent has got."""
    return clock.now_ms() if clock.mode == "wall" else processed.watermark_ms


@app.on_partitions_assigned.connect
async def forget_moved_partitions(sender, assigned, **kwargs) -> None:
    processed.keep_only(tp.partition for tp in assigned if tp.topic == valid_topic.get_topic_name())


def threshold_at(now_ms: int):
    def threshold(stage: str) -> tuple[int, str]:
        return policy.threshold(stage, *stage_p90(stage, now_ms))

    return threshold


async def publish_alerts(alerts: list[dict]) -> None:
    """Publish and wait until the broker has them: the lead's stall level is saved only afterwards, so a
    crash in between raises an alert again (same alert_id) rather than losing it."""
    pending = [await alerts_topic.send(key=alert["rep_id"], value=alert) for alert in alerts]
    for future, alert in zip(pending, alerts):
        await future
        ALERTS_EMITTED.labels(alert["type"]).inc()


@app.agent(valid_topic)
async def track_leads(stream):
    async for message, lead_id, event, lead in first_seen_events(stream, LEAD_TYPES, leads, new_lead, processed):
        fact_deltas, alerts = apply_lead_event(lead, event, lead_id, policy, threshold_at(event["occurred_at"]))
        deltas = DeltaSender("leads", message.message)
        await deltas.facts(fact_deltas, event)
        if event["type"] == "lead.activity" and event.get("rep_id"):
            await deltas.send(actor_activity_topic, f"rep:{event['rep_id']}", {"at": event["occurred_at"]})
        await publish_alerts(alerts)
        await deltas.delivered()
        leads[lead_id] = lead
        EVENTS_PROCESSED.labels(event["type"]).inc()


@app.timer(settings.stall_scan_seconds)
async def scan_for_stalls():
    now = stall_now_ms()
    if now is None:
        return
    threshold = threshold_at(now)
    alerts: list[dict] = []
    raised_for: dict[str, dict] = {}
    gauges = {name: Counter() for name in lead_gauges}
    for lead_id, lead in list(leads.items()):
        if not is_open(lead, policy):
            continue
        raised = check_stall(lead, lead_id, now, policy, threshold)
        if raised:
            raised_for[lead_id] = lead
            alerts += raised
        stage = current_stage(lead)
        gauges["open"][stage] += 1
        gauges["value"][stage] += lead.get("quote_amount") or 0
        if lead["stall_level"]:
            gauges["stalled"][(lead["rep"] or UNASSIGNED, stage)] += 1
    lead_gauges.update(gauges)
    await publish_alerts(alerts)
    for lead_id, lead in raised_for.items():
        leads[lead_id] = lead


@export_gauges
def collect():
    open_leads = GaugeMetricFamily("crm_leads_open", "Open leads by current stage.", labels=["stage"])
    pipeline_value = GaugeMetricFamily(
        "crm_pipeline_open_value", "Open pipeline value (latest quote of each open lead) by stage.", labels=["stage"]
    )
    for stage, n in sorted(lead_gauges["open"].items()):
        open_leads.add_metric([stage], n)
        pipeline_value.add_metric([stage], lead_gauges["value"][stage])
    stalled = GaugeMetricFamily(
        "crm_leads_stalled", "Open leads currently stalled, by rep and stage.", labels=["rep", "stage"]
    )
    for (rep, stage), n in sorted(lead_gauges["stalled"].items()):
        stalled.add_metric([rep, stage], n)
    watermark = GaugeMetricFamily(
        "crm_event_time_watermark_seconds",
        "Event-time watermark: the latest event time of this worker's slowest input partition (Unix seconds).",
    )
    if clock.watermark_ms is not None:
        watermark.add_metric([], clock.watermark_ms / 1000)
    return [open_leads, pipeline_value, stalled, watermark]
