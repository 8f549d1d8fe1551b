"""Deal inspection alerts (streams/deals.py): exact occurrences of one deal's history, once each, late events, the
configured stage order and decrease share, the timer's due index, and the record contract."""

from __future__ import annotations

import jsonschema
import orjson
from hypothesis import given, settings, strategies as st

from crm_pulse.schemas.events import ms_to_iso
from crm_pulse.schemas.generate import SCHEMA_DIR
from crm_pulse.streams.deals import (
    DECREASED, PAST_DUE, REGRESSED, SLIPPED, DealPolicy, DueIndex, apply_deal_event, deal_alerts, lead_time, occurrences,
)  # fmt: skip
from crm_pulse.streams.kpis import DAY_MS
from crm_pulse.streams.leads import StallPolicy, apply_lead_event, new_lead

T0 = 1_772_323_200_000  # 2026-03-01T00:00Z: 20513 days after the epoch
POLICY = DealPolicy()
STALL = StallPolicy()


def fold(lead: dict, event: dict, policy: DealPolicy = POLICY, lead_id: str = "L1") -> list[dict]:
    apply_lead_event(lead, event, lead_id, STALL, lambda stage: (1000 * DAY_MS, "stage_threshold"))
    apply_deal_event(lead, event)
    return deal_alerts(lead, lead_id, policy, lead_time(lead, event["occurred_at"]))


def created(at, amount=10_000.0, close=T0 + 30 * DAY_MS, **envelope):
    return {"event_id": "c", "type": "lead.created", "occurred_at": at, "rep_id": "r1", "pipeline": "default",
            "payload": {"source": "web", "stage": "new", "amount": amount, "close_date": close}, **envelope}  # fmt: skip


def moved(event_id, at, to):
    return {"event_id": event_id, "type": "lead.stage_changed", "occurred_at": at, "payload": {"from": "?", "to": to}}


def updated(event_id, at, amount, close):
    return {"event_id": event_id, "type": "deal.updated", "occurred_at": at,
            "payload": {"amount": amount, "currency": "USD", "close_date": close}}  # fmt: skip


def activity(event_id, at):
    return {"event_id": event_id, "type": "lead.activity", "occurred_at": at, "payload": {"kind": "call", "direction": "outbound"}}


HISTORY = [
    created(T0),
    moved("s1", T0 + 1 * DAY_MS, "qualified"),
    moved("s2", T0 + 2 * DAY_MS, "proposal"),
    updated("u1", T0 + 3 * DAY_MS, 10_000.0, T0 + 45 * DAY_MS),  # pushed 15 days: push 1
    updated("u2", T0 + 4 * DAY_MS, 7_000.0, T0 + 45 * DAY_MS),  # 30 % less: at least the 20 % share
    updated("u3", T0 + 5 * DAY_MS, 6_000.0, T0 + 60 * DAY_MS),  # push 2; 1/7 = 14.3 % less: no alert
    moved("s3", T0 + 6 * DAY_MS, "qualified"),  # proposal → qualified: backwards in the default order
    activity("a1", T0 + 62 * DAY_MS),  # the close date (day 60) and its day of grace have passed
]


def test_one_history_gives_each_occurrence_once_with_its_numbers():
    lead, alerts = new_lead(), []
    for event in HISTORY:
        alerts += fold(lead, event)
    assert [(a["type"], a["detected_at"]) for a in alerts] == [
        (SLIPPED, ms_to_iso(T0 + 3 * DAY_MS)),
        (DECREASED, ms_to_iso(T0 + 4 * DAY_MS)),
        (SLIPPED, ms_to_iso(T0 + 5 * DAY_MS)),
        (REGRESSED, ms_to_iso(T0 + 6 * DAY_MS)),
        (PAST_DUE, ms_to_iso(T0 + 61 * DAY_MS)),  # close date + 1 day of grace
    ]
    slip1, decrease, slip2, regress, past_due = alerts
    assert (slip1["push_count"], slip1["previous_close_date"], slip1["close_date"]) == (
        1, ms_to_iso(T0 + 30 * DAY_MS), ms_to_iso(T0 + 45 * DAY_MS))
    assert (slip2["push_count"], slip2["previous_close_date"]) == (2, ms_to_iso(T0 + 45 * DAY_MS))
    assert (decrease["previous_amount"], decrease["amount"], decrease["decrease_ratio"]) == (10_000.0, 7_000.0, 0.3)
    assert (regress["from_stage"], regress["to_stage"], regress["stage"]) == ("proposal", "qualified", "qualified")
    assert (past_due["close_date"], past_due["amount"]) == (ms_to_iso(T0 + 60 * DAY_MS), 6_000.0)
    assert {a["rep_id"] for a in alerts} == {"r1"} and {a["schema_version"] for a in alerts} == {2}
    assert len({a["alert_id"] for a in alerts}) == 5
    # Nothing is raised twice: more activity, or the same history again in another lead state, repeats nothing.
    assert fold(lead, activity("a2", T0 + 70 * DAY_MS)) == []
    again = new_lead()
    assert [a["alert_id"] for e in HISTORY for a in fold(again, e)] == [a["alert_id"] for a in alerts]


def test_a_late_update_raises_only_what_it_reveals():
    lead = new_lead()
    for event in HISTORY[:6]:
        fold(lead, event)
    # Between u1 (close day 45) and u2 (day 45): a push to day 50 then a pull back (a pull is no slip).
    [late] = fold(lead, updated("late", T0 + 3 * DAY_MS + 1, 10_000.0, T0 + 50 * DAY_MS))
    assert (late["type"], late["push_count"], late["previous_close_date"]) == (SLIPPED, 2, ms_to_iso(T0 + 45 * DAY_MS))


def test_a_closed_deal_is_not_past_due_and_the_share_is_configurable():
    lead = new_lead()
    fold(lead, created(T0, close=T0 + 10 * DAY_MS))
    fold(lead, {"event_id": "w", "type": "deal.won", "occurred_at": T0 + 10 * DAY_MS + 3, "payload": {"amount": 1.0}})
    assert fold(lead, activity("a", T0 + 40 * DAY_MS)) == []
    # A 10 % cut: an alert with a 10 % share, none with the default 20 %.
    cut = [created(T0), updated("u", T0 + DAY_MS, 9_000.0, T0 + 30 * DAY_MS)]
    strict, loose = new_lead(), new_lead()
    assert [a["type"] for e in cut for a in fold(strict, e)] == []
    assert [a["type"] for e in cut for a in fold(loose, e, DealPolicy(decrease_share=0.1))] == [DECREASED]


def test_the_pipelines_own_stage_order_decides_a_regression():
    policy = DealPolicy(stage_order={"default": ("new", "qualified"), "renewals": ("review", "new", "qualified")})
    events = [created(T0, pipeline="renewals"), moved("s1", T0 + DAY_MS, "review"), moved("s2", T0 + 2 * DAY_MS, "new")]
    lead = new_lead()
    # new → review is backwards in "renewals" (review comes first); review → new is forwards.
    assert [(a["from_stage"], a["to_stage"]) for e in events for a in fold(lead, e, policy)] == [("new", "review")]
    # Under "default", review is no stage of the order: nothing.
    other = new_lead()
    assert [a for e in events for a in fold(other, {**e, "pipeline": "default"}, policy)] == []


def test_the_due_index_hands_the_timer_a_deal_once_its_close_date_passed():
    lead = new_lead()
    fold(lead, created(T0, close=T0 + 10 * DAY_MS))
    index = DueIndex(POLICY)
    index.update("L1", lead)
    assert index.due(T0 + 11 * DAY_MS) == []  # due at day 11 exactly: not yet past it
    assert index.due(T0 + 11 * DAY_MS + 1) == ["L1"] and index.due(T0 + 20 * DAY_MS) == []
    [alert] = deal_alerts(lead, "L1", POLICY, T0 + 11 * DAY_MS + 1)
    assert alert["type"] == PAST_DUE
    index.update("L1", lead)  # raised: it is not handed out again
    assert index.due(T0 + 30 * DAY_MS) == [] and "L1" not in index.due_at


ORDER_FREE = [e for e in HISTORY if e["type"] != "lead.activity"]


@settings(max_examples=60, deadline=None)
@given(st.permutations(ORDER_FREE))
def test_any_arrival_order_raises_the_occurrences_of_the_final_history(order):
    """Slips, decreases and regressions are facts of the event-time history: whatever order the events come in,
    the ids raised are those of the whole history (past due also depends on when "now" was, so it is left out)."""
    lead = new_lead()
    raised = {a["alert_id"] for e in order for a in fold(lead, e) if a["type"] != PAST_DUE}
    final = new_lead()
    expected = {a["alert_id"] for e in ORDER_FREE for a in fold(final, e) if a["type"] != PAST_DUE}
    assert len(expected) == 4 and raised >= expected


def test_deal_alerts_follow_the_v2_alert_schema():
    schema = orjson.loads((SCHEMA_DIR / "crm-alert.v2.schema.json").read_bytes())
    lead, alerts = new_lead(), []
    for event in HISTORY:
        alerts += fold(lead, event)
    for alert in alerts:
        jsonschema.validate(alert, schema)
    assert {a["type"] for a in alerts} == {SLIPPED, DECREASED, REGRESSED, PAST_DUE}
    assert occurrences(new_lead(), POLICY, T0) == []


def test_tail_prints_a_line_per_deal_alert_and_rejects_unknown_versions():
    from crm_pulse.alerts import format_alert, parse_any_alert

    lead, alerts = new_lead(), []
    for event in HISTORY:
        alerts += fold(lead, event)
    lines = [format_alert(parse_any_alert(orjson.dumps(alert))) for alert in alerts]
    assert lines[:2] == [
        "2026-03-04T00:00:00.000Z deal.close_date_slipped rep=r1 lead=L1 stage=proposal "
        "close=2026-04-15T00:00:00.000Z was=2026-03-31T00:00:00.000Z pushes=1",
        "2026-03-05T00:00:00.000Z deal.amount_decreased rep=r1 lead=L1 stage=proposal amount=7000 was=10000 cut=30%",
    ]
    assert lines[3] == "2026-03-07T00:00:00.000Z deal.stage_regressed rep=r1 lead=L1 stage=qualified from=proposal to=qualified"
    for record, reason in (({**alerts[0], "schema_version": 3}, "unsupported schema_version 3; this consumer reads versions 1 and 2"),
                           ({**alerts[0], "type": "lead.stalled"}, "type: Input should be 'deal.close_date_slipped'")):  # fmt: skip
        try:
            parse_any_alert(orjson.dumps(record))
        except ValueError as error:
            assert str(error).startswith(reason)
        else:
            raise AssertionError(f"{record['schema_version']} {record['type']} parsed")
