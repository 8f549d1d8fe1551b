"""Customer family: per-customer history (keyed by customer) → churn, retention and the customer KPIs
that combine the customer base with 30-day sums (LTV, retention cost, growth, complaint rate)."""

from __future__ import annotations

from prometheus_client.core import GaugeMetricFamily

from crm_pulse.agents.aggregates import DeltaSender, kpi_sums
from crm_pulse.agents.app import app, churn_deltas_topic, clock, family_topics, settings, table
from crm_pulse.agents.batches import envelopes, unapplied_deltas, unseen_events, upstream_watermark
from crm_pulse.agents.metrics import EVENTS_PROCESSED, export_gauges
from crm_pulse.streams.catalogue import customer_base_kpis, window_sums
from crm_pulse.streams.kpis import CHURN_WINDOW_DAYS, advance_churn_horizon, apply_spell, churn, day_of
from crm_pulse.streams.entities import apply_customer_event
from crm_pulse.streams.families import OVERALL

HORIZON_SLACK_DAYS = CHURN_WINDOW_DAYS + int(settings.grace_seconds // 86400) + 2

customers = table("customers")
# One key ("all"), on the same partition number as the "all" KPI sums: one worker owns both.
customer_base = table("customer-base")
customer_events = family_topics["customer"]
customers_upstream = upstream_watermark(customer_events)


@app.agent(customer_events)
async def track_customers(stream):
    async for batch, received in envelopes(stream, customers):
        deltas = DeltaSender("customers", batch, received)
        for _customer_id, event, customer in unseen_events(batch, received, customers_upstream):
            spell_deltas, fact_deltas = apply_customer_event(customer, event)
            for start_day, end_day, sign in spell_deltas:
                deltas.send(churn_deltas_topic, OVERALL, {"start": start_day, "end": end_day, "sign": sign, "at": event["occurred_at"]})
            deltas.facts(fact_deltas, event)
            EVENTS_PROCESSED.labels(event["type"]).inc()


@app.agent(churn_deltas_topic)
async def aggregate_churn(stream):
    async for _batch, _event, state, deltas in unapplied_deltas(stream, customer_base):
        for delta in deltas:
            advance_churn_horizon(state, day_of(delta["at"]) - HORIZON_SLACK_DAYS)
            apply_spell(state, delta["start"], delta["end"], delta["sign"])


CUSTOMER_BASE_HELP = {
    "churn_ratio": "Customers active at the window start who cancelled in it / those active at its start.",
    "retention_ratio": "1 - churn ratio.",
    "customers_active_at_window_start": "Customers active when the window opened.",
    "customers_churned": "Customers active at the window start who cancelled in it.",
    "customer_base_growth_ratio": "(Customers active now - active at the window start) / active at the start.",
    "customer_lifetime_value": "LTV: average purchase value × purchase frequency × average lifespan (1 / churn).",
    "retention_cost_per_retained_customer": "Retention spend in the window / customers retained through it.",
    "complaint_ratio": "Complaints in the window / customers active now.",
}


@export_gauges
def collect():
    window = f"{CHURN_WINDOW_DAYS}d"
    families = {
        name: GaugeMetricFamily(f"crm_{name}", help_text, labels=["window"])
        for name, help_text in CUSTOMER_BASE_HELP.items()
    }
    active = GaugeMetricFamily("crm_customers_active", "Customers with an active subscription now.")
    now = clock.now_ms()
    state = customer_base.get(OVERALL)
    if now is not None and state:
        base = churn(state, now)
        active.add_metric([], base.active_now)
        sums = window_sums(kpi_sums.get(OVERALL, {}), day_of(now), CHURN_WINDOW_DAYS)
        for name, value in customer_base_kpis(base, sums).items():
            if value is not None:
                families[name].add_metric([window], value)
    return [*families.values(), active]
