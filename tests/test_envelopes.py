"""agents.ingest.Envelopes: how one batch of valid events is packed into messages for the family agents."""

import asyncio

import pytest

import agents.ingest as ingest
from agents.app import key_partition, settings


class Topic:
    def __init__(self, name: str):
        self.name, self.sent = name, []

    async def send(self, partition: int, value: dict) -> None:
        self.sent.append((partition, value))


@pytest.fixture
def topics(monkeypatch):
    family = {"lead.created": Topic("leads"), "customer.purchase": Topic("customers")}
    monkeypatch.setattr(ingest, "FAMILY_TOPICS", family)
    monkeypatch.setattr(ingest, "lead_events_topic", family["lead.created"])
    return family


def event(n: int, kind: str = "lead.created") -> dict:
    return {"event_id": f"e{n}", "type": kind}


def pack(events, clock_mode: str, monkeypatch, max_bytes: int = 1000):
    monkeypatch.setattr(ingest, "ENVELOPE_MAX_BYTES", max_bytes)
    monkeypatch.setattr(ingest.clock, "mode", clock_mode)
    envelopes = ingest.Envelopes()
    for source, key, doc, size in events:
        envelopes.add(source, key, doc, size)
    asyncio.run(envelopes.send(lambda source: 1000 + source))


def test_events_travel_per_family_partition_and_source_in_order(topics, monkeypatch):
    lead, customer = "lead-a", "cust-b"
    pack([(0, lead, event(1), 10), (1, lead, event(2), 10), (0, customer, event(3, "customer.purchase"), 10),
          (0, lead, event(4), 10)], "wall", monkeypatch)  # fmt: skip
    p_lead, p_customer = key_partition(lead, settings.partitions), key_partition(customer, settings.partitions)
    assert sorted(topics["lead.created"].sent, key=lambda sent: sent[1]["source"]) == [
        (p_lead, {"source": 0, "watermark": 1000, "events": [[lead, event(1)], [lead, event(4)]]}),
        (p_lead, {"source": 1, "watermark": 1001, "events": [[lead, event(2)]]}),
    ]
    assert topics["customer.purchase"].sent == [
        (p_customer, {"source": 0, "watermark": 1000, "events": [[customer, event(3, "customer.purchase")]]})
    ]


def test_a_full_message_is_split_and_only_the_last_part_carries_the_watermark(topics, monkeypatch):
    pack([(2, "lead-a", event(n), 400) for n in range(5)], "wall", monkeypatch)
    sent = topics["lead.created"].sent
    assert [[e["event_id"] for _, e in value["events"]] for _, value in sent] == [["e0", "e1"], ["e2", "e3"], ["e4"]]
    assert [value["watermark"] for _, value in sent] == [None, None, 1002]


def test_with_the_event_clock_every_lead_partition_hears_from_each_source(topics, monkeypatch):
    pack([(3, "cust-b", event(1, "customer.purchase"), 10)], "event", monkeypatch)
    assert sorted(topics["lead.created"].sent, key=lambda sent: sent[0]) == [
        (partition, {"source": 3, "watermark": 1003, "events": []}) for partition in range(settings.partitions)
    ]
    assert len(topics["customer.purchase"].sent) == 1
