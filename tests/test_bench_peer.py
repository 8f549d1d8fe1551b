"""The Quix peer's pure job (bench/peers/lead_job.py): its streamed KPI totals equal a batch computation over
the bench's events, and its stall rule alerts as crm-pulse's stage-threshold rule does."""

import orjson

from bench.harness import DAY_MS, START_MS
from bench.peers.lead_job import CLEARED, ESCALATED, STALLED, batch, fold, new_lead, streamed, win_rate
from bench.throughput import events


def test_streamed_totals_equal_the_batch_computation_over_the_bench_events():
    decoded = [orjson.loads(value) for _key, value, _partition in events(30_000)]
    totals = streamed(decoded)
    assert totals == batch(decoded)
    assert {"won", "lost", "dwell:new", "dwell:qualified", "dwell:proposal", "dwell:negotiation"} <= totals.keys()
    assert 0 < win_rate(totals) < 1


def lead_event(type_: str, at_days: float, **payload) -> dict:
    return {"event_id": f"e-{type_}-{at_days}", "type": type_, "occurred_at": START_MS + int(at_days * DAY_MS),
            "lead_id": "lead-1", "rep_id": "rep-7", "payload": payload}  # fmt: skip


def test_an_idle_lead_alerts_its_rep_on_its_next_event():
    lead = new_lead()
    assert fold(lead, lead_event("lead.created", 0, source="web", stage="new")) == []
    # "new" stalls after 2 days: an activity on day 3 reveals the stall and clears it at once.
    out = fold(lead, lead_event("lead.activity", 3, kind="call"))
    assert [(a["type"], a["rep_id"], a["stage"]) for a in out] == [(STALLED, "rep-7", "new"), (CLEARED, "rep-7", "new")]
    assert out[0]["detected_at"] == START_MS + 2 * DAY_MS
    # Qualified stalls after 5 days, escalates after 10; the move to proposal clears it and records the dwell.
    fold(lead, lead_event("lead.stage_changed", 3.5, **{"from": "new", "to": "qualified"}))
    out = fold(lead, lead_event("lead.stage_changed", 14.5, **{"from": "qualified", "to": "proposal"}))
    assert [r.get("type") or r["kpi"] for r in out] == [STALLED, ESCALATED, "dwell:qualified", CLEARED]
    assert out[2]["value"] == 11 * DAY_MS
    assert fold(lead, lead_event("lead.activity", 15, kind="call")) == []


def test_a_closed_lead_never_stalls():
    lead = new_lead()
    fold(lead, lead_event("lead.created", 0, source="web", stage="new"))
    assert [r["kpi"] for r in fold(lead, lead_event("deal.lost", 1, reason="price"))] == ["dwell:new", "lost"]
    assert fold(lead, lead_event("lead.activity", 30, kind="call")) == []
