"""Marketing and adoption family: campaign touches and spend (keyed by campaign), CRM user activity
(keyed by user), and the rep activity that counts distinct active reps (keyed by rep)."""

from __future__ import annotations

from agents.aggregates import publish_deltas
from agents.app import actor_activity_topic, app, clock, settings, valid_topic
from agents.metrics import EVENTS_DUPLICATE, EVENTS_PROCESSED
from streams.routing import SIGNAL_TYPES, apply_actor_activity, first_seen

dedupe_horizon_ms = int(settings.dedupe_horizon_seconds * 1000)

signal_sources = app.Table("signal-sources", default=dict, partitions=settings.partitions, key_type=str)
actors = app.Table("actors", default=dict, partitions=settings.partitions, key_type=str)


@app.agent(valid_topic)
async def track_signals(stream):
    async for key, event in stream.items():
        if event["type"] not in SIGNAL_TYPES:
            continue
        source = signal_sources[key]
        if not first_seen(source, event, clock.watermark_ms, dedupe_horizon_ms):
            EVENTS_DUPLICATE.labels(event["type"]).inc()
            continue
        fact_deltas = []
        if event["type"] == "crm.user_activity":
            fact_deltas = apply_actor_activity(source, event["occurred_at"], "active_users")
        signal_sources[key] = source
        EVENTS_PROCESSED.labels(event["type"]).inc()
        await publish_deltas(fact_deltas, event)


@app.agent(actor_activity_topic)
async def track_active_reps(stream):
    async for key, activity in stream.items():
        actor = actors[key]
        fact_deltas = apply_actor_activity(actor, activity["at"], "active_reps")
        actors[key] = actor
        await publish_deltas(fact_deltas)
