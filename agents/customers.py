"""Customer family: per-customer history (keyed by customer) → churn, retention and the customer KPIs
that combine the customer base with 30-day sums (LTV, retention cost, growth, complaint rate)."""

from __future__ import annotations

from crm_pulse.agents.aggregates import DeltaSender
from crm_pulse.agents.app import DAY_S, Pipeline
from crm_pulse.agents.batches import envelopes, unapplied_deltas, unseen_events, upstream_watermark
from crm_pulse.agents.metrics import EVENTS_PROCESSED
from crm_pulse.streams.kpis import CHURN_WINDOW_DAYS, advance_churn_horizon, apply_spell, day_of
from crm_pulse.streams.entities import apply_customer_event
from crm_pulse.streams.families import OVERALL
from crm_pulse.streams.periods import LONGEST_LOOKBACK_DAYS


class Customers:
    """The customers and customer-base tables of one pipeline, and the agents that keep them."""

    def __init__(self, pipeline: Pipeline):
        self.pipeline = pipeline
        # Spells are kept exact back to the first day of the previous quarter, the oldest window read.
        slack = max(CHURN_WINDOW_DAYS, LONGEST_LOOKBACK_DAYS)
        self.horizon_slack_days = slack + int(pipeline.settings.grace_seconds // DAY_S) + 2
        self.zone = pipeline.settings.business_zone
        self.customers = pipeline.table("customers")
        # One key ("all"), on the same partition number as the "all" KPI sums: one worker owns both.
        self.customer_base = pipeline.table("customer-base")
        self.customer_events = pipeline.family_topics["customer"]
        self.upstream = upstream_watermark(pipeline, self.customer_events)

    async def track_customers(self, stream):
        pipeline = self.pipeline
        async for batch, received in envelopes(stream, self.customers):
            deltas = DeltaSender(pipeline, "customers", batch, received)
            for _customer_id, event, customer in unseen_events(pipeline, batch, received, self.upstream):
                spell_deltas, fact_deltas = apply_customer_event(customer, event, self.zone)
                for start_day, end_day, sign in spell_deltas:
                    deltas.send(pipeline.churn_deltas_topic, OVERALL, {"start": start_day, "end": end_day, "sign": sign, "at": event["occurred_at"]})
                deltas.facts(fact_deltas, event)
                EVENTS_PROCESSED.labels(event["type"]).inc()

    async def aggregate_churn(self, stream):
        async for _batch, _event, state, deltas in unapplied_deltas(stream, self.customer_base):
            for delta in deltas:
                advance_churn_horizon(state, day_of(delta["at"], self.zone) - self.horizon_slack_days)
                apply_spell(state, delta["start"], delta["end"], delta["sign"])


def install(pipeline: Pipeline) -> Customers:
    customers = Customers(pipeline)
    pipeline.app.agent(customers.customer_events)(customers.track_customers)
    pipeline.app.agent(pipeline.churn_deltas_topic)(customers.aggregate_churn)
    return customers
