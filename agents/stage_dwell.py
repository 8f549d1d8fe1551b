"""Stage dwell family: per-stage daily histograms of time spent in a stage, keyed (and owned) by stage."""

from __future__ import annotations

from prometheus_client.core import GaugeMetricFamily

from agents.app import app, clock, dwell_deltas_topic, settings
from agents.metrics import export_gauges
from streams.kpis import CHURN_WINDOW_DAYS, WINDOWS_DAYS, apply_dwell, day_of, dwell_stats, prune_days

RETENTION_DAYS = max(WINDOWS_DAYS.values()) + int(settings.grace_seconds // 86400) + 2

stage_dwell = app.Table("stage-dwell", default=dict, partitions=settings.partitions, key_type=str)


@app.agent(dwell_deltas_topic)
async def aggregate_stage_dwell(stream):
    async for stage, delta in stream.items():
        state = stage_dwell[stage]
        left_day = day_of(delta["left_at"])
        apply_dwell(state, left_day, delta["dwell_ms"], delta["sign"])
        prune_days(state, left_day - RETENTION_DAYS)
        stage_dwell[stage] = state


def stage_p90(stage: str, now_ms: int) -> tuple[float | None, int]:
    """(p90 dwell seconds, observations) over the last 30 days, from this worker's copy of the table."""
    stats = dwell_stats(stage_dwell.get(stage) or {}, now_ms, CHURN_WINDOW_DAYS)
    return stats.quantile_seconds(0.9), stats.count


@export_gauges
def collect():
    labels = ["stage", "window"]
    observations = GaugeMetricFamily(
        "crm_stage_dwell_observations", "Leads that left the stage in the window (event time).", labels=labels
    )
    mean = GaugeMetricFamily("crm_stage_dwell_mean_seconds", "Mean time spent in the stage.", labels=labels)
    quantiles = GaugeMetricFamily(
        "crm_stage_dwell_quantile_seconds",
        "Time spent in the stage at a quantile (0.5, 0.9), interpolated within fixed histogram buckets.",
        labels=[*labels, "quantile"],
    )
    now = clock.now_ms()
    if now is not None:
        for stage, state in stage_dwell.items():
            for window, days in WINDOWS_DAYS.items():
                stats = dwell_stats(state, now, days)
                if not stats.count:
                    continue
                observations.add_metric([stage, window], stats.count)
                mean.add_metric([stage, window], stats.mean_seconds)
                for q in (0.5, 0.9):
                    quantiles.add_metric([stage, window, str(q)], stats.quantile_seconds(q))
    return [observations, mean, quantiles]
