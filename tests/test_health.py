"""Deal health (streams/health.py): the documented formula with exact numbers, the bands, and the band-drop alert."""

from __future__ import annotations

import pytest
from hypothesis import given, settings, strategies as st

from crm_pulse.schemas.events import ms_to_iso
from crm_pulse.streams.deals import HEALTH_DROPPED, DealPolicy, DueIndex, apply_deal_event, fold_deal_alerted
from crm_pulse.streams.health import (
    BANDS, band, components, health, health_alerts, health_inputs, quiet_crossings, quiet_drops,
)  # fmt: skip
from crm_pulse.streams.kpis import DAY_MS
from crm_pulse.streams.leads import StallPolicy, apply_lead_event, new_lead

T = 1_772_323_200_000  # 2026-03-01T00:00Z


def norms(stage):
    # proposal: a 7-day norm (the stall threshold), learned p50 2 days and p90 6 days; "new": nothing learned.
    return {"proposal": (7 * DAY_MS, 2 * 86400.0, 6 * 86400.0)}.get(stage, (2 * DAY_MS, None, None))


INPUTS = {"stage": "proposal", "entered": T, "last_activity": T + DAY_MS, "pushes": 1, "regressions": 0,
          "amount": 8_000.0, "highest": 10_000.0}  # fmt: skip


def test_five_days_into_proposal_after_one_push_and_a_cut():
    parts = components(INPUTS, T + 5 * DAY_MS, norms)
    # Idle 4 days ≤ the 7-day norm: 1. Dwell 5 days, between p50 (2) and p90 (6): 1 − 0.5 × 3/4. One push of 3:
    # 2/3. No regression: 1. Amount 8,000 of its highest 10,000: 0.8.
    assert parts == {"recency": 1.0, "dwell": 0.625, "pushes": pytest.approx(2 / 3), "regressions": 1.0, "amount": 0.8}
    # 30 + 25 × 0.625 + 20 × 2/3 + 10 + 15 × 0.8 = 30 + 15.625 + 13.333 + 10 + 12 = 80.958
    assert health(INPUTS, T + 5 * DAY_MS, norms) == 81.0 and band(81.0) == "healthy"


def test_thirteen_days_in_is_at_risk():
    # Idle 12 days: 2 − 12/7 = 0.2857 (8.571 points). Dwell 13 days > p90: 0.5 − 0.5 × 7/6 < 0: 0.
    # 8.571 + 0 + 13.333 + 10 + 12 = 43.9
    assert health(INPUTS, T + 13 * DAY_MS, norms) == 43.9 and band(43.9) == "at_risk"
    # Without learned dwell, the norm (2 days in "new") is p90 and 1 day p50: 1.5 days in is 0.75 of dwell.
    fresh = INPUTS | {"stage": "new", "last_activity": None, "pushes": 0, "amount": 10_000.0}
    assert components(fresh, T + DAY_MS + DAY_MS // 2, norms)["dwell"] == 0.75
    assert band(39.9) == "critical" and band(40.0) == "at_risk" and band(70.0) == "healthy"
    # A stage configured at 0 days: any idle time is past its norm and any dwell past its p90 (no division by 0).
    zero = components(fresh, T + 10, lambda stage: (0, None, None))
    assert (zero["recency"], zero["dwell"]) == (0.0, 0.0)


def test_a_band_drop_raises_one_alert_with_both_bands():
    policy, lead = DealPolicy(), new_lead()
    events = [
        {"event_id": "c", "type": "lead.created", "occurred_at": T, "rep_id": "r1",
         "payload": {"source": "web", "stage": "proposal", "amount": 10_000.0, "close_date": T + 30 * DAY_MS}},
        {"event_id": "u", "type": "deal.updated", "occurred_at": T + DAY_MS,
         "payload": {"amount": 8_000.0, "close_date": T + 40 * DAY_MS}},
    ]  # fmt: skip
    for event in events:
        apply_lead_event(lead, event, "L1", StallPolicy(), lambda stage: (7 * DAY_MS, "stage_threshold"))
        apply_deal_event(lead, event)
    assert health_inputs(lead, policy) == {"stage": "proposal", "entered": T, "last_activity": None, "pushes": 1,
                                           "regressions": 0, "amount": 8_000.0, "highest": 10_000.0}  # fmt: skip
    assert health_alerts(lead, "L1", policy, T + DAY_MS, norms, "u") == [] and lead["health_band"] == "healthy"
    [alert] = health_alerts(lead, "L1", policy, T + 13 * DAY_MS, norms, "a1")
    # Idle 13 days since entering (no activity): recency 2 − 13/7 = 1/7 (4.286); 4.286 + 13.333 + 10 + 12 = 39.6
    assert (alert["type"], alert["health"], alert["health_band"], alert["previous_health_band"]) == (
        HEALTH_DROPPED, 39.6, "critical", "healthy")
    assert alert["detected_at"] == ms_to_iso(T + 13 * DAY_MS) and alert["rep_id"] == "r1"
    assert health_alerts(lead, "L1", policy, T + 14 * DAY_MS, norms, "a2") == []  # still critical: nothing new


def test_a_lead_without_an_amount_has_health_too_and_a_closed_one_none():
    lead = new_lead()
    created = {"event_id": "c", "type": "lead.created", "occurred_at": T, "payload": {"source": "web", "stage": "new"}}
    apply_lead_event(lead, created, "L2", StallPolicy(), lambda stage: (2 * DAY_MS, "stage_threshold"))
    inputs = health_inputs(lead, DealPolicy())
    assert (inputs["pushes"], inputs["amount"], inputs["highest"]) == (0, None, None)
    # A day into "new" (norm 2 days, none learned: p50 1 day): recency 1, dwell 1, pushes 1, regressions 1, amount 1.
    assert health(inputs, T + DAY_MS, norms) == 100.0
    lost = {"event_id": "l", "type": "deal.lost", "occurred_at": T + DAY_MS, "payload": {"reason": "price"}}
    apply_lead_event(lead, lost, "L2", StallPolicy(), lambda stage: (2 * DAY_MS, "stage_threshold"))
    assert health_inputs(lead, DealPolicy()) is None


def test_a_quiet_deal_foresees_each_band_it_falls_to():
    # INPUTS from day 5 with nothing more: constant parts 20 × 2/3 + 10 + 15 × 0.8 = 35.33. From day 8 (its last
    # activity, day 1, plus the 7-day norm) recency falls by 30/7 a day and dwell (past p90, day 6) by 25/12:
    # 73.67 at day 8, below 69.95 (69.9 once rounded) 3.717/6.369 = 0.5836 days later. Dwell is 0 from day 12
    # (48.19), and recency alone takes it below 39.95 at 2 − (d − 1)/7 = 4.617/30: day 13.923.
    crossings = quiet_crossings(INPUTS, T + 5 * DAY_MS, norms)
    assert [(band_, score) for _, band_, score in crossings] == [("at_risk", 69.9), ("critical", 39.9)]
    days = [(at - T) / DAY_MS for at, _, _ in crossings]
    assert days == [pytest.approx(8.5836, abs=1e-4), pytest.approx(13.9228, abs=1e-4)]
    for at, band_, _ in crossings:  # the first ms in the band: a ms earlier it was not yet in it
        assert band(health(INPUTS, at, norms)) == band_ != band(health(INPUTS, at - 1, norms))
    # Already critical: nothing further to fall to. Health that never goes below 70 (nothing lost but time,
    # and time takes at most 55 points): 45 at worst, one drop.
    assert quiet_crossings(INPUTS, T + 14 * DAY_MS, norms) == []
    clean = INPUTS | {"pushes": 0, "amount": 10_000.0}
    assert [band_ for _, band_, _ in quiet_crossings(clean, T + 5 * DAY_MS, norms)] == ["at_risk"]


def first_below_by_bisection(inputs, after, norms, lower, horizon):
    """The independent reference: the first ms after `after` with health below `lower`, by plain bisection
    over health itself (non-increasing in time while nothing happens)."""
    if health(inputs, horizon, norms) >= lower:
        return None
    lo, hi = after, horizon
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if health(inputs, mid, norms) < lower else (mid, hi)
    return hi


days = st.integers(min_value=0, max_value=40 * DAY_MS)


@settings(max_examples=200, deadline=None)
@given(entered=days, active_after=st.one_of(st.none(), days), now_after=days, norm=st.integers(0, 20 * DAY_MS),
       p50=st.one_of(st.none(), st.floats(0, 10 * 86400)), p90_extra=st.floats(0, 20 * 86400),
       pushes=st.integers(0, 4), regressions=st.integers(0, 3), share=st.sampled_from([0.0, 0.35, 0.8, 1.0]))
def test_foreseen_drops_match_a_bisection_of_health_itself(entered, active_after, now_after, norm, p50, p90_extra,
                                                            pushes, regressions, share):  # fmt: skip
    inputs = {"stage": "s", "entered": T + entered, "pushes": pushes, "regressions": regressions,
              "last_activity": None if active_after is None else T + entered + active_after,
              "amount": 10_000.0 * share, "highest": 10_000.0}  # fmt: skip
    learned = (norm, p50, None if p50 is None else p50 + p90_extra)
    now = T + entered + now_after
    horizon = T + 200 * DAY_MS  # past every break of these inputs: flat from there
    expected, at, current = [], now, band(health(inputs, now, lambda _: learned))
    while current != "critical" and (at := first_below_by_bisection(inputs, at, lambda _: learned,
                                                                    dict(BANDS)[current], horizon)):  # fmt: skip
        current = band(health(inputs, at, lambda _: learned))
        expected.append([at, current, health(inputs, at, lambda _: learned)])
    assert quiet_crossings(inputs, now, lambda _: learned) == expected


def quiet_lead():
    """A proposal deal of 10,000 created at T, cut to 8,000 and pushed on day 1; no activity since."""
    lead = new_lead()
    for event in (
        {"event_id": "c", "type": "lead.created", "occurred_at": T, "rep_id": "r1",
         "payload": {"source": "web", "stage": "proposal", "amount": 10_000.0, "close_date": T + 30 * DAY_MS}},
        {"event_id": "u", "type": "deal.updated", "occurred_at": T + DAY_MS,
         "payload": {"amount": 8_000.0, "close_date": T + 40 * DAY_MS}},
    ):  # fmt: skip
        apply_lead_event(lead, event, "L1", StallPolicy(), lambda stage: (7 * DAY_MS, "stage_threshold"))
        apply_deal_event(lead, event)
    assert health_alerts(lead, "L1", DealPolicy(), T + DAY_MS, norms, "u") == []
    return lead


def test_the_timer_and_the_next_event_raise_the_same_quiet_drop_once():
    # As `test_a_band_drop_raises_one_alert_with_both_bands`, no activity since entering on day 0: recency 1 to
    # day 7, then 2 − d/7; dwell 0.5 at day 6 falling to 0 at day 12. At day 7: 35.33 + 30 + 10.42 = 75.75, then
    # 6.369 a day less: at_risk 5.8/6.369 = 0.9107 days later (69.9); critical (39.9) where
    # 35.33 + 30 × (2 − d/7) = 39.95, day 12.923.
    lead = quiet_lead()
    [(at_risk, _, _), (critical, _, _)] = lead["health_quiet"]
    assert ((at_risk - T) / DAY_MS, (critical - T) / DAY_MS) == (pytest.approx(7.9107, abs=1e-4),
                                                                 pytest.approx(12.9228, abs=1e-4))  # fmt: skip
    index = DueIndex(DealPolicy())
    index.update("L1", lead)
    assert index.due(at_risk) == [] and index.due(at_risk + 1) == ["L1"]
    # The timer, on a copy of the saved lead at day 10, and the agent, before it applies an activity of day 10:
    scanned = dict(lead)
    by_timer = quiet_drops(scanned, "L1", T + 10 * DAY_MS)
    by_event = quiet_drops(lead, "L1", T + 10 * DAY_MS)
    assert by_timer == by_event and len(by_timer) == 1
    [alert] = by_timer
    assert (alert["type"], alert["detected_at"], alert["health"], alert["health_band"], alert["previous_health_band"],
            alert["stage"], alert["amount"]) == (HEALTH_DROPPED, ms_to_iso(at_risk), 69.9, "at_risk", "healthy",
                                                 "proposal", 8_000.0)  # fmt: skip
    # What the timer raised, folded into the saved lead: the event raises it no more; the index waits for critical.
    fold_deal_alerted(lead := quiet_lead(), scanned["deal_alerted"])
    assert quiet_drops(lead, "L1", T + 10 * DAY_MS) == [] and lead["health_band"] == "at_risk"
    index.update("L1", lead)
    assert index.due(critical + 1) == ["L1"]
    # An activity at day 10 leaves it at risk (recency 1, dwell 0.5 − 0.5 × 4/6: 35.33 + 30 + 4.17 = 69.5): no
    # drop, and a new foresight from day 10: critical once recency, falling from day 17, is below 4.617/30, on
    # day 10 + 7 × (2 − 0.15389) = 22.923.
    activity = {"event_id": "a", "type": "lead.activity", "occurred_at": T + 10 * DAY_MS,
                "payload": {"kind": "call", "direction": "outbound"}}  # fmt: skip
    apply_lead_event(lead, activity, "L1", StallPolicy(), lambda stage: (7 * DAY_MS, "stage_threshold"))
    assert health_alerts(lead, "L1", DealPolicy(), T + 10 * DAY_MS, norms, "a") == []
    [(at, band_, score)] = lead["health_quiet"]
    assert (lead["health_band"], band_, score) == ("at_risk", "critical", 39.9)
    assert (at - T) / DAY_MS == pytest.approx(22.9228, abs=1e-4)
