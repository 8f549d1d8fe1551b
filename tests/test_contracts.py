"""The checked-in JSON Schemas are exactly what the models generate, and real records validate against them."""

from __future__ import annotations

from types import SimpleNamespace

import jsonschema
import orjson
import pytest

from crm_pulse.schemas.generate import SCHEMA_DIR, render, schemas
from crm_pulse.schemas.validate import InvalidEvent, parse_event
from crm_pulse.streams.leads import StallPolicy, check_stall, new_lead
from crm_pulse.streams.kpis import DAY_MS


def load(name: str) -> dict:
    return orjson.loads((SCHEMA_DIR / name).read_bytes())


@pytest.mark.parametrize("name", sorted(schemas()))
def test_checked_in_schema_matches_models(name):
    assert (SCHEMA_DIR / name).read_bytes() == render(schemas()[name]), "run `make schemas` and commit"


EVENTS = [
    {"event_id": "e1", "type": "lead.created", "occurred_at": "2026-03-01T09:00:00+02:00", "lead_id": "L1",
     "rep_id": "r1", "payload": {"source": "web", "campaign": "spring", "score": 70}},
    {"event_id": "e2", "type": "lead.stage_changed", "occurred_at": 1772348400000, "lead_id": "L1",
     "payload": {"from": "new", "to": "qualified"}},
    {"event_id": "e3", "type": "lead.activity", "occurred_at": 1772348400000, "lead_id": "L1",
     "payload": {"kind": "call", "direction": "outbound"}},
    {"event_id": "e4", "type": "deal.won", "occurred_at": 1772348400000, "lead_id": "L1", "payload": {"amount": 1200.5}},
    {"event_id": "e5", "type": "deal.lost", "occurred_at": 1772348400000, "lead_id": "L2", "payload": {"reason": "price"}},
    {"event_id": "e6", "type": "customer.subscribed", "occurred_at": 1772348400000, "customer_id": "C1", "payload": {}},
    {"event_id": "e7", "type": "customer.renewed", "occurred_at": 1772348400000, "customer_id": "C1", "payload": {}},
    {"event_id": "e9", "type": "deal.updated", "occurred_at": 1772348400000, "lead_id": "L1", "rep_id": "r1",
     "payload": {"amount": 5000, "currency": "EUR", "close_date": "2026-04-30T00:00:00Z", "forecast_category": "commit"}},
    {"event_id": "e10", "type": "lead.created", "occurred_at": 1772348400000, "lead_id": "L3",
     "payload": {"source": "web", "stage": "proposal", "amount": 900.0, "close_date": 1777507200000}},
    {"event_id": "e8", "type": "customer.cancelled", "occurred_at": 1772348400000, "customer_id": "C1",
     "payload": {"reason": "budget"}},
]  # fmt: skip


@pytest.mark.parametrize("event", EVENTS, ids=[e["type"] for e in EVENTS])
def test_schema_and_validator_agree_on_valid_events(event):
    jsonschema.validate(event, load("crm-event.v1.schema.json"))
    assert parse_event(orjson.dumps(event)).event_id == event["event_id"]


@pytest.mark.parametrize(
    "event",
    [
        {**EVENTS[0], "type": "lead.deleted"},
        {**EVENTS[0], "payload": {"source": "web", "score": 101}},
        {**EVENTS[1], "payload": {"from": "new"}},
        {k: v for k, v in EVENTS[3].items() if k != "lead_id"},
        {**EVENTS[5], "surprise": True},
        {**EVENTS[8], "payload": {"amount": 5000}},  # a deal.updated snapshot needs its close date
        {**EVENTS[8], "payload": {**EVENTS[8]["payload"], "forecast_category": "maybe"}},
        {**EVENTS[9], "payload": {**EVENTS[9]["payload"], "amount": -1.0}},
    ],
)
def test_schema_and_validator_agree_on_invalid_events(event):
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(event, load("crm-event.v1.schema.json"))
    with pytest.raises(InvalidEvent):
        parse_event(orjson.dumps(event))


def test_alerts_follow_the_alert_schema():
    lead = new_lead()
    lead["timeline"] = [[0, "e0", "qualified"]]
    lead["rep"] = "r7"
    alerts = check_stall(lead, "L9", 3 * DAY_MS, StallPolicy(stage_days={"qualified": 1}), lambda s: (DAY_MS, "stage_threshold"))
    assert [a["type"] for a in alerts] == ["lead.stalled", "lead.stall_escalated"]
    for alert in alerts:
        jsonschema.validate(alert, load("crm-alert.v1.schema.json"))


def test_dead_letters_follow_the_dead_letter_schema():
    from crm_pulse.agents.ingest import dead_letter

    message = SimpleNamespace(topic="crm-events", partition=2, offset=41, key=b"L1", value=b"{oops")
    try:
        parse_event(message.value)
    except InvalidEvent as error:
        record = dead_letter(error, message)
    jsonschema.validate(record, load("crm-dead-letter.v1.schema.json"))
    assert record["reason"] == "malformed_json" and record["original_base64"] == "e29vcHM="
