"""Marketing and adoption family: campaign touches and spend (keyed by campaign and a bucket of the event id), CRM user activity
(keyed by user), and the rep activity that counts distinct active reps (keyed by rep)."""

from __future__ import annotations

from crm_pulse.agents.aggregates import DeltaSender
from crm_pulse.agents.app import actor_activity_topic, app, family_topics, table
from crm_pulse.agents.batches import envelopes, unapplied_deltas, unseen_events, upstream_watermark
from crm_pulse.agents.metrics import EVENTS_PROCESSED
from crm_pulse.streams.entities import apply_actor_activity

signal_sources = table("signal-sources")
actors = table("actors")

signal_events = family_topics["signal"]
signals_upstream = upstream_watermark(signal_events)


@app.agent(signal_events)
async def track_signals(stream):
    async for batch, received in envelopes(stream, signal_sources):
        deltas = DeltaSender("signals", batch, received)
        for _key, event, source in unseen_events(batch, received, signals_upstream):
            fact_deltas = []
            if event["type"] == "crm.user_activity":
                fact_deltas = apply_actor_activity(source, event["occurred_at"], "active_users")
            deltas.facts(fact_deltas, event)
            EVENTS_PROCESSED.labels(event["type"]).inc()


@app.agent(actor_activity_topic)
async def track_active_reps(stream):
    async for batch, received, actor, activities in unapplied_deltas(stream, actors):
        deltas = DeltaSender("reps", batch, received)
        for activity in activities:
            deltas.facts(apply_actor_activity(actor, activity["at"], "active_reps"))
