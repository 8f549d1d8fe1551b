"""Calendar periods in the business time zone, checked against dates worked out by hand.

Day numbers count days since 1970-01-01: 2018-01-01 is 48 × 365 + 12 leap days = 17532, a Monday.
"""

from zoneinfo import ZoneInfo

import pytest

from crm_pulse.streams.catalogue import apply_sums, event_sums, group_sums, period_customer_base, period_kpis, period_sums, prune_sums
from crm_pulse.streams.kpis import DAY_MS, apply_dwell, apply_spell, day_of, period_dwell_stats
from crm_pulse.streams.periods import (
    LONGEST_LOOKBACK_DAYS,
    current_periods,
    parse_period,
    period_days,
    period_of,
    periods_since,
    previous_period,
)

JAN_1_2018 = 17532
BERLIN, NEW_YORK = ZoneInfo("Europe/Berlin"), ZoneInfo("America/New_York")
H = 3_600_000


def utc(day: int, hour: float = 0) -> int:
    return day * DAY_MS + int(hour * H)


def fold(events, zone=None) -> dict:
    """The KPI sums of scope "all", as agents/aggregates.py applies them."""
    state: dict = {}
    contributions = [(scope, e["occurred_at"], values, 1) for e in events for scope, values in event_sums(e)]
    for (scope, day, sign), values in group_sums(contributions, zone).items():
        if scope == "all":
            apply_sums(state, day, values, sign)
    return state


def won(at_ms: int, amount: float) -> dict:
    return {"type": "deal.won", "occurred_at": at_ms, "payload": {"amount": amount}, "rep_id": None}


def lost(at_ms: int) -> dict:
    return {"type": "deal.lost", "occurred_at": at_ms, "payload": {"reason": "price"}, "rep_id": None}


def lead(at_ms: int) -> dict:
    return {"type": "lead.created", "occurred_at": at_ms, "payload": {"source": "web"}, "rep_id": None}


def test_iso_weeks_start_on_monday_and_the_first_week_holds_the_first_thursday():
    assert period_of("week", JAN_1_2018) == "2018-W01"
    assert period_days("week", "2018-W01") == (JAN_1_2018, JAN_1_2018 + 6)
    # 2021-01-03 (day 18630) is a Sunday of 2020's 53rd week, which began on Monday 2020-12-28 (18624).
    assert period_of("week", 18630) == "2020-W53"
    assert period_of("week", 18631) == "2021-W01"
    assert period_days("week", "2020-W53") == (18624, 18630)
    assert previous_period("week", "2021-W01") == "2020-W53"


def test_months_and_quarters_span_their_calendar_days():
    assert period_days("month", "2018-02") == (JAN_1_2018 + 31, JAN_1_2018 + 58)
    assert period_days("month", "2020-02") == (18293, 18321)  # 2020-02-01 … 29, a leap year
    assert period_days("quarter", "2018-Q2") == (17622, 17712)  # 1 April + 30 + 31 + 30 − 1 days
    assert period_days("quarter", "2018-Q4") == (17805, 17896)
    assert previous_period("quarter", "2018-Q1") == "2017-Q4"
    assert previous_period("month", "2018-01") == "2017-12"


def test_a_quarter_boundary_falls_on_the_business_zones_midnight():
    berlin_night = utc(17621, 22.5)  # 2018-03-31 22:30Z: 1 April 00:30 in Berlin (summer time, UTC+2)
    assert (day_of(berlin_night), day_of(berlin_night, BERLIN)) == (17621, 17622)
    assert (period_of("quarter", 17621), period_of("quarter", 17622)) == ("2018-Q1", "2018-Q2")
    new_york_night = utc(17622, 3.5)  # 2018-04-01 03:30Z: 31 March 23:30 in New York (UTC−4)
    assert (day_of(new_york_night), day_of(new_york_night, NEW_YORK)) == (17622, 17621)

    events = [won(berlin_night, 100), won(utc(17621, 21.5), 50), won(new_york_night, 7)]  # 21:30Z: 23:30 in Berlin
    in_berlin = fold(events, BERLIN)
    assert period_sums(in_berlin, "quarter", "2018-Q1") == {"won": 1, "won_amount": 50}
    assert period_sums(in_berlin, "quarter", "2018-Q2") == {"won": 2, "won_amount": 107}
    in_new_york = fold(events, NEW_YORK)
    assert period_sums(in_new_york, "quarter", "2018-Q1") == {"won": 3, "won_amount": 157}
    in_utc = fold(events)
    assert period_sums(in_utc, "quarter", "2018-Q1") == {"won": 2, "won_amount": 150}
    assert period_sums(in_utc, "month", "2018-04") == {"won": 1, "won_amount": 7}


def test_period_kpis_of_a_month_and_its_growth_over_the_month_before():
    feb = JAN_1_2018 + 31
    events = [lead(utc(JAN_1_2018 + d, 9)) for d in (0, 3, 10, 30)]  # 4 in January, the last on the 31st
    events += [lead(utc(feb + d, 9)) for d in range(6)]  # 6 in February
    events += [won(utc(feb + 1, 10), 100), won(utc(feb + 2, 10), 200), won(utc(feb + 27, 23), 300), lost(utc(feb + 5))]
    state = fold(events)
    prune_sums(state, feb + 200)  # the daily buckets are long gone: the month cells stay
    assert state["days"] == {}
    values = {kpi.metric(None): value for kpi, value in period_kpis(state, "month", "2018-02")}
    assert values == {
        "crm_deals_won": 3, "crm_deals_lost": 1, "crm_win_rate_ratio": 0.75, "crm_won_revenue": 600,
        "crm_average_deal_size": 200, "crm_new_leads": 6, "crm_new_deals": 0, "crm_conversion_ratio": 0.5,
        "crm_lead_velocity_ratio": 0.5,  # (6 − 4) / 4
    }  # fmt: skip
    quarter = {kpi.metric(None): value for kpi, value in period_kpis(state, "quarter", "2018-Q1")}
    # 10 leads; no leads in 2017-Q4, so no growth; no win rate without a decided deal … here 3 of 4.
    assert (quarter["crm_new_leads"], quarter["crm_win_rate_ratio"], "crm_lead_velocity_ratio" in quarter) == (10, 0.75, False)


def test_a_retraction_empties_its_period_cells():
    state: dict = {}
    apply_sums(state, JAN_1_2018 + 3, {"won": 1})
    apply_sums(state, JAN_1_2018 + 3, {"won": 1}, sign=-1)
    assert state["periods"] == {"week": {}, "month": {}}


def test_durations_by_period_sum_the_months_of_a_quarter():
    state: dict = {}
    for day, hours in ((JAN_1_2018 + 1, 2), (JAN_1_2018 + 40, 10), (JAN_1_2018 + 95, 30)):  # January, February, April
        apply_dwell(state, day, hours * H, 1)
    q1 = period_dwell_stats(state, "quarter", "2018-Q1")
    assert (q1.count, q1.sum_seconds, q1.mean_seconds) == (2, 12 * 3600, 6 * 3600)
    assert period_dwell_stats(state, "month", "2018-04").count == 1
    assert period_dwell_stats(state, "week", "2018-W01").sum_seconds == 2 * 3600


def test_the_customer_base_over_a_month():
    state: dict = {}
    feb, mar = JAN_1_2018 + 31, JAN_1_2018 + 59
    for start, end in ((JAN_1_2018, feb + 10), (JAN_1_2018 + 5, None), (feb + 3, None), (feb + 4, feb + 20), (mar, None)):
        apply_spell(state, start, end, 1)
    # Active on 1 Feb: the first two; one of them cancelled in February; two began in it, one of whom left; two active at its end.
    assert period_customer_base(state, "month", "2018-02") == {
        "churn_ratio": 0.5, "retention_ratio": 0.5, "customers_active_at_window_start": 2, "customers_churned": 1,
        "customer_base_growth_ratio": 0.0, "customers_new": 2,
    }  # fmt: skip


def test_the_periods_read_now_and_how_far_back_they_reach():
    sunday = JAN_1_2018 + 181  # 2018-07-01, the Sunday ending ISO week 26
    assert current_periods(sunday) == [
        ("week_current", "week", "2018-W26"), ("week_previous", "week", "2018-W25"),
        ("month_current", "month", "2018-07"), ("month_previous", "month", "2018-06"),
        ("quarter_current", "quarter", "2018-Q3"), ("quarter_previous", "quarter", "2018-Q2"),
    ]  # fmt: skip
    reach = max(today - period_days(kind, label)[0] for today in range(17532, 17532 + 3 * 366)
                for _, kind, label in current_periods(today))  # fmt: skip
    assert reach == LONGEST_LOOKBACK_DAYS - 1 == 183  # on 31 December, back to 1 July


def test_periods_since_a_first_period_up_to_today():
    assert periods_since("month", "2017-11", JAN_1_2018 + 40) == ["2017-11", "2017-12", "2018-01", "2018-02"]
    assert periods_since("quarter", "2018-Q1", JAN_1_2018) == ["2018-Q1"]
    assert periods_since("month", "2018-03", JAN_1_2018) == []


@pytest.mark.parametrize("kind, label, message", [
    ("month", "2018-13", "'2018-13' is not a month: expected YYYY-MM, e.g. 2018-01"),
    ("month", "2018-1", "'2018-1' is not a month: expected YYYY-MM, e.g. 2018-01"),
    ("week", "2018-W53", "'2018-W53' is not a week: expected YYYY-Www, e.g. 2018-W05"),  # 2018 has 52
    ("quarter", "2018-Q5", "'2018-Q5' is not a quarter: expected YYYY-Qn, e.g. 2018-Q1"),
    ("fortnight", "2018-01", "period 'fortnight' is not one of week, month, quarter"),
])  # fmt: skip
def test_a_bad_period_says_what_is_expected(kind, label, message):
    with pytest.raises(ValueError) as raised:
        parse_period(kind, label)
    assert str(raised.value) == message
