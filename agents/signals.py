"""Marketing and adoption family: campaign touches and spend (keyed by campaign), CRM user activity
(keyed by user), and the rep activity that counts distinct active reps (keyed by rep)."""

from __future__ import annotations

from agents.aggregates import DeltaSender
from agents.app import actor_activity_topic, app, clock, settings, valid_topic
from agents.metrics import EVENTS_DUPLICATE, EVENTS_PROCESSED
from streams.routing import SIGNAL_TYPES, already_applied, apply_actor_activity, first_seen

dedupe_horizon_ms = int(settings.dedupe_horizon_seconds * 1000)

signal_sources = app.Table("signal-sources", default=dict, partitions=settings.partitions, key_type=str)
actors = app.Table("actors", default=dict, partitions=settings.partitions, key_type=str)


@app.agent(valid_topic)
async def track_signals(stream):
    async for message in stream.events():
        key, event = message.key, message.value
        if event["type"] not in SIGNAL_TYPES:
            continue
        source = signal_sources[key]
        if not first_seen(source, event, dedupe_horizon_ms):
            EVENTS_DUPLICATE.labels(event["type"]).inc()
            continue
        fact_deltas = []
        if event["type"] == "crm.user_activity":
            fact_deltas = apply_actor_activity(source, event["occurred_at"], "active_users")
        deltas = DeltaSender("signals", message.message)
        await deltas.facts(fact_deltas, event)
        await deltas.delivered()
        signal_sources[key] = source
        EVENTS_PROCESSED.labels(event["type"]).inc()


@app.agent(actor_activity_topic)
async def track_active_reps(stream):
    async for message in stream.events():
        actor = actors[message.key]
        if already_applied(actor, message.value):
            continue
        fact_deltas = apply_actor_activity(actor, message.value["at"], "active_reps")
        deltas = DeltaSender("reps", message.message)
        await deltas.facts(fact_deltas)
        await deltas.delivered()
        actors[message.key] = actor
