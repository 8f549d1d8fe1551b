"""Marketing and adoption family: campaign touches and spend (keyed by campaign and a bucket of the event id), CRM user activity
(keyed by user), and the rep activity that counts distinct active reps (keyed by rep)."""

from __future__ import annotations

from crm_pulse.agents.aggregates import DeltaSender
from crm_pulse.agents.app import Pipeline
from crm_pulse.agents.batches import envelopes, unapplied_deltas, unseen_events, upstream_watermark
from crm_pulse.agents.metrics import EVENTS_PROCESSED
from crm_pulse.streams.entities import apply_actor_activity


class Signals:
    """The signal-sources and actors tables of one pipeline, and the agents that keep them."""

    def __init__(self, pipeline: Pipeline):
        self.pipeline = pipeline
        self.signal_sources = pipeline.table("signal-sources")
        self.actors = pipeline.table("actors")
        self.signal_events = pipeline.family_topics["signal"]
        self.upstream = upstream_watermark(pipeline, self.signal_events)

    async def track_signals(self, stream):
        async for batch, received in envelopes(stream, self.signal_sources):
            deltas = DeltaSender(self.pipeline, "signals", batch, received)
            for _key, event, source in unseen_events(self.pipeline, batch, received, self.upstream):
                fact_deltas = []
                if event["type"] == "crm.user_activity":
                    fact_deltas = apply_actor_activity(source, event["occurred_at"], "active_users")
                deltas.facts(fact_deltas, event)
                EVENTS_PROCESSED.labels(event["type"]).inc()

    async def track_active_reps(self, stream):
        async for batch, received, actor, activities in unapplied_deltas(stream, self.actors):
            deltas = DeltaSender(self.pipeline, "reps", batch, received)
            for activity in activities:
                deltas.facts(apply_actor_activity(actor, activity["at"], "active_reps"))


def install(pipeline: Pipeline) -> Signals:
    signals = Signals(pipeline)
    pipeline.app.agent(signals.signal_events)(signals.track_signals)
    pipeline.app.agent(pipeline.actor_activity_topic)(signals.track_active_reps)
    return signals
