"""The pure KPI, stall, routing and clock functions, checked against numbers worked out by hand.

Times are UTC. D0 is the epoch day of 2026-01-01 (56 years × 365 days + 14 leap days = 20454);
`at(d, h, m)` is "day d hh:mm" counted from 2026-01-01 00:00Z.
"""

from collections import Counter, defaultdict

import pytest

from crm_pulse.streams.catalogue import KPIS, apply_sums, event_sums, window_sums
from crm_pulse.streams.clock import Clock, UpstreamWatermark
from crm_pulse.streams.kpis import (
    DAY_MS,
    Churn,
    advance_churn_horizon,
    apply_dwell,
    apply_spell,
    bucket_index,
    churn,
    day_of,
    dwell_stats,
    histogram_quantile,
    window_day_range,
)
from crm_pulse.streams.leads import (
    CLEARED,
    ESCALATED,
    STALLED,
    StallPolicy,
    apply_lead_event,
    check_stall,
    current_stage,
    idle_since,
    is_open,
    new_lead,
)
from crm_pulse.streams.dedupe import first_seen
from crm_pulse.streams.entities import apply_customer_event

D0 = 20454
H = 3_600_000  # one hour in ms
POLICY = StallPolicy(stage_days={"qualified": 5})  # other open stages: 7 days


def at(day: int, hour: int = 0, minute: int = 0) -> int:
    return (D0 + day) * DAY_MS + hour * H + minute * 60_000


def ev(event_id: str, kind: str, at_ms: int, payload: dict | None = None, **envelope) -> dict:
    return {"event_id": event_id, "type": kind, "occurred_at": at_ms, "payload": payload or {}, **envelope}


CALL = {"kind": "call", "direction": "outbound"}


def configured(stage: str) -> tuple[int, str]:
    return POLICY.threshold(stage, None, 0)


# --- stage dwell -------------------------------------------------------------------------------


def test_day_zero_is_2026_01_01():
    assert at(0) == 1_767_225_600_000


def test_bucket_bounds_are_inclusive():
    assert bucket_index(3_600_000) == 0  # exactly 1 h: first bucket (≤ 1 h)
    assert bucket_index(3_600_001) == 1  # just over 1 h: (1 h, 6 h]
    assert bucket_index(54 * H) == 5  # 54 h = 194400 s in (2 d = 172800, 3 d = 259200]
    assert bucket_index(365 * DAY_MS) == 16
    assert bucket_index(365 * DAY_MS + 1) == 17  # +Inf


def test_dwell_histogram_apply_and_retract():
    # Four leads left a stage on day 3 after 30 min, 54 h, 54 h and 96 h.
    state: dict = {}
    for dwell in (30 * 60_000, 54 * H, 54 * H, 96 * H):
        apply_dwell(state, D0 + 3, dwell, +1)
    cell = state["days"][str(D0 + 3)]
    # sum: 1_800_000 + 2 × 194_400_000 + 345_600_000 = 736_200_000 ms
    # buckets: 30 min → 0 (≤ 1 h); 54 h → 5 ((2 d, 3 d]); 96 h = 4 d → 6 ((3 d, 5 d])
    assert cell == [4, 736_200_000] + [1, 0, 0, 0, 0, 2, 1] + [0] * 11

    apply_dwell(state, D0 + 3, 54 * H, -1)
    assert cell == [3, 541_800_000] + [1, 0, 0, 0, 0, 1, 1] + [0] * 11

    for dwell in (30 * 60_000, 54 * H, 96 * H):
        apply_dwell(state, D0 + 3, dwell, -1)
    assert state["days"] == {}


def test_dwell_stats_count_mean_and_quantiles():
    state: dict = {}
    for dwell in (30 * 60_000, 54 * H, 54 * H, 96 * H):
        apply_dwell(state, D0 + 3, dwell, +1)
    apply_dwell(state, D0 - 7, 2 * H, +1)  # 10 days earlier, 2 h → bucket 1 ((1 h, 6 h])
    now = at(3, 12)

    week = dwell_stats(state, now, 7)  # days -3..3: the day -7 observation is out
    assert (week.count, week.sum_seconds, week.mean_seconds) == (4, 736_200.0, 184_050.0)
    # p50: rank 0.5 × 4 = 2; bucket 0 holds 1, bucket 5 (172800, 259200] reaches 3 ≥ 2
    #      → 172800 + 86400 × (2 - 1) / 2 = 216000
    assert week.quantile_seconds(0.5) == pytest.approx(216_000)
    # p90: rank 3.6; cumulative 3 after bucket 5, bucket 6 (259200, 432000] reaches 4
    #      → 259200 + 172800 × (3.6 - 3) / 1 = 362880
    assert week.quantile_seconds(0.9) == pytest.approx(362_880)

    month = dwell_stats(state, now, 30)
    assert (month.count, month.sum_seconds) == (5, 743_400.0)  # + 7200 s
    # p50: rank 2.5; buckets 0 and 1 hold 2, bucket 5 reaches 4 → 172800 + 86400 × 0.5 / 2 = 194400
    assert month.quantile_seconds(0.5) == pytest.approx(194_400)
    # p90: rank 4.5; bucket 6 reaches 5 → 259200 + 172800 × 0.5 = 345600
    assert month.quantile_seconds(0.9) == pytest.approx(345_600)

    empty = dwell_stats(state, at(50), 7)
    assert (empty.count, empty.mean_seconds, empty.quantile_seconds(0.5)) == (0, None, None)


def test_histogram_quantile_edges():
    first_bucket_only = [1] + [0] * 17
    assert histogram_quantile(0.5, first_bucket_only) == pytest.approx(1_800)  # 0 + 3600 × 0.5
    inf_only = [0] * 17 + [3]
    assert histogram_quantile(0.5, inf_only) == 365 * 86_400.0  # highest finite bound
    assert histogram_quantile(0.5, [0] * 18) is None


def test_window_day_range_edges():
    assert window_day_range(at(10, 15), 7) == range(D0 + 4, D0 + 11)
    assert window_day_range(at(10), 7) == range(D0 + 4, D0 + 11)  # midnight belongs to its day
    assert window_day_range(at(10) - 1, 7) == range(D0 + 3, D0 + 10)
    assert window_day_range(at(10, 15), 30) == range(D0 - 19, D0 + 11)


def dwell_facts(deltas: list) -> list:
    """The stage-dwell facts among a lead's fact deltas, as (stage, left_at_ms, dwell_ms, ±1)."""
    return sorted((scope.removeprefix("dwell:"), left, ms, sign) for (_, scope, left, ms, *_), sign in deltas
                  if scope.startswith("dwell:"))  # fmt: skip


def test_lead_dwell_deltas_retract_when_an_earlier_move_arrives_late():
    lead = new_lead()
    created = ev("c", "lead.created", at(0, 10), {"source": "web", "stage": "qualified"})
    apply_lead_event(lead, created, "L1", POLICY, configured)
    # Won on day 5 00:00: in qualified from day 0 10:00 = 4 d 14 h = 110 h.
    deltas, _ = apply_lead_event(lead, ev("w", "deal.won", at(5), {"amount": 10.0}), "L1", POLICY, configured)
    assert dwell_facts(deltas) == [("qualified", at(5), 110 * H, 1)]
    # A move to proposal on day 2 16:00 arrives late: qualified lasted 54 h, proposal 56 h (to day 5 00:00).
    move = ev("m", "lead.stage_changed", at(2, 16), {"from": "qualified", "to": "proposal"})
    deltas, _ = apply_lead_event(lead, move, "L1", POLICY, configured)
    assert dwell_facts(deltas) == [
        ("proposal", at(5), 56 * H, 1),
        ("qualified", at(2, 16), 54 * H, 1),
        ("qualified", at(5), 110 * H, -1),
    ]


def test_a_new_rep_moves_the_new_deal_and_other_events_derive_no_facts():
    lead = new_lead()
    apply_lead_event(lead, ev("c", "lead.created", at(0, 9), {"source": "web", "stage": "new"}, rep_id="r1"), "L1",
                     POLICY, configured)  # fmt: skip
    deltas, _ = apply_lead_event(lead, ev("p", "lead.stage_changed", at(1), {"from": "new", "to": "proposal"},
                                          rep_id="r1"), "L1", POLICY, configured)  # fmt: skip
    # Proposal is a deal stage: the lead became a deal on day 1, overall, for r1 and for source web; new 15 h.
    assert sorted(deltas) == [
        (("hist", "dwell:new", at(1), 15 * H), 1),
        (("sums", "all", at(1), "new_deals", 1), 1),
        (("sums", "rep:r1", at(1), "new_deals", 1), 1),
        (("sums", "source:web", at(1), "new_deals", 1), 1),
    ]
    # The same rep's activity, a quote, and an older event of another rep (it does not own the lead): no facts.
    assert apply_lead_event(lead, ev("a1", "lead.activity", at(2), CALL, rep_id="r1"), "L1", POLICY, configured) == ([], [])
    assert apply_lead_event(lead, ev("q", "quote.sent", at(2, 1), {"amount": 5.0}, rep_id="r1"), "L1", POLICY,
                            configured) == ([], [])  # fmt: skip
    assert apply_lead_event(lead, ev("a0", "lead.activity", at(0, 12), CALL, rep_id="r2"), "L1", POLICY,
                            configured) == ([], [])  # fmt: skip
    assert lead["rep"] == "r1"
    # r2's later activity makes r2 the lead's rep: the deal moves from r1 to r2, on the day it became one.
    deltas, _ = apply_lead_event(lead, ev("a2", "lead.activity", at(3), CALL, rep_id="r2"), "L1", POLICY, configured)
    assert sorted(deltas, key=repr) == [
        (("sums", "rep:r1", at(1), "new_deals", 1), -1),
        (("sums", "rep:r2", at(1), "new_deals", 1), 1),
    ]


def test_equal_stays_of_one_lead_each_count():
    # Date-only timestamps: created in qualified, re-qualified twice on day 0 (ids order them), proposal on day 1.
    # Stays: qualified 0 ms (c→q1), qualified 0 ms (q1→q2), qualified 24 h (q2→p), all in the same lead.
    lead, facts = new_lead(), []
    for event in (
        ev("c", "lead.created", at(0), {"source": "import", "stage": "qualified"}),
        ev("q1", "lead.stage_changed", at(0), {"from": "qualified", "to": "qualified"}),
        ev("q2", "lead.stage_changed", at(0), {"from": "qualified", "to": "qualified"}),
        ev("p", "lead.stage_changed", at(1), {"from": "qualified", "to": "proposal"}),
    ):
        facts += apply_lead_event(lead, event, "L1", POLICY, configured)[0]
    assert dwell_facts(facts) == [
        ("qualified", at(0), 0, 1),
        ("qualified", at(0), 0, 1),
        ("qualified", at(1), 24 * H, 1),
    ]


# --- win rate ----------------------------------------------------------------------------------

WIN_RATE = next(kpi for kpi in KPIS if kpi.name == "win_rate_ratio")


def test_deal_outcomes_count_overall_and_for_the_rep():
    won = ev("w", "deal.won", at(4, 9), {"amount": 250.0}, rep_id="r1")
    assert event_sums(won) == [("all", {"won": 1, "won_amount": 250.0}), ("rep:r1", {"won": 1, "won_amount": 250.0})]
    assert event_sums(ev("l", "deal.lost", at(4), {"reason": "price"})) == [("all", {"lost": 1})]


def test_win_rate_per_window_and_rep():
    events = [
        ev("a", "deal.won", at(4), {"amount": 100.0}, rep_id="r1"),  # first day of the 7d window ending day 10
        ev("b", "deal.lost", at(10, 23), {"reason": "price"}, rep_id="r1"),  # its last day (after now, same day)
        ev("c", "deal.won", at(4) - 1, {"amount": 50.0}, rep_id="r2"),  # day 3 23:59:59.999: outside 7d
        ev("d", "deal.lost", at(7), {"reason": "timing"}),  # no rep: overall only
        ev("e", "deal.won", at(8), {"amount": 30.0}, rep_id="r2"),
    ]
    scopes: dict = defaultdict(dict)
    for event in events:
        for scope, values in event_sums(event):
            apply_sums(scopes[scope], day_of(event["occurred_at"]), values)
    today = day_of(at(10, 15))
    assert set(scopes) == {"all", "rep:r1", "rep:r2"}

    def win_rate(scope, days):
        sums = window_sums(scopes[scope], today, days)
        return sums.get("won", 0), sums.get("lost", 0), WIN_RATE.formula(sums, {}, days)

    assert win_rate("all", 7) == (2, 2, 0.5)  # won a, e; lost b, d
    assert window_sums(scopes["all"], today, 7)["won_amount"] == 130.0  # 100 + 30
    assert win_rate("all", 30) == (3, 2, 0.6)
    assert win_rate("rep:r1", 7) == (1, 1, 0.5)
    assert win_rate("rep:r2", 7) == (1, 0, 1.0)
    assert win_rate("rep:r2", 30) == (2, 0, 1.0)
    assert WIN_RATE.formula(window_sums(scopes["rep:r2"], today + 30, 7), {}, 7) is None  # nothing decided


# --- churn -------------------------------------------------------------------------------------

# now = day 60 12:00 → the 30-day window is days 31..60.
CUSTOMER_HISTORY = {
    "c1": [("subscribed", 0), ("renewed", 20), ("renewed", 50)],  # active throughout, renewals start nothing
    "c2": [("subscribed", 5), ("cancelled", 25)],  # cancelled before the window
    "c3": [("subscribed", 10), ("cancelled", 40)],  # cancelled inside the window
    "c4": [("subscribed", 45)],  # subscribed inside the window
    "c5": [("subscribed", 2), ("cancelled", 31)],  # cancelled on the window's first day
}


def customer_base(history: dict, horizon: int | None = None) -> dict:
    state: dict = {}
    if horizon is not None:
        advance_churn_horizon(state, horizon)
    for customer_id, events in history.items():
        customer: dict = {}
        for i, (kind, day) in enumerate(events):
            event = ev(f"{customer_id}-{i}", f"customer.{kind}", at(day, 9), customer_id=customer_id)
            spell_deltas, _ = apply_customer_event(customer, event)
            for start, end, sign in spell_deltas:
                apply_spell(state, start, end, sign)
    return state


def test_churn_on_a_hand_made_history():
    result = churn(customer_base(CUSTOMER_HISTORY), at(60, 12))
    # active at start: c1, c3, c5; churned: c3, c5; active now: c1, c4
    assert result == Churn(active_at_start=3, churned=2, active_now=2)
    assert result.churn_ratio == pytest.approx(2 / 3)
    assert result.retention_ratio == pytest.approx(1 / 3)
    # Window days 41..70: only c1 was active at its start, nobody cancelled in it, c1 and c4 are active.
    assert churn(customer_base(CUSTOMER_HISTORY), at(70)) == Churn(1, 0, 2)
    assert Churn(0, 0, 0).churn_ratio is None and Churn(0, 0, 0).retention_ratio is None


def test_churn_horizon_compaction_keeps_windows_from_the_horizon_on():
    full = customer_base(CUSTOMER_HISTORY)
    compacted = customer_base(CUSTOMER_HISTORY)
    advance_churn_horizon(compacted, D0 + 31)
    # c2 ended (day 25) before the horizon and is dropped; starts before it collapse onto day 30.
    assert compacted["spells"] == {
        f"{D0 + 30}|": 1,  # c1
        f"{D0 + 30}|{D0 + 40}": 1,  # c3
        f"{D0 + 45}|": 1,  # c4
        f"{D0 + 30}|{D0 + 31}": 1,  # c5
    }
    advance_churn_horizon(compacted, D0 + 20)  # the horizon never moves back
    assert compacted["horizon"] == D0 + 31
    for now in (at(60, 12), at(70), at(90)):  # windows start on days 31, 41, 61
        assert churn(compacted, now) == churn(full, now)

    # c1 cancels on day 65: the retraction of its open spell must hit the compacted key.
    cancel = [("subscribed", 0), ("renewed", 20), ("renewed", 50), ("cancelled", 65)]
    full = customer_base({**CUSTOMER_HISTORY, "c1": cancel})
    compacted = customer_base({**CUSTOMER_HISTORY, "c1": cancel}, horizon=D0 + 31)
    assert churn(compacted, at(70)) == churn(full, at(70)) == Churn(1, 1, 1)  # c1 churned, c4 active


# --- stall rules -------------------------------------------------------------------------------


def test_stall_policy_threshold():
    day = 86_400.0
    assert POLICY.threshold("qualified", None, 0) == (5 * DAY_MS, "stage_threshold")
    assert POLICY.threshold("proposal", None, 0) == (7 * DAY_MS, "stage_threshold")  # default
    assert POLICY.threshold("qualified", 1 * day, 20) == (2 * DAY_MS, "p90_dwell")  # 2 × 1 d < 5 d
    assert POLICY.threshold("qualified", 1 * day, 19) == (5 * DAY_MS, "stage_threshold")  # too few samples
    assert POLICY.threshold("qualified", 3 * day, 20) == (5 * DAY_MS, "stage_threshold")  # 6 d ≥ 5 d
    assert POLICY.threshold("qualified", 0.0, 50) == (5 * DAY_MS, "stage_threshold")


def test_stall_threshold_from_an_observed_dwell_histogram():
    state: dict = {}
    for _ in range(20):
        apply_dwell(state, D0 + 3, 54 * H, +1)
    stats = dwell_stats(state, at(4), 30)
    # p90: rank 18 of 20, all in (172800, 259200] → 172800 + 86400 × 18/20 = 250560 s; 2 × p90 = 501120 s
    assert stats.quantile_seconds(0.9) == pytest.approx(250_560)
    assert POLICY.threshold("qualified", stats.quantile_seconds(0.9), stats.count) == (5 * DAY_MS, "stage_threshold")
    assert POLICY.threshold("proposal", stats.quantile_seconds(0.9), stats.count) == (501_120_000, "p90_dwell")


def created_lead(lead_id: str = "L1", **envelope) -> dict:
    """A lead that entered `qualified` (5-day threshold) on day 0 10:00."""
    lead = new_lead()
    created = ev(f"{lead_id}-c", "lead.created", at(0, 10), {"source": "web", "stage": "qualified"}, **envelope)
    apply_lead_event(lead, created, lead_id, POLICY, configured)
    return lead


def without_id(alert: dict) -> dict:
    return {k: v for k, v in alert.items() if k != "alert_id"}


def test_alerts_carry_the_leads_account_and_latest_quote():
    lead = created_lead(account_id="acct-acme")
    for n, amount in enumerate((9_000.0, 12_500.0)):
        quote = ev(f"q{n}", "quote.sent", at(1 + n), {"quote_id": f"Q{n}", "amount": amount}, lead_id="L1")
        apply_lead_event(lead, quote, "L1", POLICY, configured)
    [stalled] = check_stall(lead, "L1", at(5, 10) + 1, POLICY, configured)
    assert (stalled["account_id"], stalled["deal_value"]) == ("acct-acme", 12_500.0)


def test_check_stall_levels_fire_once_each():
    lead = created_lead(rep_id="r1", team_id="t1", pipeline="p1")
    assert check_stall(lead, "L1", at(5, 10), POLICY, configured) == []  # idle exactly 5 d: not yet
    [stalled] = check_stall(lead, "L1", at(5, 10) + 1, POLICY, configured)
    assert without_id(stalled) == {
        "schema_version": 1,
        "type": STALLED,
        "lead_id": "L1",
        "rep_id": "r1",
        "team_id": "t1",
        "pipeline": "p1",
        "stage": "qualified",
        "idle_since": "2026-01-01T10:00:00.000Z",
        "idle_seconds": 432_000.0,  # detected at idle_since + 5 d
        "threshold_seconds": 432_000.0,
        "rule": "stage_threshold",
        "detected_at": "2026-01-06T10:00:00.000Z",
        "account_id": None,
        "deal_value": None,
    }
    assert check_stall(lead, "L1", at(9), POLICY, configured) == []  # never repeated
    assert check_stall(lead, "L1", at(10, 10), POLICY, configured) == []  # exactly 2 × threshold
    [escalated] = check_stall(lead, "L1", at(10, 10) + 1, POLICY, configured)
    assert (escalated["type"], escalated["idle_seconds"], escalated["detected_at"]) == (
        ESCALATED, 864_000.0, "2026-01-11T10:00:00.000Z"
    )  # fmt: skip
    assert check_stall(lead, "L1", at(30), POLICY, configured) == []
    assert lead["stall_level"] == 2

    fresh = created_lead()
    alerts = check_stall(fresh, "L1", at(20), POLICY, configured)  # both levels crossed at once
    assert [(a["type"], a["detected_at"], a["rep_id"]) for a in alerts] == [
        (STALLED, "2026-01-06T10:00:00.000Z", "unassigned"),
        (ESCALATED, "2026-01-11T10:00:00.000Z", "unassigned"),
    ]


def test_activity_clears_a_stall_and_restarts_the_clock():
    lead = created_lead(rep_id="r1")
    check_stall(lead, "L1", at(20), POLICY, configured)
    # Activity older than the idle start moves nothing and clears nothing.
    assert apply_lead_event(lead, ev("old", "lead.activity", at(0, 9), CALL), "L1", POLICY, configured) == ([], [])
    deltas, [cleared] = apply_lead_event(lead, ev("a", "lead.activity", at(11, 10), CALL), "L1", POLICY, configured)
    assert deltas == []
    assert (cleared["type"], cleared["stage"], cleared["idle_since"], cleared["detected_at"]) == (
        CLEARED, "qualified", "2026-01-01T10:00:00.000Z", "2026-01-12T10:00:00.000Z"
    )  # fmt: skip
    # idle 11 d = 950400 s when the activity arrived; the threshold it had crossed was 5 d
    assert (cleared["idle_seconds"], cleared["threshold_seconds"]) == (950_400.0, 432_000.0)
    assert cleared["rule"] == "stage_threshold"
    assert lead["stall_level"] == 0
    assert check_stall(lead, "L1", at(16, 10), POLICY, configured) == []  # 5 d after the activity
    [again] = check_stall(lead, "L1", at(16, 10) + 1, POLICY, configured)
    assert again["idle_since"] == "2026-01-12T10:00:00.000Z"


def test_moving_or_closing_clears_a_stall():
    lead = created_lead()
    check_stall(lead, "L1", at(6), POLICY, configured)
    move = ev("m", "lead.stage_changed", at(6), {"from": "qualified", "to": "proposal"})
    deltas, [cleared] = apply_lead_event(lead, move, "L1", POLICY, configured)
    assert dwell_facts(deltas) == [("qualified", at(6), 134 * H, 1)]  # day 0 10:00 → day 6 00:00 = 5 d 14 h
    assert (cleared["type"], cleared["stage"]) == (CLEARED, "qualified")
    assert cleared["detected_at"] == "2026-01-07T00:00:00.000Z"

    closed = created_lead()
    check_stall(closed, "L1", at(6), POLICY, configured)
    _, alerts = apply_lead_event(closed, ev("w", "deal.won", at(7), {"amount": 10.0}), "L1", POLICY, configured)
    assert [a["type"] for a in alerts] == [CLEARED]
    assert check_stall(closed, "L1", at(40), POLICY, configured) == []  # closed leads never stall


@pytest.mark.parametrize("won_first", [False, True], ids=["created-delivered-first", "won-delivered-first"])
def test_a_lead_won_before_its_creation_date_is_closed_with_a_cycle_of_zero(won_first):
    # An export dates the win day 8 12:00 and the creation day 10 00:00: the history starts at the creation, so the
    # win counts there: closed, 0 ms in "qualified", a cycle of 0 ms, the lead a deal and a win on day 10.
    created = ev("c", "lead.created", at(10), {"source": "web", "stage": "qualified"}, rep_id="r1")
    won = ev("w", "deal.won", at(8, 12), {"amount": 10.0}, rep_id="r1")
    lead, net, alerts = new_lead(), Counter(), []
    for event in (won, created) if won_first else (created, won):
        deltas, raised = apply_lead_event(lead, event, "L1", POLICY, configured)
        net.update(dict(deltas))
        alerts += raised
    assert +net == {
        ("hist", "dwell:qualified", at(10), 0): 1,
        ("hist", "cycle:all", at(10), 0): 1,
        ("sums", "all", at(10), "new_deals", 1): 1,
        ("sums", "rep:r1", at(10), "new_deals", 1): 1,
        ("sums", "source:web", at(10), "new_deals", 1): 1,
        ("sums", "source:web", at(10), "won", 1): 1,
    }
    assert (current_stage(lead), is_open(lead, POLICY), idle_since(lead)) == ("won", False, at(10))
    assert alerts == [] and check_stall(lead, "L1", at(40), POLICY, configured) == []


def test_a_close_at_the_creation_time_follows_the_creation_whatever_the_ids():
    # Date-only exports give a same-day close the creation's time; the lost event's id sorts before the creation's.
    lead = new_lead()
    apply_lead_event(lead, ev("x-created", "lead.created", at(3), {"source": "web", "stage": "new"}), "L1", POLICY,
                     configured)  # fmt: skip
    deltas, _ = apply_lead_event(lead, ev("x-closed", "deal.lost", at(3), {"reason": "price"}), "L1", POLICY,
                                 configured)  # fmt: skip
    assert dwell_facts(deltas) == [("new", at(3), 0, 1)]
    assert (current_stage(lead), is_open(lead, POLICY)) == ("lost", False)
    assert check_stall(lead, "L1", at(30), POLICY, configured) == []


def test_a_stage_dated_before_the_creation_counts_from_it_and_a_later_move_still_counts():
    # Proposal dated day 1, creation day 2 in "new", negotiation day 5: new 0 ms, proposal 3 days (from day 2).
    lead, facts = new_lead(), []
    for event in (
        ev("p", "lead.stage_changed", at(1), {"from": "new", "to": "proposal"}),
        ev("c", "lead.created", at(2), {"source": "web", "stage": "new"}),
        ev("n", "lead.stage_changed", at(5), {"from": "proposal", "to": "negotiation"}),
    ):
        facts += apply_lead_event(lead, event, "L1", POLICY, configured)[0]
    net = Counter()
    for fact, sign in facts:
        net[fact] += sign
    assert sorted((scope, left, ms) for (kind, scope, left, ms, *_), n in (+net).items() if kind == "hist") == [
        ("dwell:new", at(2), 0), ("dwell:proposal", at(5), 3 * DAY_MS),
    ]
    assert (current_stage(lead), idle_since(lead)) == ("negotiation", at(5))


def test_late_activity_catches_up_on_a_missed_stall():
    lead = created_lead()  # no scan ran; the next activity comes 6 days later
    _, alerts = apply_lead_event(lead, ev("a", "lead.activity", at(6, 10), CALL), "L1", POLICY, configured)
    assert [(a["type"], a["detected_at"]) for a in alerts] == [
        (STALLED, "2026-01-06T10:00:00.000Z"),
        (CLEARED, "2026-01-07T10:00:00.000Z"),
    ]
    _, alerts = apply_lead_event(created_lead(), ev("a", "lead.activity", at(12), CALL), "L1", POLICY, configured)
    assert [a["type"] for a in alerts] == [STALLED, ESCALATED, CLEARED]


def test_alert_ids_are_deterministic():
    live = created_lead()
    [by_timer] = check_stall(live, "L1", at(5, 11), POLICY, configured)
    replayed = created_lead()
    activity = ev("a", "lead.activity", at(6, 10), CALL)
    _, (by_replay, cleared) = apply_lead_event(replayed, activity, "L1", POLICY, configured)
    assert by_timer == by_replay  # same id and fields whether the timer or a replay noticed it
    [other_lead] = check_stall(created_lead("L2"), "L2", at(5, 11), POLICY, configured)
    assert len({by_timer["alert_id"], cleared["alert_id"], other_lead["alert_id"]}) == 3


# --- de-duplication (streams.dedupe) -------------------------------------------------------------------


def test_first_seen_skips_re_reads_and_duplicates_and_forgets_ids_before_the_given_time():
    entity: dict = {}
    old, edge, new = (ev(name, "lead.activity", at(day), CALL) for name, day in (("old", 1), ("edge", 8), ("new", 10)))
    assert first_seen(entity, old, 0, 5, None)
    assert not first_seen(entity, old, 0, 5, None)  # the same message re-read after a crash
    assert not first_seen(entity, new, 0, 4, None)  # an earlier one of that partition: applied before "old"
    assert not first_seen(entity, old, 1, 3, None)  # the same event id sent again, through partition 1
    assert first_seen(entity, edge, 0, 6, at(7))  # ids of events before day 7 are forgotten: "old" (day 1)
    assert entity["seen"] == {"edge": at(8)}
    assert first_seen(entity, new, 1, 4, at(8))  # day 8 itself is kept
    assert entity["seen"] == {"edge": at(8), "new": at(10)}
    assert entity["read"] == {"0": 6, "1": 4}
    assert not first_seen(entity, edge, 1, 9, at(8))
    assert first_seen(entity, old, 1, 10, at(8))  # forgotten: only a late event could repeat it
    assert "old" not in entity["seen"]


# --- clock -------------------------------------------------------------------------------------


def test_clock_lateness_is_per_partition_windows_end_at_the_latest_and_stalls_use_the_slowest():
    clock = Clock("event", grace_ms=2 * DAY_MS)
    assert (clock.now_ms(), clock.watermark_ms) == (None, None)
    clock.observe(0, at(10))
    clock.observe(1, at(5))
    clock.observe(0, at(9))  # older events never lower a partition's mark
    assert clock.seen == {"0": at(10), "1": at(5)} and clock.saved == {}
    clock.save(0)
    assert clock.saved == {"0": at(10)}
    assert clock.now_ms() == clock.latest_ms == at(10)
    assert clock.watermark_ms == at(5)
    assert clock.partition_watermark(0) == at(8)  # nothing older than day 8 is accepted from partition 0
    assert clock.is_late(0, at(8) - 1)  # more than 2 d behind partition 0's day 10
    assert not clock.is_late(0, at(8))
    assert not clock.is_late(1, at(4))  # partition 1 is only at day 5
    assert not clock.is_late(2, at(0))  # nothing seen on partition 2


def test_clock_resumes_from_saved_marks_but_judges_lateness_on_what_it_has_read():
    saved = {"0": at(10), "1": at(7)}  # the worker passes its event-time table
    clock = Clock("event", grace_ms=2 * DAY_MS, saved=saved)
    assert (clock.now_ms(), clock.watermark_ms) == (at(10), at(7))
    # A message re-read after a restart is not late against marks of events read before the crash.
    assert not clock.is_late(0, at(1))
    clock.observe(0, at(11))
    clock.save(0)
    assert saved == {"0": at(11), "1": at(7)}
    assert clock.is_late(0, at(9) - 1)
    clock.keep_only([1])  # partition 0 moved to another worker
    assert not clock.is_late(0, at(1))


def test_windows_end_at_the_latest_event_of_any_partition_also_of_those_only_heard_of():
    # This worker reads partition 0; partition 1's events go to another worker, which forwards its
    # watermark (latest − grace) with every envelope.
    clock = Clock("event", grace_ms=2 * DAY_MS, saved={"0": at(10)})
    clock.hear(at(9))  # partition 1 is at day 11
    assert clock.now_ms() == clock.latest_ms == at(11)
    clock.hear(at(8))  # an older watermark never moves it back
    assert clock.now_ms() == at(11)
    assert clock.watermark_ms == at(10)  # lateness and stalls still go by what this worker read
    clock.observe(0, at(12))
    assert clock.now_ms() == at(12)


def test_saved_watermarks_are_the_restored_marks_less_the_grace_period():
    clock = Clock("wall", grace_ms=2 * DAY_MS, saved={"3": at(10), "1": at(7)})
    assert clock.saved_watermarks() == [[1, at(5)], [3, at(8)]]
def test_upstream_watermark_is_the_least_advanced_pair_of_own_and_input_partition():
    upstream = UpstreamWatermark(sources=2)
    upstream.keep_only([0, 1])
    upstream.observe(0, 0, at(5))
    upstream.observe(1, 1, at(9))
    upstream.observe(0, 0, at(4))  # an older watermark on the same path never lowers it
    upstream.observe(0, 1, at(6))
    # Own partition 1 has not heard from input partition 0: it may still bring anything older.
    assert upstream.watermark_ms is None
    upstream.observe(1, 0, at(3))  # input partition 0 reached own partition 1 with an older watermark
    assert upstream.watermark_ms == at(3)
    upstream.keep_only([0])  # own partition 1 moved to another worker
    assert upstream.marks == {(0, 0): at(5), (0, 1): at(6)}
    assert upstream.watermark_ms == at(5)
    upstream.keep_only([0, 2])  # own partition 2 taken over: nothing heard on it yet
    assert upstream.watermark_ms is None


def test_wall_clock_reads_the_system_time(monkeypatch):
    monkeypatch.setattr("crm_pulse.streams.clock.time.time", lambda: 1_767_225_600.25)
    clock = Clock("wall", grace_ms=0)
    clock.observe(0, at(-30))
    assert clock.now_ms() == 1_767_225_600_250
    assert clock.watermark_ms == at(-30)
