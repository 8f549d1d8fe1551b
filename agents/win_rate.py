"""Win-rate family: won and lost deals per day, overall and per rep, keyed (and owned) by scope."""

from __future__ import annotations

from prometheus_client.core import GaugeMetricFamily

from agents.app import app, clock, outcome_deltas_topic, settings
from agents.metrics import export_gauges
from streams.kpis import WINDOWS_DAYS, apply_outcome, prune_days, win_rate
from streams.routing import OVERALL

RETENTION_DAYS = max(WINDOWS_DAYS.values()) + int(settings.grace_seconds // 86400) + 2

deal_outcomes = app.Table("deal-outcomes", default=dict, partitions=settings.partitions, key_type=str)


@app.agent(outcome_deltas_topic)
async def aggregate_win_rate(stream):
    async for scope, delta in stream.items():
        state = deal_outcomes[scope]
        apply_outcome(state, delta["day"], delta["won"], delta["lost"])
        prune_days(state, delta["day"] - RETENTION_DAYS)
        deal_outcomes[scope] = state


@export_gauges
def collect():
    overall = GaugeMetricFamily("crm_win_rate_ratio", "Won / (won + lost) deals closed in the window.", labels=["window"])
    by_rep = GaugeMetricFamily(
        "crm_rep_win_rate_ratio", "Won / (won + lost) deals closed in the window, by rep.", labels=["window", "rep"]
    )
    won = GaugeMetricFamily("crm_deals_won", "Deals won in the window (rep=\"all\": every rep).", labels=["window", "rep"])
    lost = GaugeMetricFamily("crm_deals_lost", "Deals lost in the window (rep=\"all\": every rep).", labels=["window", "rep"])
    now = clock.now_ms()
    if now is not None:
        for scope, state in deal_outcomes.items():
            rep = scope.removeprefix("rep:")
            for window, days in WINDOWS_DAYS.items():
                rate = win_rate(state, now, days)
                won.add_metric([window, rep], rate.won)
                lost.add_metric([window, rep], rate.lost)
                if rate.ratio is None:
                    continue
                if scope == OVERALL:
                    overall.add_metric([window], rate.ratio)
                else:
                    by_rep.add_metric([window, rep], rate.ratio)
    return [overall, by_rep, won, lost]
