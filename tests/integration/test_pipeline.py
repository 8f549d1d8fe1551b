"""End to end on the real embedded broker: events in, exact KPIs on /metrics, alerts on the alerts topic,
bad input on the dead-letter topic."""

from __future__ import annotations

import base64
import time
import uuid

import orjson
import pytest

from crm_pulse.streams.kpis import DAY_MS

pytestmark = pytest.mark.integration

HOUR = 3_600_000
T0 = 1_767_225_600_000  # 2026-01-01T00:00:00Z, a Thursday


def lead_event(event_id, event_type, lead, at, rep="r1", **payload):
    return {"event_id": event_id, "type": event_type, "occurred_at": at, "lead_id": lead, "rep_id": rep,
            "team_id": "t1", "payload": payload}  # fmt: skip


def customer_event(event_id, event_type, customer, at):
    return {"event_id": event_id, "type": event_type, "occurred_at": at, "customer_id": customer, "payload": {}}


def m(name, **labels):
    return (name, tuple(sorted(labels.items())))


def test_kpis_from_events_with_duplicates_and_disorder(start_worker):
    worker = start_worker()
    now = T0 + 40 * DAY_MS  # the last event; event-time clock: "now" is the watermark
    events = [
        # Customers: C1 active since day 0, cancels day 35 (inside the 30d window [day 11, day 40]);
        # C2 active since day 1, renews; C3 subscribes day 20 (not active at the window start);
        # C4 subscribed day 2 and cancelled day 5, before the window. Active at start: C1, C2 → churn 1/2.
        customer_event("c1", "customer.subscribed", "C1", T0),
        customer_event("c2", "customer.subscribed", "C2", T0 + 1 * DAY_MS),
        customer_event("c3", "customer.subscribed", "C4", T0 + 2 * DAY_MS),
        customer_event("c4", "customer.cancelled", "C4", T0 + 5 * DAY_MS),
        customer_event("c5", "customer.subscribed", "C3", T0 + 20 * DAY_MS),
        customer_event("c6", "customer.renewed", "C2", T0 + 31 * DAY_MS),
        customer_event("c7", "customer.cancelled", "C1", T0 + 35 * DAY_MS),
        # Lead A: new for 10 h, qualified for 30 h, then won by r1 on day 39.
        lead_event("a1", "lead.created", "A", T0 + 38 * DAY_MS, source="web"),
        lead_event("a2", "lead.stage_changed", "A", T0 + 38 * DAY_MS + 10 * HOUR, **{"from": "new", "to": "qualified"}),
        lead_event("a3", "deal.won", "A", T0 + 38 * DAY_MS + 40 * HOUR, amount=1000),
        # Lead B (rep r2): new for 20 h then lost; its stage change arrives before its creation.
        lead_event("b2", "deal.lost", "B", T0 + 39 * DAY_MS + 20 * HOUR, rep="r2", reason="price"),
        lead_event("b1", "lead.created", "B", T0 + 39 * DAY_MS, rep="r2", source="referral"),
        # Lead C (r1): lost; closes the watermark at day 40.
        lead_event("c9", "lead.created", "C", now - 2 * HOUR, source="web"),
        lead_event("c10", "deal.lost", "C", now, reason="timing"),
    ]
    # Re-deliveries within the grace period (2 days) are ignored; an older one is dead-lettered as late.
    duplicates = [events[8], events[10], events[12]]
    worker.send(*events, *duplicates, events[6])

    # Aggregates trail the per-entity agents by one internal topic, and each delta topic by its own lag (one
    # Kafka CI run read the qualified-stage delta after the new-stage ones): wait until the broker has every
    # topic committed to its end.
    worker.wait_for(
        lambda got: sum(v for (name, _), v in got.items() if name == "crm_events_processed_total") == len(events),
        what="all events to be processed",
    )
    worker.wait_until_group_settled("every delta applied", timeout=60)
    metrics = worker.metrics()
    # new: A 10 h, B 20 h, C 2 h → 3 exits, mean 32/3 h; qualified: A 30 h.
    assert metrics[m("crm_stage_dwell_observations", stage="new", window="7d")] == 3
    assert metrics[m("crm_stage_dwell_mean_seconds", stage="new", window="7d")] == pytest.approx(32 * 3600 / 3)
    assert metrics[m("crm_stage_dwell_mean_seconds", stage="qualified", window="30d")] == 30 * 3600
    # 3 new-stage exits of 2 h, 10 h, 20 h: buckets (6h]=1, (12h]=1, (1d]=1; p50 rank 1.5 falls in (6h, 12h]
    # at half way: 6 h + 0.5 × 6 h = 9 h.
    assert metrics[m("crm_stage_dwell_p50_seconds", stage="new", window="7d")] == 9 * 3600
    # Win rate: 1 won, 2 lost overall; r1: 1 won 1 lost; r2: 0 won 1 lost.
    assert metrics[m("crm_win_rate_ratio", window="7d")] == pytest.approx(1 / 3)
    assert metrics[m("crm_rep_win_rate_ratio", window="30d", rep="r1")] == 0.5
    assert metrics[m("crm_rep_win_rate_ratio", window="30d", rep="r2")] == 0.0
    assert metrics[m("crm_deals_won", window="30d")] == 1
    assert metrics[m("crm_churn_ratio", window="30d")] == 0.5
    assert metrics[m("crm_retention_ratio", window="30d")] == 0.5
    assert metrics[m("crm_customers_active_at_window_start", window="30d")] == 2
    assert metrics[m("crm_customers_active")] == 2  # C2 and C3
    assert metrics[m("crm_events_duplicate_total", type="lead.created")] == 1
    assert metrics[m("crm_events_duplicate_total", type="lead.stage_changed")] == 1
    assert metrics[m("crm_events_duplicate_total", type="deal.lost")] == 1
    assert metrics[m("crm_events_invalid_total", reason="late")] == 1
    assert metrics[m("crm_events_received_total")] == len(events) + len(duplicates) + 1
    assert metrics[m("crm_event_time_watermark_seconds")] == now / 1000

    # The query API serves the same numbers as JSON.
    status, body = worker.get_json("/kpis/win-rate")
    assert status == 200 and body["watermark"] == "2026-02-10T00:00:00.000Z" and body["partitions"] == [0]
    # Every deal closed on 9 or 10 February, in ISO week 7: no earlier week, month or quarter has a win rate.
    assert {(s["labels"]["window"], s["value"]) for s in body["kpis"]["crm_win_rate_ratio"]} == {
        ("7d", 1 / 3), ("30d", 1 / 3), ("all", 1 / 3), ("week_current", 1 / 3), ("month_current", 1 / 3),
        ("quarter_current", 1 / 3)}  # fmt: skip
    status, body = worker.get_json("/kpis")
    # This week (days 39-45): C2 and C3 active at its start, none churned; last week (32-38) and February (31-58):
    # C1, C2, C3, and C1 cancelled on day 35. Nobody was active before 1 January: no churn for January or Q1.
    assert {s["labels"]["window"]: s["value"] for s in body["kpis"]["crm_churn_ratio"]} == {
        "30d": 0.5, "week_current": 0.0, "week_previous": 1 / 3, "month_current": 1 / 3}
    assert worker.get_json("/kpis/no-such-family")[0] == 404


def test_stalled_lead_alerts_once_per_stall_keyed_by_rep(start_worker):
    # Stall checks trail the newest event by the grace period (1 h here): only then is nothing left to arrive.
    worker = start_worker(CRM_PULSE_STALL_STAGE_DAYS='{"new": 2}', CRM_PULSE_GRACE_SECONDS="3600")
    # L1 is created and left alone; L2's events move the event-time clock forward.
    worker.send(lead_event("l1", "lead.created", "L1", T0, rep="rep-7", source="web"))
    worker.send(lead_event("l2", "lead.created", "L2", T0 + 3 * DAY_MS, rep="rep-8", source="web"))
    worker.wait_for(lambda got: got[m("crm_alerts_emitted_total", type="lead.stalled")] == 1, what="stall")
    metrics = worker.wait_for(lambda got: m("crm_leads_stalled", rep="rep-7", stage="new") in got, what="gauge")
    assert metrics[m("crm_leads_stalled", rep="rep-7", stage="new")] == 1
    assert metrics[m("crm_leads_open", stage="new")] == 2
    status, body = worker.get_json("/leads/stalled?rep=rep-7")
    assert status == 200 and [(s["lead_id"], s["stage"], s["level"]) for s in body["stalled"]] == [("L1", "new", "stalled")]
    assert body["stalled"][0]["idle_seconds"] == 3 * 86400 - 3600  # now: L2's creation − the grace period
    assert worker.get_json("/leads/stalled?rep=rep-8")[1]["stalled"] == []
    worker.send(lead_event("l3", "lead.activity", "L2", T0 + 5 * DAY_MS, rep="rep-8", kind="call", direction="inbound"))
    worker.wait_for(lambda got: got[m("crm_alerts_emitted_total", type="lead.stall_escalated")] == 1, what="escalation")
    worker.send(lead_event("l4", "lead.activity", "L1", T0 + 5 * DAY_MS + HOUR, rep="rep-7", kind="email", direction="outbound"))
    metrics = worker.wait_for(lambda got: got[m("crm_alerts_emitted_total", type="lead.stall_cleared")] == 1, what="clear")

    records = worker.read("alerts", 3)
    alerts = [orjson.loads(r.value) for r in records]
    assert [r.key for r in records] == [b"rep-7"] * 3
    namespace = uuid.UUID("5b0c1f3e-6d2a-4f57-9a43-2f1d3c8e7a10")
    expected = [
        ("lead.stalled", 2 * DAY_MS, "2026-01-03T00:00:00.000Z"),
        ("lead.stall_escalated", 4 * DAY_MS, "2026-01-05T00:00:00.000Z"),
        ("lead.stall_cleared", 5 * DAY_MS + HOUR, "2026-01-06T01:00:00.000Z"),
    ]
    for alert, (kind, idle_ms, detected_at) in zip(alerts, expected):
        assert alert["type"] == kind
        assert alert["alert_id"] == str(uuid.uuid5(namespace, f"{kind}|L1|{T0}"))
        assert (alert["lead_id"], alert["rep_id"], alert["stage"]) == ("L1", "rep-7", "new")
        assert alert["idle_since"] == "2026-01-01T00:00:00.000Z"
        assert alert["idle_seconds"] == idle_ms / 1000
        assert alert["threshold_seconds"] == 2 * 86400
        assert alert["rule"] == "stage_threshold"
        assert alert["detected_at"] == detected_at
    # Scans every 0.5 s: four scans later nothing has repeated and the lead no longer counts as stalled.
    time.sleep(2)
    assert len(worker.read("alerts", 3)) == 3
    metrics = worker.metrics()
    assert metrics[m("crm_alerts_emitted_total", type="lead.stalled")] == 1
    assert m("crm_leads_stalled", rep="rep-7", stage="new") not in metrics


def test_bad_input_is_dead_lettered_and_processing_continues(start_worker):
    worker = start_worker(CRM_PULSE_GRACE_SECONDS="3600")
    bad = [
        (b"{not json", "malformed_json"),
        (orjson.dumps({"event_id": "x1", "type": "lead.exploded", "occurred_at": T0, "lead_id": "L"}), "unknown_type"),
        (orjson.dumps(lead_event("x2", "lead.created", "L", "last tuesday", source="web")), "bad_timestamp"),
        (orjson.dumps(lead_event("x3", "deal.won", "L", T0, amount="lots")), "invalid_field"),
    ]
    worker.send(lead_event("v1", "lead.created", "L", T0 + DAY_MS, source="web"))
    for raw, _reason in bad:
        worker.send(raw, key=b"L")
    late = lead_event("x4", "lead.activity", "L", T0, kind="call", direction="inbound")  # a day behind, grace 1 h
    worker.send(late, lead_event("v2", "lead.stage_changed", "L", T0 + DAY_MS + HOUR, **{"from": "new", "to": "won"}))

    metrics = worker.wait_for(
        lambda got: got[m("crm_events_processed_total", type="lead.stage_changed")] == 1, what="valid events"
    )
    assert metrics[m("crm_events_processed_total", type="lead.created")] == 1
    for reason in ("malformed_json", "unknown_type", "bad_timestamp", "invalid_field", "late"):
        assert metrics[m("crm_events_invalid_total", reason=reason)] == 1
    letters = [orjson.loads(r.value) for r in worker.read("dlq", 5)]
    assert [d["reason"] for d in letters] == [reason for _, reason in bad] + ["late"]
    assert [base64.b64decode(d["original_base64"]) for d in letters[:4]] == [raw for raw, _ in bad]
    assert all(d["source"]["topic"] == worker.topic("input") for d in letters)
    assert letters[1]["error"].startswith("type 'lead.exploded' is not one of")


def test_calendar_periods_count_the_business_time_zones_days(start_worker):
    """New York's December ends at 2026-01-01T05:00Z: what UTC puts in January, New York's books put in December."""
    worker = start_worker(CRM_PULSE_BUSINESS_TIMEZONE="America/New_York")
    now = T0 + 31 * DAY_MS + 4 * HOUR  # 2026-02-01T04:00Z: Saturday 31 January, 23:00 in New York
    events = [
        customer_event("c1", "customer.subscribed", "C1", T0 - 21 * DAY_MS),  # 10 December
        customer_event("c2", "customer.cancelled", "C1", T0 + 14 * DAY_MS),  # 15 January: churned in January
        lead_event("a1", "lead.created", "A", T0 - HOUR, source="web"),  # 31 December, 18:00 in New York
        lead_event("a2", "deal.won", "A", T0 + 2 * HOUR, amount=500),  # 31 December, 21:00: a 3 h cycle
        lead_event("b1", "lead.created", "B", T0 + 6 * HOUR, source="web"),  # 1 January, 01:00
        lead_event("b2", "deal.lost", "B", T0 + 29 * DAY_MS, reason="price"),  # 29 January (ISO week 5)
        lead_event("c3", "lead.created", "C", now - HOUR, source="web"),  # 31 January, 22:00
        lead_event("c4", "deal.won", "C", now, amount=200),  # a 1 h cycle
    ]
    worker.send(*sorted(events, key=lambda event: event["occurred_at"]))  # none late
    metrics = worker.wait_for(
        lambda got: got.get(m("crm_deals_won", window="month_current")) == 1
        and got.get(m("crm_sales_cycle_observations", window="month_current")) == 1
        and got.get(m("crm_customers_churned", window="month_current")) == 1,
        what="the period KPIs",
    )
    expected = {
        # January in New York: B and C created, B lost, C won for 200; December: A created and won for 500.
        "month_current": {"crm_deals_won": 1, "crm_deals_lost": 1, "crm_win_rate_ratio": 0.5, "crm_won_revenue": 200,
                          "crm_new_leads": 2, "crm_lead_velocity_ratio": 1.0, "crm_sales_cycle_mean_seconds": 3600,
                          "crm_churn_ratio": 1.0, "crm_customers_new": 0},
        "month_previous": {"crm_deals_won": 1, "crm_deals_lost": 0, "crm_win_rate_ratio": 1.0, "crm_won_revenue": 500,
                           "crm_new_leads": 1, "crm_sales_cycle_mean_seconds": 3 * 3600, "crm_customers_new": 1},
        "quarter_current": {"crm_won_revenue": 200, "crm_new_leads": 2, "crm_lead_velocity_ratio": 1.0},
        "quarter_previous": {"crm_won_revenue": 500, "crm_new_leads": 1},
        "week_current": {"crm_deals_won": 1, "crm_deals_lost": 1, "crm_new_leads": 1},  # 26 January – 1 February
        "week_previous": {"crm_deals_won": 0, "crm_new_leads": 0},
    }  # fmt: skip
    for window, values in expected.items():
        assert {name: metrics.get(m(name, window=window)) for name in values} == values, window
    # In UTC, A's win (01-01T02:00Z) would be January's: here it is not; December has no growth (no November).
    assert m("crm_lead_velocity_ratio", window="month_previous") not in metrics
    assert metrics[m("crm_rep_won_revenue", rep="r1", window="month_current")] == 200

    status, body = worker.get_json("/kpis?period=month&from=2025-11")
    assert status == 200 and (body["period"], body["time_zone"]) == ("month", "America/New_York")
    table = {p["period"]: (p["first_day"], p["last_day"], {n: [s["value"] for s in samples if s["labels"] == {"window": p["period"]}]
                                                           for n, samples in p["kpis"].items()})
             for p in body["periods"]}  # fmt: skip
    assert list(table) == ["2025-11", "2025-12", "2026-01"]
    assert table["2026-01"][:2] == ("2026-01-01", "2026-01-31")
    assert {p: values.get("crm_won_revenue") for p, (_, _, values) in table.items()} == {
        "2025-11": [0], "2025-12": [500], "2026-01": [200]}
    assert table["2026-01"][2]["crm_churn_ratio"] == [1.0]
    assert "crm_win_rate_ratio" not in table["2025-11"][2]  # no deal decided in November
    assert worker.get_json("/kpis?period=month&from=2025-13") == (
        400, {"error": "'2025-13' is not a month: expected YYYY-MM, e.g. 2018-01"})
    assert worker.get_json("/kpis?period=fortnight&from=2025-11") == (
        400, {"error": "period 'fortnight' is not one of week, month, quarter"})
    assert worker.get_json("/kpis?period=month") == (400, {"error": "?period= needs &from=<first period>, e.g. from=2018-01"})
    status, body = worker.get_json("/kpis?period=quarter&from=2026-Q2")  # after now: no period yet
    assert (status, body["periods"]) == (200, [])
