"""crm_pulse.schemas.validate.parse_event: one concrete bad message per dead-letter reason, and valid events of every type."""

import zlib

import orjson
import pytest

from crm_pulse.schemas.events import EVENT_TYPES
from crm_pulse.schemas.validate import MAX_EVENT_BYTES, REASONS, InvalidEvent, parse_event
from crm_pulse.streams.families import FAMILY_OF_TYPE

# 2026-01-01T00:00Z is 20454 days (56 years × 365 + 14 leap days) × 86400 s = 1_767_225_600 s after the epoch.
NEW_YEAR_MS = 1_767_225_600_000

# type → (entity fields, payload, expected partition key)
EXAMPLES = {
    "lead.created": ({"lead_id": "L1"}, {"source": "web"}, "L1"),
    "lead.stage_changed": ({"lead_id": "L1"}, {"from": "new", "to": "qualified"}, "L1"),
    "lead.activity": ({"lead_id": "L1"}, {"kind": "call", "direction": "inbound"}, "L1"),
    "deal.won": ({"lead_id": "L1"}, {"amount": 1200.5}, "L1"),
    "deal.lost": ({"lead_id": "L1"}, {"reason": "price"}, "L1"),
    "deal.updated": ({"lead_id": "L1"}, {"amount": 800, "close_date": NEW_YEAR_MS + 89 * 86_400_000}, "L1"),
    "customer.subscribed": ({"customer_id": "C1"}, {}, "C1"),
    "customer.renewed": ({"customer_id": "C1"}, {"amount": 99}, "C1"),
    "customer.cancelled": ({"customer_id": "C1"}, {"reason": "budget"}, "C1"),
    "quote.sent": ({"lead_id": "L1"}, {"quote_id": "Q1", "amount": 500}, "L1"),
    "quote.accepted": ({"lead_id": "L1"}, {"quote_id": "Q1"}, "L1"),
    "customer.purchase": ({"customer_id": "C1"}, {"amount": 20}, "C1"),
    "survey.response": ({"customer_id": "C1"}, {"nps": 9, "effort": 2}, "C1"),
    "ticket.opened": ({"customer_id": "C1"}, {"ticket_id": "T1"}, "C1"),
    "ticket.contacted": ({"customer_id": "C1"}, {"ticket_id": "T1"}, "C1"),
    "ticket.resolved": ({"customer_id": "C1"}, {"ticket_id": "T1"}, "C1"),
    "complaint.filed": ({"customer_id": "C1"}, {}, "C1"),
    # Campaign events are keyed by campaign and one of 16 buckets of the event id's CRC-32.
    "campaign.touch": ({}, {"campaign": "spring", "kind": "click"}, f"spring#{zlib.crc32(b'e1') % 16}"),
    "marketing.spend": ({}, {"campaign": "spring", "amount": 500, "purpose": "acquisition"}, f"spring#{zlib.crc32(b'e1') % 16}"),
    "crm.user_activity": ({"user_id": "U1"}, {"action": "login"}, "U1"),
}


def test_every_event_type_has_an_example():
    assert set(EXAMPLES) == set(EVENT_TYPES)


def test_every_event_type_goes_to_the_family_keyed_like_it():
    # A family's agent keeps state per lead, per customer, or per campaign bucket and user (signals).
    expected = {kind: "lead" if "lead_id" in entity else "customer" if "customer_id" in entity else "signal"
                for kind, (entity, _, _) in EXAMPLES.items()}  # fmt: skip
    assert FAMILY_OF_TYPE == expected


@pytest.mark.parametrize("occurred_at", ["2026-01-01T00:00:00+01:00", NEW_YEAR_MS - 3_600_000], ids=["iso", "epoch_ms"])
@pytest.mark.parametrize("kind", sorted(EXAMPLES))
def test_valid_event_of_every_type(kind, occurred_at):
    entity, payload, key = EXAMPLES[kind]
    doc = {"event_id": "e1", "type": kind, "occurred_at": occurred_at, **entity, "payload": payload}
    event = parse_event(orjson.dumps(doc))
    assert (event.type, event.event_id, event.key) == (kind, "e1", key)
    assert event.occurred_at == 1_767_222_000_000  # midnight at +01:00 is 23:00Z the day before
    assert event.model_dump(by_alias=True)["payload"].items() >= payload.items()


@pytest.mark.parametrize(
    "occurred_at, expected_ms",
    [
        ("2026-01-01T00:00:00Z", NEW_YEAR_MS),
        ("2026-01-01T00:00:00.250-02:30", NEW_YEAR_MS + 9_000_000 + 250),  # + 2 h 30 min + 250 ms
        ("2026-01-01T00:00:00.2509+00:00", NEW_YEAR_MS + 250),  # sub-millisecond digits are dropped
        # 2004-01-01 is 34 × 365 + 8 leap days = 12418 days after the epoch; + 16 days + 21:15:51.258
        # → (12434 × 86400 + 76551) s = 1_074_374_151.258 s. (Float arithmetic gives ...257.9999.)
        ("2004-01-17T21:15:51.258+00:00", 1_074_374_151_258),
    ],
)
def test_iso_timestamps_convert_exactly(occurred_at, expected_ms):
    doc = {"event_id": "e1", "type": "lead.activity", "occurred_at": occurred_at, "lead_id": "L1",
           "payload": {"kind": "note", "direction": "outbound"}}  # fmt: skip
    assert parse_event(orjson.dumps(doc)).occurred_at == expected_ms


BASE = {"event_id": "e1", "type": "deal.won", "occurred_at": NEW_YEAR_MS, "lead_id": "L1", "payload": {"amount": 10}}


def message(drop: str | None = None, **changes) -> bytes:
    doc = {k: v for k, v in BASE.items() if k != drop}
    return orjson.dumps({**doc, **changes})


def padded(size: int) -> bytes:
    """A valid event, padded with JSON whitespace to exactly `size` bytes."""
    raw = message()
    return raw + b" " * (size - len(raw))


BAD_MESSAGES = {
    "malformed json": (b'{"event_id": "e1",', "malformed_json"),
    "empty bytes": (b"", "malformed_json"),
    "no value (tombstone)": (None, "malformed_json"),
    "json array": (b'[{"event_id": "e1"}]', "not_an_object"),
    "json string": (b'"deal.won"', "not_an_object"),
    "unknown type": (message(type="lead.deleted"), "unknown_type"),
    "missing type": (message(drop="type"), "unknown_type"),
    "schema_version 2": (message(schema_version=2), "unsupported_version"),
    "unparseable timestamp": (message(occurred_at="yesterday"), "bad_timestamp"),
    "timestamp without offset": (message(occurred_at="2026-01-01T00:00:00"), "bad_timestamp"),
    "negative epoch ms": (message(occurred_at=-1), "bad_timestamp"),
    "boolean timestamp": (message(occurred_at=True), "bad_timestamp"),
    "missing lead_id": (message(drop="lead_id"), "invalid_field"),
    "payload field of the wrong type": (message(payload={"amount": "a lot"}), "invalid_field"),
    "number sent as a string (the JSON Schema rejects it too)": (message(payload={"amount": "1000"}), "invalid_field"),
    "negative amount": (message(payload={"amount": -5}), "invalid_field"),
    "extra envelope field": (message(priority="high"), "invalid_field"),
    "extra payload field": (message(payload={"amount": 10, "discount": 1}), "invalid_field"),
    "oversized": (padded(MAX_EVENT_BYTES + 1), "oversized"),
}


@pytest.mark.parametrize("raw, reason", BAD_MESSAGES.values(), ids=BAD_MESSAGES.keys())
def test_bad_message_is_rejected_with_its_reason(raw, reason):
    with pytest.raises(InvalidEvent) as error:
        parse_event(raw)
    assert error.value.reason == reason


def test_every_reason_but_late_has_a_bad_message():
    assert {reason for _, reason in BAD_MESSAGES.values()} == set(REASONS) - {"late"}


def test_size_limit_is_inclusive():
    assert parse_event(padded(MAX_EVENT_BYTES)).event_id == "e1"  # exactly 64 KiB is accepted
