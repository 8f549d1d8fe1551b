"""Lead pipeline family: per-lead state (keyed by lead), stage-dwell and deal-outcome deltas, stall alerts."""

from __future__ import annotations

import logging
from collections import Counter

from prometheus_client.core import GaugeMetricFamily

from agents.app import alerts_topic, app, clock, dwell_deltas_topic, outcome_deltas_topic, settings, valid_topic
from agents.metrics import ALERTS_EMITTED, EVENTS_DUPLICATE, EVENTS_PROCESSED, export_gauges
from agents.stage_dwell import stage_p90
from streams.leads import (
    UNASSIGNED,
    apply_lead_event,
    check_stall,
    current_stage,
    is_open,
    new_lead,
)
from streams.routing import LEAD_TYPES, first_seen, outcome_deltas

log = logging.getLogger(__name__)
policy = settings.stall_policy
dedupe_horizon_ms = int(settings.dedupe_horizon_seconds * 1000)

# use_partitioner: the stall timer updates leads outside any event; the key's hash picks the partition,
# which is the lead's partition of the valid-events topic, keyed the same way.
leads = app.Table("leads", default=None, partitions=settings.partitions, key_type=str, use_partitioner=True)
# Refreshed by each stall scan, so scrapes never walk every lead.
lead_gauges: dict[str, Counter] = {"open": Counter(), "stalled": Counter()}


def threshold_at(now_ms: int):
    def threshold(stage: str) -> tuple[int, str]:
        return policy.threshold(stage, *stage_p90(stage, now_ms))

    return threshold


async def publish_alerts(alerts: list[dict]) -> None:
    for alert in alerts:
        await alerts_topic.send(key=alert["rep_id"], value=alert)
        ALERTS_EMITTED.labels(alert["type"]).inc()


@app.agent(valid_topic)
async def track_leads(stream):
    async for lead_id, event in stream.items():
        if event["type"] not in LEAD_TYPES:
            continue
        lead = leads.get(lead_id) or new_lead()
        if not first_seen(lead, event, clock.watermark_ms, dedupe_horizon_ms):
            EVENTS_DUPLICATE.labels(event["type"]).inc()
            continue
        dwell_deltas, alerts = apply_lead_event(lead, event, lead_id, policy, threshold_at(event["occurred_at"]))
        leads[lead_id] = lead
        EVENTS_PROCESSED.labels(event["type"]).inc()
        for stage, left_at, dwell_ms, sign in dwell_deltas:
            await dwell_deltas_topic.send(key=stage, value={"left_at": left_at, "dwell_ms": dwell_ms, "sign": sign})
        if event["type"] in ("deal.won", "deal.lost"):
            for scope, delta in outcome_deltas(event):
                await outcome_deltas_topic.send(key=scope, value=delta)
        await publish_alerts(alerts)


@app.timer(settings.stall_scan_seconds)
async def scan_for_stalls():
    now = clock.now_ms()
    if now is None:
        return
    threshold = threshold_at(now)
    alerts: list[dict] = []
    open_by_stage: Counter = Counter()
    stalled_by_rep_stage: Counter = Counter()
    for lead_id, lead in list(leads.items()):
        if not is_open(lead, policy):
            continue
        raised = check_stall(lead, lead_id, now, policy, threshold)
        if raised:
            leads[lead_id] = lead
            alerts += raised
        stage = current_stage(lead)
        open_by_stage[stage] += 1
        if lead["stall_level"]:
            stalled_by_rep_stage[(lead["rep"] or UNASSIGNED, stage)] += 1
    lead_gauges["open"], lead_gauges["stalled"] = open_by_stage, stalled_by_rep_stage
    await publish_alerts(alerts)


@export_gauges
def collect():
    open_leads = GaugeMetricFamily("crm_leads_open", "Open leads by current stage.", labels=["stage"])
    for stage, n in sorted(lead_gauges["open"].items()):
        open_leads.add_metric([stage], n)
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
    return [open_leads, stalled, watermark]
