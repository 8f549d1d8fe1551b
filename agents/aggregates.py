"""Keyed aggregates, each owned by the worker holding its key's partition: duration histograms and KPI
sums. Both take deltas (+1/-1) from the entity agents, so late events retract what they replace."""

from __future__ import annotations

from prometheus_client.core import GaugeMetricFamily

from crm_pulse.agents.app import RETENTION_DAYS, app, clock, histogram_deltas_topic, settings, sums_deltas_topic, table
from crm_pulse.agents.metrics import export_gauges
from crm_pulse.streams.catalogue import (
    KPIS,
    WINDOWS,
    apply_sums,
    baseline_comparison,
    event_sums,
    group_sums,
    prune_sums,
    window_sums,
)
from crm_pulse.streams.kpis import apply_dwell, day_of, dwell_stats, prune_days
from crm_pulse.agents.batches import unapplied_deltas

histograms = table("histograms")
kpi_sums = table("kpi-sums")
baseline = settings.baseline_days

# Percentiles as gauges of their own: a "quantile" label is reserved for summaries.
PERCENTILES = (50, 90)
# Histogram scope prefix → (metric prefix, help subject, label of the scope's value or None).
HISTOGRAMS = {
    "dwell": ("crm_stage_dwell", "time spent in a stage, counted when the lead left it", "stage"),
    "cycle": ("crm_sales_cycle", "sales cycle (lead created → deal won), counted when won", None),
    "resolution": ("crm_ticket_resolution", "ticket time to resolution, counted when resolved", None),
}


@app.agent(histogram_deltas_topic)
async def aggregate_histograms(stream):
    async for _batch, _event, state, deltas in unapplied_deltas(stream, histograms):
        for delta in deltas:
            day = day_of(delta["at"])
            apply_dwell(state, day, delta["ms"], delta["sign"], baseline)
            prune_days(state, day - RETENTION_DAYS)


@app.agent(sums_deltas_topic)
async def aggregate_sums(stream):
    async for _batch, _event, state, deltas in unapplied_deltas(stream, kpi_sums):
        for delta in deltas:
            apply_sums(state, delta["day"], delta["values"], delta["sign"], baseline)
            prune_sums(state, delta["day"] - RETENTION_DAYS)


class DeltaSender:
    """Queues on its batch the deltas caused by one input message, numbered so aggregates can drop re-sent
    ones (`streams.dedupe.already_applied`). The batch sends them and waits until the broker has them all
    before writing the entity's own state, so a crash in between replays the message with the same ids."""

    def __init__(self, sender: str, batch, received):
        message = received.message
        # Several agents read the same partition at their own pace: each is an origin of its own.
        self.origin = f"{sender}@{message.topic}:{message.partition}"
        self.offset = message.offset
        self.batch = batch
        self.seq = 0

    def send(self, topic, key: str, value: dict) -> None:
        self.batch.add_delta(topic, key, self.origin, [self.offset, self.seq, value])
        self.seq += 1

    def facts(self, fact_deltas, event: dict | None = None) -> None:
        """The deltas of facts derived from an entity's history ((fact, ±1) from `streams.catalogue`), and
        the event's own sums."""
        contributions = [(scope, event["occurred_at"], values, 1) for scope, values in event_sums(event)] if event else []
        for fact, sign in fact_deltas:
            if fact[0] == "hist":
                _, scope, at, ms = fact
                self.send(histogram_deltas_topic, scope, {"at": at, "ms": ms, "sign": sign})
            else:
                _, scope, at, field, value = fact
                contributions.append((scope, at, {field: value}, sign))
        for (scope, day, sign), values in group_sums(contributions).items():
            self.send(sums_deltas_topic, scope, {"day": day, "values": values, "sign": sign})


def stage_p90(stage: str, now_ms: int) -> tuple[float | None, int]:
    """(p90 dwell seconds, observations) over the last 30 days, from this worker's copy of the table."""
    stats = dwell_stats(histograms.get(f"dwell:{stage}") or {}, now_ms, 30)
    return stats.quantile_seconds(0.9), stats.count


@export_gauges
def collect_histograms():
    families = {}
    for prefix, (metric, subject, label) in HISTOGRAMS.items():
        labels = ([label] if label else []) + ["window"]
        families[prefix] = (
            GaugeMetricFamily(f"{metric}_observations", f"Observations of {subject}, in the window.", labels=labels),
            GaugeMetricFamily(f"{metric}_mean_seconds", f"Mean {subject}.", labels=labels),
            *(GaugeMetricFamily(f"{metric}_p{percent}_seconds", f"{percent}th percentile of {subject}, "
                                "interpolated within fixed histogram buckets.", labels=labels)
              for percent in PERCENTILES),
        )
    now = clock.now_ms()
    if now is not None:
        for scope, state in histograms.items():
            prefix, _, value = scope.partition(":")
            observations, mean, *percentiles = families[prefix]
            scope_labels = [value] if HISTOGRAMS[prefix][2] else []
            for window, days in WINDOWS.items():
                stats = dwell_stats(state, now, days)
                if not stats.count:
                    continue
                observations.add_metric([*scope_labels, window], stats.count)
                mean.add_metric([*scope_labels, window], stats.mean_seconds)
                for percent, family in zip(PERCENTILES, percentiles):
                    family.add_metric([*scope_labels, window], stats.quantile_seconds(percent / 100))
    return [metric for group in families.values() for metric in group]


# Per kpi-sums key: (what its samples were computed from, the samples). They depend only on the deltas
# applied to it, which its per-origin marks name, and on the day: a scrape recomputes only the keys whose
# marks moved since the last one (all of them once a day), not every KPI of every rep, source and campaign.
kpi_samples: dict[str, tuple[tuple, list]] = {}


def scope_samples(scope: str, state: dict, today: int) -> list[tuple]:
    """(kpi, dimension, label values, value) for every KPI of one kpi-sums key."""
    version = (today, sorted((origin, *mark) for origin, mark in state.get("applied", {}).items()))
    if (cached := kpi_samples.get(scope)) and cached[0] == version:
        return cached[1]
    dimension, _, value = scope.partition(":")
    dimension = None if scope == "all" else dimension
    samples = []
    for window, days in WINDOWS.items():
        sums = window_sums(state, today, days)
        previous = {} if days is None else window_sums(state, today, days, offset_days=days)
        for kpi in KPIS:
            if dimension is None or dimension in kpi.dimensions:
                result = kpi.formula(sums, previous, days)
                if result is not None:
                    labels = [*([value] if dimension else []), window, *(v for _, v in kpi.labels)]
                    samples.append((kpi, dimension, labels, result))
    kpi_samples[scope] = (version, samples)
    return samples


@export_gauges
def collect_kpis():
    families: dict[str, GaugeMetricFamily] = {}

    def family(kpi, dimension):
        name = kpi.metric(dimension)
        if name not in families:
            labels = ([dimension] if dimension else []) + ["window"] + [k for k, _ in kpi.labels]
            families[name] = GaugeMetricFamily(name, kpi.help, labels=labels)
        return families[name]

    now = clock.now_ms()
    for kpi in KPIS:  # every family is described even before it has data
        for dimension in (None, *kpi.dimensions):
            family(kpi, dimension)
    vs_baseline = GaugeMetricFamily(
        "crm_kpi_baseline", "A KPI over the configured baseline period (e.g. before the CRM went live).", labels=["kpi"]
    )
    ratio_to_baseline = GaugeMetricFamily(
        "crm_kpi_to_baseline_ratio", "A KPI in the window / the same KPI over the baseline period.",
        labels=["kpi", "window"],
    )  # fmt: skip
    if now is not None:
        today = day_of(now)
        scopes = dict(kpi_sums.items())
        for scope, state in scopes.items():
            for kpi, dimension, labels, result in scope_samples(scope, state, today):
                family(kpi, dimension).add_metric(labels, result)
        for gone in kpi_samples.keys() - scopes.keys():  # moved to another worker
            del kpi_samples[gone]
        if "baseline" in (overall := kpi_sums.get("all", {})):
            baseline_values, ratios = baseline_comparison(overall, today)
            for metric, value in baseline_values.items():
                vs_baseline.add_metric([metric], value)
            for (metric, window), value in ratios.items():
                ratio_to_baseline.add_metric([metric, window], value)
    return [*families.values(), vs_baseline, ratio_to_baseline]
