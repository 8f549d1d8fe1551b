"""Deal inspection end to end on the embedded broker: deal alerts from events (slip, decrease, regression) and
from the timer (past due, in event time), once each, keyed by rep, as version-2 records."""

from __future__ import annotations

import time

import orjson
import pytest

from crm_pulse.streams.kpis import DAY_MS

pytestmark = pytest.mark.integration

T0 = 1_767_225_600_000  # 2026-01-01T00:00:00Z


def event(event_id, event_type, lead, at, rep="rep-7", **payload):
    return {"event_id": event_id, "type": event_type, "occurred_at": at, "lead_id": lead, "rep_id": rep,
            "team_id": "t1", "payload": payload}  # fmt: skip


def m(name, **labels):
    return (name, tuple(sorted(labels.items())))


def test_deal_alerts_once_each_keyed_by_rep(start_worker):
    # No stall alerts in the way: thresholds far beyond the events' span.
    worker = start_worker(CRM_PULSE_STALL_DEFAULT_DAYS="100", CRM_PULSE_STALL_STAGE_DAYS="{}", CRM_PULSE_GRACE_SECONDS="3600")
    worker.send(
        event("d1", "lead.created", "D1", T0, source="web", amount=1000.0, close_date=T0 + 5 * DAY_MS),
        # Pushed from day 5 to day 10 and cut to 700 (30 %): two alerts from one update.
        event("d2", "deal.updated", "D1", T0 + DAY_MS, amount=700.0, close_date=T0 + 10 * DAY_MS),
        event("d3", "lead.stage_changed", "D1", T0 + 2 * DAY_MS, **{"from": "new", "to": "qualified"}),
        event("d4", "lead.stage_changed", "D1", T0 + 3 * DAY_MS, **{"from": "qualified", "to": "new"}),
        event("d1", "lead.created", "D1", T0, source="web", amount=1000.0, close_date=T0 + 5 * DAY_MS),  # a duplicate
        # Another lead moves event time to day 20: the timer finds D1 past due (day 10 + 1 day of grace).
        event("e1", "lead.created", "E1", T0 + 20 * DAY_MS, rep="rep-8", source="web"),
    )
    worker.wait_for(lambda got: got.get(m("crm_alerts_emitted_total", type="deal.past_due")) == 1, what="past due")
    records = worker.read("alerts", 4)
    alerts = [orjson.loads(r.value) for r in records]
    assert [r.key for r in records] == [b"rep-7"] * 4
    assert [(a["type"], a["detected_at"]) for a in alerts] == [
        ("deal.amount_decreased", "2026-01-02T00:00:00.000Z"),  # one time: in the order of their types' names
        ("deal.close_date_slipped", "2026-01-02T00:00:00.000Z"),
        ("deal.stage_regressed", "2026-01-04T00:00:00.000Z"),
        ("deal.past_due", "2026-01-12T00:00:00.000Z"),
    ]
    assert {a["schema_version"] for a in alerts} == {2}
    assert (alerts[1]["push_count"], alerts[0]["decrease_ratio"]) == (1, pytest.approx(0.3))
    assert (alerts[2]["from_stage"], alerts[2]["to_stage"]) == ("qualified", "new")
    # Scans every 0.5 s: later scans and events raise nothing again.
    worker.send(event("d5", "lead.activity", "D1", T0 + 21 * DAY_MS, kind="call", direction="inbound"))
    worker.wait_for(lambda got: got.get(m("crm_events_processed_total", type="lead.activity")) == 1, what="activity")
    time.sleep(2)
    assert len(worker.read("alerts", 4, timeout=3)) == 4


def test_a_quiet_deal_drops_a_band_from_the_timer_once(start_worker):
    worker = start_worker(CRM_PULSE_STALL_STAGE_DAYS='{"new": 2}', CRM_PULSE_GRACE_SECONDS="3600")
    # H: new, 1,000 due day 60, never pushed, cut or moved back: 45 points that time cannot take. Its norm in
    # "new" is the 2-day threshold (nothing learned: p90 2 days, p50 1): from day 2, recency 2 − d/2 and dwell
    # 1 − d/4, so 45 + 30 × (2 − d/2) + 25 × (1 − d/4) = 130 − 21.25 d falls below 69.95 at day 2.825882
    # (19:49:16.235 on 3 January): at risk, 69.9. Never critical.
    worker.send(
        event("h1", "lead.created", "H", T0, source="web", amount=1000.0, close_date=T0 + 60 * DAY_MS),
        event("e1", "lead.created", "E1", T0 + 10 * DAY_MS, rep="rep-8", source="web"),  # event time to day 10
    )
    drops = m("crm_alerts_emitted_total", type="deal.health_dropped")
    worker.wait_for(lambda got: got.get(drops) == 1, what="the quiet drop from the timer",
                    explain=lambda got: f"{got.get(drops)} drops")  # fmt: skip
    # An activity on day 11 (the timer's drop, raised before it, is not raised again): healthy again at 75. Quiet
    # from there, recency alone falls below 24.95/30 once idle 2 × (2 − 0.8317) = 2.3367 days: day 13.3367.
    worker.send(event("h2", "lead.activity", "H", T0 + 11 * DAY_MS, kind="call", direction="inbound"),
                event("e2", "lead.created", "E2", T0 + 20 * DAY_MS, rep="rep-8", source="web"))  # fmt: skip
    # E1 and E2, plain leads (no amount, no close date), are no deals: their health falls as H's, unannounced.
    worker.wait_for(lambda got: got.get(drops) == 2, what="the second quiet drop",
                    explain=lambda got: f"{got.get(drops)} drops")  # fmt: skip
    time.sleep(2)  # scans every 0.5 s: nothing more comes
    found = [a for r in worker.read_all("alerts") if (a := orjson.loads(r.value))["type"] == "deal.health_dropped"]
    assert [(a["lead_id"], a["detected_at"][:19], a["health"], a["previous_health_band"], a["health_band"])
            for a in found] == [("H", "2026-01-03T19:49:16", 69.9, "healthy", "at_risk"),
                                ("H", "2026-01-14T08:04:48", 69.9, "healthy", "at_risk")]  # fmt: skip
    assert len({a["alert_id"] for a in found}) == 2 and worker.metrics()[drops] == 2


def test_conversion_weighted_pipeline_and_forecast_on_metrics_and_query(start_worker):
    worker = start_worker(CRM_PULSE_GRACE_SECONDS="3600")
    feb_1 = T0 + 31 * DAY_MS
    events = [
        # January's closed history: W new → qualified → won; X new → lost.
        event("w1", "lead.created", "W", T0, source="web"),
        event("w2", "lead.stage_changed", "W", T0 + DAY_MS, **{"from": "new", "to": "qualified"}),
        event("w3", "deal.won", "W", T0 + 2 * DAY_MS, amount=500.0),
        event("x1", "lead.created", "X", T0, source="web"),
        event("x2", "deal.lost", "X", T0 + DAY_MS, reason="price"),
        # Open on 1 February: O in qualified, 1,000 by 10 February; P in new, 2,000 by 20 February.
        event("o1", "lead.created", "O", T0 + 4 * DAY_MS, source="web", stage="qualified", amount=1000.0,
              close_date=feb_1 + 9 * DAY_MS),
        event("p1", "lead.created", "P", T0 + 5 * DAY_MS, source="web"),
        event("p2", "deal.updated", "P", T0 + 6 * DAY_MS, amount=2000.0, close_date=feb_1 + 19 * DAY_MS),
        event("o2", "deal.won", "O", feb_1 + 11 * DAY_MS, amount=1200.0),
    ]
    worker.send(*sorted(events, key=lambda e: e["occurred_at"]))  # none late (grace: 1 h)
    weighted = m("crm_pipeline_weighted_value", close_month="2026-02", pipeline="default", team="t1", rep="rep-7")
    metrics = worker.wait_for(
        lambda got: got.get(m("crm_deal_closed_reached", pipeline="default", stage="qualified")) == 2
        and got.get(weighted) == 1000.0,
        what="O's win in the outcomes and P alone in the weighted pipeline",
    )
    # Through 12 February: new reached by W, X (W won, went on); qualified by W, O (both won).
    assert metrics[m("crm_deal_win_probability_ratio", pipeline="default", stage="new")] == 0.5
    assert metrics[m("crm_deal_win_probability_ratio", pipeline="default", stage="qualified")] == 1.0
    assert metrics[m("crm_deal_stage_conversion_ratio", pipeline="default", stage="new")] == 0.5
    status, body = worker.get_json("/deals/forecast?month=2026-02")
    assert status == 200
    assert body["stages"]["default"]["closed_reached"] == {"new": 2, "qualified": 2}
    assert body["weighted_pipeline"] == [
        {"close_month": "2026-02", "pipeline": "default", "team_id": "t1", "rep_id": "rep-7", "weighted_value": 1000.0}]
    # Made on 1 February with January's history (P(qualified) = 1, P(new) = 1/2): 1,000 + 1,000; won: 1,200.
    february = {"forecast": 2000.0, "won": 1200.0, "accuracy_ratio": pytest.approx(1 / 3)}
    # One team and one rep here (the breakdown's own numbers are tests/test_forecast.py's).
    assert body["forecast"] == {"month": "2026-02", **february, "by_team": [{"team_id": "t1", **february}],
                                "by_rep": [{"team_id": "t1", "rep_id": "rep-7", **february}]}  # fmt: skip
    assert worker.get_json("/deals/forecast?month=2026-13")[0] == 400
    # On /metrics: February's (the current month's) forecast and won so far; January's: nothing forecast, W's 500 won.
    assert {(labels, name): v for (name, labels), v in metrics.items() if name.startswith("crm_forecast_")} == {
        ((("window", "month_current"),), "crm_forecast_weighted_value"): 2000.0,
        ((("window", "month_current"),), "crm_forecast_won_value"): 1200.0,
        ((("window", "month_previous"),), "crm_forecast_weighted_value"): 0.0,
        ((("window", "month_previous"),), "crm_forecast_won_value"): 500.0,
        # By team and rep: only those with a deal forecast or won in the month.
        ((("rep", "rep-7"), ("team", "t1"), ("window", "month_current")), "crm_forecast_rep_weighted_value"): 2000.0,
        ((("rep", "rep-7"), ("team", "t1"), ("window", "month_current")), "crm_forecast_rep_won_value"): 1200.0,
        ((("rep", "rep-7"), ("team", "t1"), ("window", "month_previous")), "crm_forecast_rep_weighted_value"): 0.0,
        ((("rep", "rep-7"), ("team", "t1"), ("window", "month_previous")), "crm_forecast_rep_won_value"): 500.0}
    # P's health at the watermark (12 February − 1 h), 37 days in "new" (norm: its 2-day stall threshold, too
    # few exits to learn from): recency 0, dwell 0, no push (20), no regression (10), amount at its highest (15).
    assert {labels: v for (name, labels), v in metrics.items() if name == "crm_deal_health_deals"} == {
        (("band", band), ("pipeline", "default")): n for band, n in (("healthy", 0), ("at_risk", 1), ("critical", 0))}
    status, body = worker.get_json("/deals/health?rep=rep-7")
    assert status == 200 and [(d["lead_id"], d["health"], d["band"]) for d in body["deals"]] == [("P", 45.0, "at_risk")]
    assert worker.get_json("/deals/health?band=healthy")[1]["deals"] == []
    # Won: W and O of 3 closed (all source web, rep-7); the stage each left: W qualified, O qualified, X new.
    status, body = worker.get_json("/commonalities")
    won = {(r["dimension"], r["value"]): (r["count"], r["of"]) for r in body["won"]}
    assert status == 200 and won == {("source", "web"): (2, 3), ("rep", "rep-7"): (2, 3), ("stage", "qualified"): (2, 2)}
    assert [(r["dimension"], r["value"]) for r in body["won"]][0] == ("stage", "qualified")
    assert worker.get_json("/commonalities?min=x")[0] == 400
