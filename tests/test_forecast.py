"""Stage conversion, P(win | stage), the weighted pipeline and the month forecast (streams/forecast.py): exact numbers
of small histories worked by hand, and the streaming fold (any order, duplicates) against a batch computation."""

from __future__ import annotations

import random
from collections import defaultdict
from datetime import datetime, timezone

import pytest
from hypothesis import given, settings, strategies as st

from crm_pulse.streams.deals import DealPolicy
from crm_pulse.streams.fold import Fold
from crm_pulse.streams.forecast import (
    conversion_ratios, forecast_by, month_forecast, month_forecast_parts, month_of, open_deal, stage_counts,
    weighted_pipeline, win_probabilities,
)  # fmt: skip
from crm_pulse.streams.kpis import DAY_MS, day_of
from crm_pulse.streams.leads import StallPolicy

HOUR = 3_600_000
MAR_1 = 1_772_323_200_000  # 2026-03-01T00:00Z
APR_1 = MAR_1 + 31 * DAY_MS
ORDER = ("new", "qualified", "proposal", "negotiation")
POLICY = DealPolicy(stage_order={"default": ORDER, "p2": ("qualified", "proposal")})


def ev(event_id, kind, lead, at, payload, **envelope):
    return {"event_id": event_id, "type": kind, "occurred_at": at, "lead_id": lead, "payload": payload, **envelope}


def history(lead, at, stages, outcome=None, amount=0.0, **envelope):
    """lead.created in stages[0], then an hour per further stage, then won or lost."""
    events = [ev(f"{lead}:c", "lead.created", lead, at, {"source": "web", "stage": stages[0]}, **envelope)]
    for i, stage in enumerate(stages[1:], start=1):
        events.append(ev(f"{lead}:s{i}", "lead.stage_changed", lead, at + i * HOUR, {"from": "?", "to": stage}, **envelope))
    end = at + len(stages) * HOUR
    if outcome == "won":
        events.append(ev(f"{lead}:won", "deal.won", lead, end, {"amount": amount}, **envelope))
    elif outcome == "lost":
        events.append(ev(f"{lead}:lost", "deal.lost", lead, end, {"reason": "price"}, **envelope))
    return events


def folded(events) -> Fold:
    fold = Fold(StallPolicy(), deal_policy=POLICY)
    for event in events:
        fold.apply(event["lead_id"], event)
    return fold


def probabilities_at(fold: Fold, window_days: int = 180):
    """P(win | stage) learned from the deals closed in the window that ends the day before `at`."""
    def at(ms):
        def probability(pipeline, stage):
            return win_probabilities(stage_counts(fold.outcomes.get(pipeline, {}), day_of(ms) - 1, window_days)).get(stage)
        return probability
    return at


def test_conversion_and_win_probability_of_four_closed_deals():
    fold = folded([
        *history("A", MAR_1, ["new", "qualified", "proposal"], "won", 100.0),
        *history("B", MAR_1, ["new", "qualified"], "lost"),
        *history("C", MAR_1, ["new", "proposal", "negotiation"], "lost"),  # skips qualified
        *history("D", MAR_1, ["new"], "lost"),
        *history("OLD", MAR_1 - 200 * DAY_MS, ["new"], "won", 5.0),  # closed 200 days before: outside 180 days
    ])
    counts = stage_counts(fold.outcomes["default"], day_of(MAR_1), 180)
    # [reached, won, advanced]: new 4 (A won; A, B, C went further), qualified A, B; proposal A, C; negotiation C.
    assert counts == {"new": [4, 1, 3], "qualified": [2, 1, 1], "proposal": [2, 1, 2], "negotiation": [1, 0, 0]}
    assert win_probabilities(counts) == {"new": 0.25, "qualified": 0.5, "proposal": 0.5, "negotiation": 0.0}
    assert conversion_ratios(counts) == {"new": 0.75, "qualified": 0.5, "proposal": 1.0, "negotiation": 0.0}
    assert win_probabilities(counts, min_samples=2) == {"new": 0.25, "qualified": 0.5, "proposal": 0.5}
    # The 365-day window takes OLD in: new reached 5, won 2, advanced 4 (a win counts as going further).
    assert stage_counts(fold.outcomes["default"], day_of(MAR_1), 365)["new"] == [5, 2, 4]


def test_weighted_pipeline_by_close_month_pipeline_team_and_rep():
    p = {("default", "proposal"): 0.5, ("default", "qualified"): 0.5, ("default", "negotiation"): 0.0}
    deals = [
        ("default", "proposal", 10_000.0, APR_1 + 14 * DAY_MS, "t1", "r1"),  # 5,000 in April
        ("default", "qualified", 4_000.0, APR_1 + 29 * DAY_MS, "t1", "r1"),  # 2,000 in April
        ("default", "negotiation", 8_000.0, APR_1 + 39 * DAY_MS, "t1", "r2"),  # 0 in May
        ("p2", "new", 3_000.0, APR_1, "t2", "r3"),  # no closed history in p2: left out
    ]
    assert weighted_pipeline(deals, lambda pipeline, stage: p.get((pipeline, stage))) == {
        ("2026-04", "default", "t1", "r1"): 7_000.0, ("2026-05", "default", "t1", "r2"): 0.0}


def test_month_forecast_made_at_the_months_start_against_what_was_won():
    events = [
        # March's closed history: P(win | new, qualified, proposal) = 1/2.
        *history("A", MAR_1, ["new", "qualified", "proposal"], "won", 50.0),
        *history("B", MAR_1, ["new", "qualified", "proposal"], "lost"),
        # E: in proposal on 1 April, 10,000 expected 15 April (5,000); won 14 April for 9,000. Its April update
        # comes after the forecast was made: it changes nothing.
        *history("E", MAR_1 + 9 * DAY_MS, ["new", "proposal"]),
        ev("E:u1", "deal.updated", "E", MAR_1 + 20 * DAY_MS, {"amount": 10_000.0, "close_date": APR_1 + 14 * DAY_MS}),
        ev("E:u2", "deal.updated", "E", APR_1 + 4 * DAY_MS, {"amount": 20_000.0, "close_date": APR_1 + 14 * DAY_MS}),
        ev("E:won", "deal.won", "E", APR_1 + 13 * DAY_MS, {"amount": 9_000.0}),
        # F: created in qualified for 4,000 by 30 April (2,000); lost.
        ev("F:c", "lead.created", "F", MAR_1 + 4 * DAY_MS,
           {"source": "web", "stage": "qualified", "amount": 4_000.0, "close_date": APR_1 + 29 * DAY_MS}),
        ev("F:lost", "deal.lost", "F", APR_1 + 19 * DAY_MS, {"reason": "price"}),
        # G: expected in May: not April's forecast.
        ev("G:c", "lead.created", "G", MAR_1, {"source": "web", "stage": "proposal", "amount": 6_000.0,
                                              "close_date": APR_1 + 34 * DAY_MS}),
        # H: created and won in April for 3,000: not forecast, but won.
        ev("H:c", "lead.created", "H", APR_1 + 2 * DAY_MS, {"source": "web", "stage": "new", "amount": 3_000.0,
                                                           "close_date": APR_1 + 24 * DAY_MS}),
        ev("H:won", "deal.won", "H", APR_1 + 24 * DAY_MS, {"amount": 3_000.0}),
    ]  # fmt: skip
    fold = folded(events)
    leads = [lead for (family, _), lead in fold.entities.items() if family == "lead"]
    result = month_forecast(leads, "2026-04", probabilities_at(fold), POLICY)
    assert result == {"forecast": 7_000.0, "won": 12_000.0, "accuracy_ratio": pytest.approx(1 - 5_000 / 12_000)}
    # In March nothing was forecast (no history before it) and A won 50.
    assert month_forecast(leads, "2026-03", probabilities_at(fold), POLICY) == {
        "forecast": 0.0, "won": 50.0, "accuracy_ratio": 0.0}
    assert open_deal(fold.entities[("lead", "E")], POLICY, at=APR_1 - 1) == ("default", "proposal", 10_000.0, APR_1 + 14 * DAY_MS)
    # Put in forecast category "omitted" before April, F leaves April's forecast: 5,000 remain.
    omitted = ev("F:u", "deal.updated", "F", MAR_1 + 30 * DAY_MS,
                 {"amount": 4_000.0, "close_date": APR_1 + 29 * DAY_MS, "forecast_category": "omitted"})
    fold = folded([*events, omitted])
    leads = [lead for (family, _), lead in fold.entities.items() if family == "lead"]
    assert month_forecast(leads, "2026-04", probabilities_at(fold), POLICY)["forecast"] == 5_000.0


def test_month_forecast_by_team_and_rep():
    t1r1, t1r2 = {"team_id": "t1", "rep_id": "r1"}, {"team_id": "t1", "rep_id": "r2"}
    events = [
        # March: P(win | new, qualified, proposal) = 1/2, as above.
        *history("A", MAR_1, ["new", "qualified", "proposal"], "won", 50.0, **t1r1),
        *history("B", MAR_1, ["new", "qualified", "proposal"], "lost", **t1r2),
        # E (t1, r1): proposal, 10,000 due 15 April (5,000); won for 9,000. F (t1, r2): qualified, 4,000 due 30 April
        # (2,000); lost. H (t2, r3): created and won in April for 3,000. K (no team, no rep): new, 1,000 due
        # 20 April (500), still open.
        ev("E:c", "lead.created", "E", MAR_1 + 9 * DAY_MS, {"source": "web", "stage": "proposal", "amount": 10_000.0,
                                                           "close_date": APR_1 + 14 * DAY_MS}, **t1r1),
        ev("E:won", "deal.won", "E", APR_1 + 13 * DAY_MS, {"amount": 9_000.0}),
        ev("F:c", "lead.created", "F", MAR_1 + 4 * DAY_MS, {"source": "web", "stage": "qualified", "amount": 4_000.0,
                                                           "close_date": APR_1 + 29 * DAY_MS}, **t1r2),
        ev("F:lost", "deal.lost", "F", APR_1 + 19 * DAY_MS, {"reason": "price"}),
        ev("H:c", "lead.created", "H", APR_1 + 2 * DAY_MS, {"source": "web", "stage": "new"}, team_id="t2", rep_id="r3"),
        ev("H:won", "deal.won", "H", APR_1 + 24 * DAY_MS, {"amount": 3_000.0}),
        ev("K:c", "lead.created", "K", MAR_1 + 5 * DAY_MS, {"source": "web", "stage": "new", "amount": 1_000.0,
                                                           "close_date": APR_1 + 19 * DAY_MS}),
    ]  # fmt: skip
    fold = folded(events)
    leads = [lead for (family, _), lead in fold.entities.items() if family == "lead"]
    parts = month_forecast_parts(leads, "2026-04", probabilities_at(fold), POLICY)
    assert parts == {("t1", "r1"): [5_000.0, 9_000.0], ("t1", "r2"): [2_000.0, 0.0], ("t2", "r3"): [0.0, 3_000.0],
                     (None, None): [500.0, 0.0]}  # fmt: skip
    # In all: 7,500 forecast, 12,000 won: 1 − 4,500 / 12,000.
    assert month_forecast(leads, "2026-04", probabilities_at(fold), POLICY)["accuracy_ratio"] == 0.625
    assert forecast_by(parts, "team") == [
        {"team_id": None, "forecast": 500.0, "won": 0.0, "accuracy_ratio": None},
        {"team_id": "t1", "forecast": 7_000.0, "won": 9_000.0, "accuracy_ratio": pytest.approx(1 - 2_000 / 9_000)},
        {"team_id": "t2", "forecast": 0.0, "won": 3_000.0, "accuracy_ratio": 0.0},
    ]  # fmt: skip
    assert forecast_by(parts, "rep") == [
        {"team_id": None, "rep_id": None, "forecast": 500.0, "won": 0.0, "accuracy_ratio": None},
        {"team_id": "t1", "rep_id": "r1", "forecast": 5_000.0, "won": 9_000.0, "accuracy_ratio": pytest.approx(5 / 9)},
        {"team_id": "t1", "rep_id": "r2", "forecast": 2_000.0, "won": 0.0, "accuracy_ratio": None},
        {"team_id": "t2", "rep_id": "r3", "forecast": 0.0, "won": 3_000.0, "accuracy_ratio": 0.0},
    ]  # fmt: skip
    # E handed to r2 in April: its forecast and its win count for r2, its latest rep.
    handed = ev("E:a", "lead.activity", "E", APR_1 + 5 * DAY_MS, {"kind": "call", "direction": "outbound"}, **t1r2)
    fold = folded([*events, handed])
    leads = [lead for (family, _), lead in fold.entities.items() if family == "lead"]
    parts = month_forecast_parts(leads, "2026-04", probabilities_at(fold), POLICY)
    assert (("t1", "r1") in parts, parts[("t1", "r2")]) == (False, [7_000.0, 9_000.0])


DEALS = st.lists(
    st.fixed_dictionaries({
        "pipeline": st.sampled_from([None, "p2"]),
        "stages": st.lists(st.sampled_from(ORDER), min_size=1, max_size=4),  # in time order: may go back
        "outcome": st.sampled_from(["won", "lost", None]),
        "day": st.integers(0, 400),
        "snapshots": st.lists(st.tuples(st.integers(0, 50_000), st.integers(0, 90)), max_size=3),
        "rep": st.sampled_from(["r1", "r2"]),
    }),
    min_size=1, max_size=25,
)  # fmt: skip


def events_of(i: int, deal: dict) -> list[dict]:
    envelope = {"rep_id": deal["rep"], "team_id": "t1"} | ({"pipeline": deal["pipeline"]} if deal["pipeline"] else {})
    at = MAR_1 + deal["day"] * DAY_MS
    events = history(f"L{i}", at, deal["stages"], deal["outcome"], 10.0, **envelope)
    for k, (amount, close_days) in enumerate(deal["snapshots"]):
        events.append(ev(f"L{i}:u{k}", "deal.updated", f"L{i}", at + 30 * 60_000 + k * 60_000,
                         {"amount": float(amount), "close_date": at + close_days * DAY_MS}, **envelope))  # fmt: skip
    return events


@settings(max_examples=150, deadline=None)
@given(DEALS, st.randoms(use_true_random=False), st.integers(30, 400))
def test_streaming_conversion_and_forecast_equal_a_batch_computation(deals, rnd: random.Random, window):
    events = [e for i, deal in enumerate(deals) for e in events_of(i, deal)]
    arrivals = events + rnd.sample(events, k=len(events) // 3)  # duplicates
    rnd.shuffle(arrivals)
    fold = folded(arrivals)
    last_day = max(day_of(e["occurred_at"]) for e in events)

    # Batch: straight from the deals as generated.
    batch: dict[str, defaultdict] = defaultdict(lambda: defaultdict(lambda: [0, 0, 0]))
    for i, deal in enumerate(deals):
        close_day = day_of(MAR_1 + deal["day"] * DAY_MS + len(deal["stages"]) * HOUR)
        if deal["outcome"] is None or not last_day - window < close_day <= last_day:
            continue
        pipeline = deal["pipeline"] or "default"
        order = POLICY.order(pipeline)
        for stage in order:
            if stage in deal["stages"]:
                later = any(s in deal["stages"] for s in order[order.index(stage) + 1:])
                cell = batch[pipeline][stage]
                cell[0] += 1
                cell[1] += deal["outcome"] == "won"
                cell[2] += later or deal["outcome"] == "won"
    for pipeline in ("default", "p2"):
        streamed = stage_counts(fold.outcomes.get(pipeline, {}), last_day, window)
        assert streamed == {stage: cell for stage, cell in batch[pipeline].items()}, pipeline

    def p_batch(pipeline, stage):
        reached, won, _ = batch[pipeline].get(stage, (0, 0, 0))
        return won / reached if reached else None

    expected: defaultdict[tuple, float] = defaultdict(float)
    for i, deal in enumerate(deals):
        if deal["outcome"] is None and deal["snapshots"]:
            amount, close_days = deal["snapshots"][-1]
            pipeline = deal["pipeline"] or "default"
            if (p := p_batch(pipeline, deal["stages"][-1])) is not None:
                close_ms = MAR_1 + (deal["day"] + close_days) * DAY_MS
                expected[(month_of(close_ms), pipeline, "t1", deal["rep"])] += amount * p

    def p_streamed(pipeline, stage):
        return win_probabilities(stage_counts(fold.outcomes.get(pipeline, {}), last_day, window)).get(stage)

    open_deals = [(*deal, lead["team"], lead["rep"]) for (family, _), lead in fold.entities.items()
                  if family == "lead" and (deal := open_deal(lead, POLICY)) is not None]  # fmt: skip
    streamed = weighted_pipeline(open_deals, p_streamed)
    assert streamed.keys() == expected.keys()
    for key, value in expected.items():
        assert streamed[key] == pytest.approx(value), key


# Denser: deals within four months and due within six weeks, so most months have history and deals due in them.
DENSE_DEALS = st.lists(
    st.fixed_dictionaries({
        "pipeline": st.sampled_from([None, "p2"]),
        "stages": st.lists(st.sampled_from(ORDER), min_size=1, max_size=4),
        "outcome": st.sampled_from(["won", "lost", None]),
        "day": st.integers(0, 120),
        "snapshots": st.lists(st.tuples(st.integers(0, 50_000), st.integers(0, 45)), min_size=1, max_size=3),
        "rep": st.sampled_from(["r1", "r2"]),
    }),
    min_size=5, max_size=40,
)  # fmt: skip


@settings(max_examples=150, deadline=None)
@given(DENSE_DEALS, st.randoms(use_true_random=False))
def test_streaming_month_forecast_equals_a_batch_computation(deals, rnd: random.Random):
    """The forecast of a month made at its start, from lead states folded in any order with duplicates, against
    one computed from the deals as generated: what each was at the month's first instant. The month is the one
    the first deal, kept open, is last expected to close in."""
    deals[0] = deals[0] | {"outcome": None}
    events = [e for i, deal in enumerate(deals) for e in events_of(i, deal)]
    arrivals = events + rnd.sample(events, k=len(events) // 3)
    rnd.shuffle(arrivals)
    fold = folded(arrivals)
    label = month_of(MAR_1 + (deals[0]["day"] + deals[0]["snapshots"][-1][1]) * DAY_MS)
    year, month = map(int, label.split("-"))
    start = int(datetime(year, month, 1, tzinfo=timezone.utc).timestamp() * 1000)
    window = 180

    # Batch: closed deals before the month (window ending the day before it), then each deal as of start − 1 ms.
    def times(deal):
        at = MAR_1 + deal["day"] * DAY_MS
        return at, [at + i * HOUR for i in range(len(deal["stages"]))], at + len(deal["stages"]) * HOUR

    counts: defaultdict = defaultdict(lambda: defaultdict(lambda: [0, 0]))
    last_day = start // DAY_MS - 1
    for deal in deals:
        _, _, closed = times(deal)
        if deal["outcome"] and last_day - window < closed // DAY_MS <= last_day:
            for stage in set(deal["stages"]) & set(POLICY.order(deal["pipeline"])):
                counts[deal["pipeline"] or "default"][stage][0] += 1
                counts[deal["pipeline"] or "default"][stage][1] += deal["outcome"] == "won"
    forecast = won = 0.0
    for deal in deals:
        at, entered, closed = times(deal)
        if deal["outcome"] == "won" and month_of(closed) == label:
            won += 10.0
        snapshots = [(at + 30 * 60_000 + k * 60_000, amount, at + days * DAY_MS)
                     for k, (amount, days) in enumerate(deal["snapshots"]) if at + 30 * 60_000 + k * 60_000 < start]  # fmt: skip
        if at >= start or (deal["outcome"] and closed < start) or not snapshots:
            continue
        stage = [s for s, t in zip(deal["stages"], entered) if t < start][-1]
        reached, hits = counts[deal["pipeline"] or "default"].get(stage, (0, 0))
        if reached and month_of(snapshots[-1][2]) == label:
            forecast += snapshots[-1][1] * hits / reached

    leads = [lead for (family, _), lead in fold.entities.items() if family == "lead"]
    result = month_forecast(leads, label, probabilities_at(fold, window), POLICY)
    assert result["forecast"] == pytest.approx(forecast) and result["won"] == won
