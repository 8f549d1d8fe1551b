"""Deal family: closed deals' outcomes per pipeline (stage conversion and P(win | stage) over a trailing window),
and the weighted pipeline and month forecast of the open deals this worker owns, as gauges and at /deals."""

from __future__ import annotations

from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from crm_pulse.agents.app import Pipeline
from crm_pulse.agents.batches import unapplied_deltas
from crm_pulse.agents.leads import Leads
from crm_pulse.streams.forecast import (
    Probability, accuracy, apply_outcome, conversion_ratios, forecast_by, month_forecast_parts, prune_outcomes,
    stage_counts, weighted_pipeline, win_probabilities,
)  # fmt: skip
from crm_pulse.streams.health import BANDS, band, components, health
from crm_pulse.streams.kpis import day_of
from crm_pulse.streams.periods import period_days, period_of

# Outcomes are kept for the window and the two months before it, so last month's forecast, made at its start
# with the window that ended there, can still be recomputed.
FORECAST_LOOKBACK_DAYS = 62


class Deals(Collector):
    def __init__(self, pipeline: Pipeline, leads: Leads):
        settings = pipeline.settings
        self.clock, self.leads, self.zone = pipeline.clock, leads, settings.business_zone
        self.window_days = settings.deal_history_days
        self.keep_days = self.window_days + FORECAST_LOOKBACK_DAYS + int(settings.grace_seconds // 86400) + 2
        self.outcomes = pipeline.table("deal-outcomes")
        # (months, leads version, outcomes version) → the month forecasts: they walk every lead, so they are
        # recomputed only when a lead or an outcome has changed.
        self.forecast_cache: tuple[tuple, list] | None = None
        self.version = 0

    async def aggregate_outcomes(self, stream):
        async for _batch, _event, state, deltas in unapplied_deltas(stream, self.outcomes):
            for delta in deltas:
                apply_outcome(state, delta)
                prune_outcomes(state, delta["day"] - self.keep_days)
            self.version += 1

    def counts(self, pipeline: str, last_day: int) -> dict[str, list[int]]:
        return stage_counts(self.outcomes.get(pipeline) or {}, last_day, self.window_days)

    def probability_through(self, last_day: int) -> Probability:
        """P(win | stage) learned from the deals closed in the window ending with `last_day` (this worker's
        copy of the outcomes, as the stall thresholds read the dwell histograms)."""
        cache: dict[str, dict[str, float]] = {}

        def probability(pipeline: str, stage: str) -> float | None:
            if pipeline not in cache:
                cache[pipeline] = win_probabilities(self.counts(pipeline, last_day))
            return cache[pipeline].get(stage)

        return probability

    def forecast_parts(self, month: str) -> dict[tuple, list[float]]:
        """`month`'s forecast made at its start and what was won in it, per (team, rep), over this worker's leads."""
        probability = self.probability_through(period_days("month", month)[0] - 1)
        return month_forecast_parts(self.leads.leads.values(), month, lambda _: probability, self.leads.deal_policy,
                                    self.zone)  # fmt: skip

    def forecast(self, month: str) -> dict:
        """`month`'s forecast against what was won in it: in all, by team and by rep."""
        parts = self.forecast_parts(month)
        total = accuracy(sum(part[0] for part in parts.values()), sum(part[1] for part in parts.values()))
        return {**total, "by_team": forecast_by(parts, "team"), "by_rep": forecast_by(parts, "rep")}

    def month_forecasts(self, today: int) -> list[tuple[str, dict[tuple, list[float]]]]:
        """[(window, forecast parts)] of the current month (won so far) and the previous one."""
        current = period_of("month", today)
        months = (("month_current", current), ("month_previous", period_of("month", period_days("month", current)[0] - 1)))
        key = (months, self.leads.version, self.version)
        if self.forecast_cache is None or self.forecast_cache[0] != key:
            self.forecast_cache = (key, [(window, self.forecast_parts(month)) for window, month in months])
        return self.forecast_cache[1]

    def weighted(self, now_ms: int) -> dict[tuple, float]:
        return weighted_pipeline(self.leads.open_deals.values(), self.probability_through(day_of(now_ms, self.zone)),
                                 self.zone)

    def collect(self):
        labels = ["pipeline", "stage"]
        win = GaugeMetricFamily("crm_deal_win_probability_ratio",
                                "P(win | stage): won / reached among deals closed in the trailing window.", labels=labels)
        conversion = GaugeMetricFamily("crm_deal_stage_conversion_ratio",
                                       "Closed deals that reached the stage and went on to a later one or won / reached.",
                                       labels=labels)  # fmt: skip
        closed = GaugeMetricFamily("crm_deal_closed_reached", "Deals closed in the trailing window that reached the stage.",
                                   labels=labels)  # fmt: skip
        weighted = GaugeMetricFamily("crm_pipeline_weighted_value",
                                     "Σ amount × P(win | stage) of open deals, by expected close month.",
                                     labels=["close_month", "pipeline", "team", "rep"])  # fmt: skip
        forecast = GaugeMetricFamily("crm_forecast_weighted_value",
                                     "The month's forecast made at its first instant: Σ amount × P(win | stage) of the "
                                     "deals then open and due in it.", labels=["window"])  # fmt: skip
        forecast_won = GaugeMetricFamily("crm_forecast_won_value", "Amount of the deals won in the month (so far).",
                                         labels=["window"])  # fmt: skip
        owner = ["window", "team", "rep"]
        rep_forecast = GaugeMetricFamily("crm_forecast_rep_weighted_value",
                                         "crm_forecast_weighted_value by the deals' team and rep.", labels=owner)  # fmt: skip
        rep_won = GaugeMetricFamily("crm_forecast_rep_won_value", "crm_forecast_won_value by the deals' team and rep.",
                                    labels=owner)  # fmt: skip
        now = self.clock.now_ms()
        if now is not None:
            today = day_of(now, self.zone)
            for window, parts in self.month_forecasts(today):
                forecast.add_metric([window], sum(part[0] for part in parts.values()))
                forecast_won.add_metric([window], sum(part[1] for part in parts.values()))
                for (team, rep), (value, won) in sorted(parts.items(), key=lambda kv: tuple(map(str, kv[0]))):
                    rep_forecast.add_metric([window, team or "none", rep or "unassigned"], value)
                    rep_won.add_metric([window, team or "none", rep or "unassigned"], won)
            for pipeline in sorted(self.outcomes.keys()):
                counts = self.counts(pipeline, today)
                for stage, p in win_probabilities(counts).items():
                    win.add_metric([pipeline, stage], p)
                    closed.add_metric([pipeline, stage], counts[stage][0])
                for stage, ratio in conversion_ratios(counts).items():
                    conversion.add_metric([pipeline, stage], ratio)
            for (month, pipeline, team, rep), value in sorted(self.weighted(now).items()):
                weighted.add_metric([month, pipeline, team or "none", rep or "unassigned"], value)
        health_deals = GaugeMetricFamily("crm_deal_health_deals", "Open deals by deal health band (docs/deals.md).",
                                         labels=["pipeline", "band"])  # fmt: skip
        counts = {}
        for item in self.deal_health():
            key = (item["pipeline"] or "default", item["band"])
            counts[key] = counts.get(key, 0) + 1
        for pipeline in sorted({p for p, _ in counts}):
            for name, _ in BANDS:  # every band, 0 included, so a band emptying shows as 0
                health_deals.add_metric([pipeline, name], counts.get((pipeline, name), 0))
        return [win, conversion, closed, weighted, forecast, forecast_won, rep_forecast, rep_won, health_deals]

    def deal_health(self) -> list[dict]:
        """Health of each open lead (deal) this worker owns, at the stall checks' "now"."""
        now = self.leads.stall_now_ms()
        if now is None:
            return []
        norms = self.leads.norms_at(now)
        found = []
        for lead_id, inputs in self.leads.health_inputs.items():
            parts = components(inputs, now, norms)
            score = health(inputs, now, norms)
            found.append({"lead_id": lead_id, "rep_id": inputs["rep"], "pipeline": inputs["pipeline"],
                          "stage": inputs["stage"], "health": score, "band": band(score), "components": parts})  # fmt: skip
        return found


def install(pipeline: Pipeline, leads: Leads) -> Deals:
    deals = Deals(pipeline, leads)
    pipeline.app.agent(pipeline.outcome_deltas_topic)(deals.aggregate_outcomes)
    return deals
