"""Deal health (streams/health.py): the documented formula with exact numbers, the bands, and the band-drop alert."""

from __future__ import annotations

import pytest

from crm_pulse.schemas.events import ms_to_iso
from crm_pulse.streams.deals import HEALTH_DROPPED, DealPolicy, apply_deal_event
from crm_pulse.streams.health import band, components, health, health_alerts, health_inputs
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
