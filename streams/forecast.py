"""Stage conversion, P(win | stage) and the weighted pipeline forecast (docs/deals.md#conversion-and-forecast).

A closed deal contributes one outcome, on the day it closed, to its pipeline: each stage of the pipeline's
order it reached, whether it reached a later one (or was won), and whether it was won. The aggregate keeps
them per day, so P(win | stage) over any trailing window ending on any day is a sum over days: the window
that ends at a month's start gives the probabilities that month's forecast was made with.
"""

from __future__ import annotations

from collections import defaultdict
from datetime import datetime, time, tzinfo
from typing import Callable, Iterable

from crm_pulse.streams.catalogue import stage_history
from crm_pulse.streams.deals import DEFAULT_PIPELINE, DealPolicy, updates
from crm_pulse.streams.kpis import DAY_MS, day_of
from crm_pulse.streams.periods import date_of_day, period_days, period_of

WON = "won"
Probability = Callable[[str, str], "float | None"]


def closed_outcome(lead: dict, policy: DealPolicy, zone: tzinfo | None = None) -> tuple | None:
    """(pipeline, close day, {stage: [reached, won, advanced]}) of a closed deal, None while open. `advanced`:
    it reached a later stage of the order, or was won."""
    history = stage_history(lead)
    if not history or history[-1][2] not in policy.closed_stages:
        return None
    pipeline = lead["pipeline"] or DEFAULT_PIPELINE
    order = policy.order(pipeline)
    entered = {stage for _, _, stage in history}
    won = int(history[-1][2] == WON)
    reached = [stage for stage in order if stage in entered]
    stages = {}
    for stage in reached:
        later = any(other in entered for other in order[order.index(stage) + 1:])
        stages[stage] = [1, won, int(later or won)]
    return pipeline, day_of(history[-1][0], zone), stages


def outcome_deltas(before: tuple | None, after: tuple | None) -> list[tuple[str, dict]]:
    """[(pipeline, delta)] that replace a deal's outcome `before` an event by the one `after` it: a late event
    (or a reopened deal) retracts what it changes."""
    if before == after:
        return []
    return [(outcome[0], {"day": outcome[1], "stages": outcome[2], "sign": sign})
            for outcome, sign in ((before, -1), (after, 1)) if outcome is not None]


def apply_outcome(state: dict, delta: dict) -> None:
    """Add (or retract) one outcome to a pipeline's per-day counts."""
    day = state.setdefault("days", {}).setdefault(str(delta["day"]), {})
    for stage, counts in delta["stages"].items():
        cell = day.setdefault(stage, [0, 0, 0])
        for i, n in enumerate(counts):
            cell[i] += delta["sign"] * n
        if not any(cell):
            del day[stage]
    if not day:
        del state["days"][str(delta["day"])]


def prune_outcomes(state: dict, before_day: int) -> None:
    days = state.get("days", {})
    for day in [d for d in days if int(d) < before_day]:
        del days[day]


def stage_counts(state: dict, last_day: int, window_days: int) -> dict[str, list[int]]:
    """{stage: [reached, won, advanced]} of the deals closed in the `window_days` days up to `last_day`."""
    totals: dict[str, list[int]] = {}
    for day, stages in (state.get("days") or {}).items():
        if last_day - window_days < int(day) <= last_day:
            for stage, counts in stages.items():
                cell = totals.setdefault(stage, [0, 0, 0])
                for i, n in enumerate(counts):
                    cell[i] += n
    return totals


def win_probabilities(counts: dict[str, list[int]], min_samples: int = 1) -> dict[str, float]:
    """P(win | stage) = won / reached among closed deals that reached the stage; stages with fewer than
    `min_samples` closed deals have none."""
    return {stage: won / reached for stage, (reached, won, _) in counts.items() if reached >= max(min_samples, 1)}


def conversion_ratios(counts: dict[str, list[int]], min_samples: int = 1) -> dict[str, float]:
    """Stage conversion = advanced / reached: the share of closed deals that reached the stage and went on
    to a later stage of the order or were won."""
    return {stage: advanced / reached for stage, (reached, _, advanced) in counts.items() if reached >= max(min_samples, 1)}


def stage_figures(counts: dict[str, list[int]]) -> dict[str, dict[str, float]]:
    """A pipeline's P(win | stage), stage conversion and the closed deals behind them, as /deals/forecast and
    `crm-pulse report` give them."""
    return {"win_probability": win_probabilities(counts), "conversion": conversion_ratios(counts),
            "closed_reached": {stage: cell[0] for stage, cell in counts.items()}}  # fmt: skip


def weighted_rows(totals: dict[tuple, float]) -> list[dict]:
    """`weighted_pipeline`'s totals as rows, by close month, pipeline, team and rep (a missing team or rep first)."""
    return [{"close_month": m, "pipeline": p, "team_id": t, "rep_id": r, "weighted_value": v}
            for (m, p, t, r), v in sorted(totals.items(), key=lambda kv: tuple(map(str, kv[0])))]  # fmt: skip


def month_of(ms: int, zone: tzinfo | None = None) -> str:
    return period_of("month", day_of(ms, zone))


def day_start_ms(day: int, zone: tzinfo | None = None) -> int:
    if zone is None:
        return day * DAY_MS
    return int(datetime.combine(date_of_day(day), time(), zone).timestamp() * 1000)


def open_deal(lead: dict, policy: DealPolicy, at: int | None = None) -> tuple | None:
    """(pipeline, stage, amount, close_ms) of the deal as it stood at `at` (now when None): open, with an
    amount and close date, and not put in forecast category "omitted" (as CRMs leave those out); else None."""
    history = stage_history(lead)
    snapshots = updates(lead)
    if at is not None:
        history = [entry for entry in history if entry[0] <= at]
        snapshots = [entry for entry in snapshots if entry[0] <= at]
    if not history or not snapshots or history[-1][2] in policy.closed_stages or snapshots[-1][4] == "omitted":
        return None
    return lead["pipeline"] or DEFAULT_PIPELINE, history[-1][2], snapshots[-1][2], snapshots[-1][3]


def weighted_pipeline(deals: Iterable[tuple], probability: Probability, zone: tzinfo | None = None) -> dict[tuple, float]:
    """Σ amount × P(win | stage) per (expected close month, pipeline, team, rep) of open deals given as
    (pipeline, stage, amount, close_ms, team, rep); a deal whose stage has no probability yet is left out."""
    totals: defaultdict[tuple, float] = defaultdict(float)
    for pipeline, stage, amount, close_ms, team, rep in deals:
        p = probability(pipeline, stage)
        if p is not None:
            totals[(month_of(close_ms, zone), pipeline, team, rep)] += amount * p
    return dict(totals)


def accuracy(forecast: float, won: float) -> dict[str, float | None]:
    """The forecast against what was won: 1 − |won − forecast| / won (None when nothing was won)."""
    return {"forecast": forecast, "won": won, "accuracy_ratio": 1 - abs(won - forecast) / won if won else None}


def month_forecast_parts(leads: Iterable[dict], month: str, probabilities_at: Callable[[int], Probability],
                         policy: DealPolicy, zone: tzinfo | None = None) -> dict[tuple, list[float]]:  # fmt: skip
    """`month_forecast`'s [forecast, won] per (team, rep) of the deals: their latest team and rep, so a deal that
    changed hands counts wholly for its latest owner, forecast and won alike."""
    first, last = period_days("month", month)
    start = day_start_ms(first, zone)
    probability = probabilities_at(start)
    parts: defaultdict[tuple, list[float]] = defaultdict(lambda: [0.0, 0.0])
    for lead in leads:
        owner = (lead["team"], lead["rep"])
        deal = open_deal(lead, policy, at=start - 1)
        if deal is not None and month_of(deal[3], zone) == month and (p := probability(deal[0], deal[1])) is not None:
            parts[owner][0] += deal[2] * p
        history = stage_history(lead)
        if history and history[-1][2] == WON and first <= day_of(history[-1][0], zone) <= last:
            parts[owner][1] += lead.get("won_amount") or 0
    return dict(parts)


def month_forecast(leads: Iterable[dict], month: str, probabilities_at: Callable[[int], Probability],
                   policy: DealPolicy, zone: tzinfo | None = None) -> dict[str, float]:  # fmt: skip
    """The forecast made at the start of `month` against what was won in it: `forecast` = Σ amount × P(win |
    stage) over the deals open at the month's first instant whose close date then was in the month, with the
    probabilities learned up to that instant; `won` = Σ won amount of deals won in the month (event time)."""
    parts = month_forecast_parts(leads, month, probabilities_at, policy, zone).values()
    return accuracy(sum(part[0] for part in parts), sum(part[1] for part in parts))


def forecast_by(parts: dict[tuple, list[float]], by: str) -> list[dict]:
    """The parts summed by "team" or by "rep" (team and rep: a rep is counted within each team their deals
    are in), each with its accuracy; `team_id`/`rep_id` None for deals without one."""
    totals: defaultdict[tuple, list[float]] = defaultdict(lambda: [0.0, 0.0])
    for (team, rep), (forecast, won) in parts.items():
        key = (team,) if by == "team" else (team, rep)
        totals[key][0] += forecast
        totals[key][1] += won
    names = ("team_id",) if by == "team" else ("team_id", "rep_id")
    return [{**dict(zip(names, key)), **accuracy(*values)}
            for key, values in sorted(totals.items(), key=lambda kv: tuple(map(str, kv[0])))]  # fmt: skip
