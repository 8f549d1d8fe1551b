"""Keyed aggregates, each owned by the worker holding its key's partition: duration histograms and KPI
sums. Both take deltas (+1/-1) from the entity agents, so late events retract what they replace."""

from __future__ import annotations

from crm_pulse.agents.app import Pipeline
from crm_pulse.agents.batches import unapplied_deltas
from crm_pulse.streams.catalogue import apply_sums, prune_sums, split_facts
from crm_pulse.streams.kpis import apply_dwell, day_of, dwell_stats, prune_days


class Aggregates:
    """The histograms and KPI sums of one pipeline, and the agents that apply their deltas."""

    def __init__(self, pipeline: Pipeline):
        self.histograms = pipeline.table("histograms")
        self.kpi_sums = pipeline.table("kpi-sums")
        self.baseline = pipeline.settings.baseline_days
        self.retention_days = pipeline.retention_days
        self.zone = pipeline.settings.business_zone

    async def aggregate_histograms(self, stream):
        async for batch, event, state, deltas in unapplied_deltas(stream, self.histograms, prune_days):
            for delta in deltas:
                day = day_of(delta["at"], self.zone)
                apply_dwell(state, day, delta["ms"], delta["sign"], self.baseline)
                batch.prune_before(event.key, day - self.retention_days)

    async def aggregate_sums(self, stream):
        async for batch, event, state, deltas in unapplied_deltas(stream, self.kpi_sums, prune_sums):
            for delta in deltas:
                apply_sums(state, delta["day"], delta["values"], delta["sign"], self.baseline)
                batch.prune_before(event.key, delta["day"] - self.retention_days)

    def stage_dwell_norms(self, stage: str, now_ms: int, min_samples: int) -> tuple[float | None, float | None]:
        """(p50, p90) dwell seconds over the last 30 days, or Nones with fewer than `min_samples` observations."""
        stats = dwell_stats(self.histograms.get(f"dwell:{stage}") or {}, now_ms, 30)
        if stats.count < min_samples:
            return None, None
        return stats.quantile_seconds(0.5), stats.quantile_seconds(0.9)

    def stage_p90(self, stage: str, now_ms: int) -> tuple[float | None, int]:
        """(p90 dwell seconds, observations) over the last 30 days, from this worker's copy of the table."""
        stats = dwell_stats(self.histograms.get(f"dwell:{stage}") or {}, now_ms, 30)
        return stats.quantile_seconds(0.9), stats.count


def install(pipeline: Pipeline) -> Aggregates:
    aggregates = Aggregates(pipeline)
    pipeline.app.agent(pipeline.histogram_deltas_topic)(aggregates.aggregate_histograms)
    pipeline.app.agent(pipeline.sums_deltas_topic)(aggregates.aggregate_sums)
    return aggregates


class DeltaSender:
    """Queues on its batch the deltas caused by one input message, numbered so aggregates can drop re-sent
    ones (`streams.dedupe.already_applied`). The batch sends them and waits until the broker has them all
    before writing the entity's own state, so a crash in between replays the message with the same ids."""

    def __init__(self, pipeline: Pipeline, sender: str, batch, received):
        message = received.message
        # Several agents read the same partition at their own pace: each is an origin of its own.
        self.origin = f"{sender}@{message.topic}:{message.partition}"
        self.offset = message.offset
        self.batch = batch
        self.seq = 0
        self.histogram_deltas_topic = pipeline.histogram_deltas_topic
        self.sums_deltas_topic = pipeline.sums_deltas_topic
        self.zone = pipeline.settings.business_zone

    def send(self, topic, key: str, value: dict) -> None:
        self.batch.add_delta(topic, key, self.origin, [self.offset, self.seq, value])
        self.seq += 1

    def facts(self, fact_deltas, event: dict | None = None) -> None:
        """The deltas of facts derived from an entity's history ((fact, ±1) from `streams.catalogue`), and
        the event's own sums."""
        histograms, sums = split_facts(fact_deltas, event, self.zone)
        for scope, at, ms, sign in histograms:
            self.send(self.histogram_deltas_topic, scope, {"at": at, "ms": ms, "sign": sign})
        for (scope, day, sign), values in sums.items():
            self.send(self.sums_deltas_topic, scope, {"day": day, "values": values, "sign": sign})
