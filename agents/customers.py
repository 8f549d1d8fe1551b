"""Customer family: per-customer subscription history (keyed by customer), churn and retention over 30 days."""

from __future__ import annotations

from prometheus_client.core import GaugeMetricFamily

from agents.app import app, churn_deltas_topic, clock, settings, valid_topic
from agents.metrics import EVENTS_DUPLICATE, EVENTS_PROCESSED, export_gauges
from streams.kpis import CHURN_WINDOW_DAYS, advance_churn_horizon, apply_spell, churn, day_of
from streams.routing import CUSTOMER_TYPES, OVERALL, apply_customer_event, first_seen

dedupe_horizon_ms = int(settings.dedupe_horizon_seconds * 1000)
HORIZON_SLACK_DAYS = CHURN_WINDOW_DAYS + int(settings.grace_seconds // 86400) + 2

customers = app.Table("customers", default=dict, partitions=settings.partitions, key_type=str)
# One key ("all"): the churn of the whole customer base is owned by whichever worker holds its partition.
customer_base = app.Table("customer-base", default=dict, partitions=settings.partitions, key_type=str)


@app.agent(valid_topic)
async def track_customers(stream):
    async for customer_id, event in stream.items():
        if event["type"] not in CUSTOMER_TYPES:
            continue
        customer = customers[customer_id]
        if not first_seen(customer, event, clock.watermark_ms, dedupe_horizon_ms):
            EVENTS_DUPLICATE.labels(event["type"]).inc()
            continue
        spell_deltas = apply_customer_event(customer, event)
        customers[customer_id] = customer
        EVENTS_PROCESSED.labels(event["type"]).inc()
        for start_day, end_day, sign in spell_deltas:
            await churn_deltas_topic.send(
                key=OVERALL, value={"start": start_day, "end": end_day, "sign": sign, "at": event["occurred_at"]}
            )


@app.agent(churn_deltas_topic)
async def aggregate_churn(stream):
    async for scope, delta in stream.items():
        state = customer_base[scope]
        advance_churn_horizon(state, day_of(delta["at"]) - HORIZON_SLACK_DAYS)
        apply_spell(state, delta["start"], delta["end"], delta["sign"])
        customer_base[scope] = state


@export_gauges
def collect():
    window = f"{CHURN_WINDOW_DAYS}d"
    families = {
        "churn": GaugeMetricFamily(
            "crm_churn_ratio", "Customers active at the window start who cancelled in it, over those active at its start.",
            labels=["window"],
        ),
        "retention": GaugeMetricFamily("crm_retention_ratio", "1 - churn ratio.", labels=["window"]),
        "start": GaugeMetricFamily(
            "crm_customers_active_at_window_start", "Customers active when the window opened.", labels=["window"]
        ),
        "churned": GaugeMetricFamily(
            "crm_customers_churned", "Customers active at the window start who cancelled in it.", labels=["window"]
        ),
        "active": GaugeMetricFamily("crm_customers_active", "Customers with an active subscription now."),
    }
    now = clock.now_ms()
    state = customer_base.get(OVERALL)
    if now is not None and state:
        result = churn(state, now)
        families["start"].add_metric([window], result.active_at_start)
        families["churned"].add_metric([window], result.churned)
        families["active"].add_metric([], result.active_now)
        if result.churn_ratio is not None:
            families["churn"].add_metric([window], result.churn_ratio)
            families["retention"].add_metric([window], result.retention_ratio)
    return list(families.values())
