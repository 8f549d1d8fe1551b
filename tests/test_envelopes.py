"""crm_pulse.agents.ingest.Envelopes: how one batch of valid events is packed into messages for the family agents."""

import asyncio

import pytest

import crm_pulse.agents.ingest as ingest
from crm_pulse.agents.app import key_partition
from crm_pulse.agents.batches import Batch, unseen_events
from crm_pulse.streams.clock import UpstreamWatermark


class Topic:
    def __init__(self, name: str):
        self.name, self.sent = name, []

    async def send(self, partition: int, value: dict) -> None:
        self.sent.append((partition, value))


@pytest.fixture
def topics():
    return {name: Topic(name) for name in ("lead", "customer", "signal")}


def with_events(sent: list) -> list:
    """The messages that carry events (every partition of every family topic also gets the watermarks)."""
    return [(partition, value) for partition, value in sent if value["events"]]


def event(n: int, kind: str = "lead.created") -> dict:
    return {"event_id": f"e{n}", "type": kind}


@pytest.fixture
def pack(topics, settings):
    def pack(events, monkeypatch, max_bytes: int = 1000):
        monkeypatch.setattr(ingest, "ENVELOPE_MAX_BYTES", max_bytes)
        envelopes = ingest.Envelopes(topics, settings.partitions)
        for offset, (source, key, doc, size) in enumerate(events):
            envelopes.add(source, 100 + offset, key, doc, size)
        asyncio.run(envelopes.send(lambda source: 1000 + source))

    return pack


def test_events_travel_per_family_and_partition_in_input_order(topics, pack, settings, monkeypatch):
    lead, customer = "lead-a", "cust-b"
    pack([(0, lead, event(1), 10), (1, lead, event(2), 10), (0, customer, event(3, "customer.purchase"), 10),
          (0, lead, event(4), 10)], monkeypatch)  # fmt: skip
    p_lead, p_customer = key_partition(lead, settings.partitions), key_partition(customer, settings.partitions)
    watermarks = [[0, 1000], [1, 1001]]
    assert with_events(topics["lead"].sent) == [
        (p_lead, {"watermarks": watermarks, "events": [[lead, 0, 100, event(1)], [lead, 1, 101, event(2)], [lead, 0, 103, event(4)]]})
    ]
    assert with_events(topics["customer"].sent) == [
        (p_customer, {"watermarks": watermarks, "events": [[customer, 0, 102, event(3, "customer.purchase")]]})
    ]


def test_a_full_message_is_split_and_only_the_last_part_carries_the_watermarks(topics, pack, monkeypatch):
    pack([(2, "lead-a", event(n), 400) for n in range(5)], monkeypatch)
    sent = with_events(topics["lead"].sent)
    assert [[e["event_id"] for *_, e in value["events"]] for _, value in sent] == [["e0", "e1"], ["e2", "e3"], ["e4"]]
    assert [value["watermarks"] for _, value in sent] == [[], [], [[2, 1002]]]


def test_every_partition_of_every_family_topic_hears_from_each_source(topics, pack, settings, monkeypatch):
    pack([(3, "cust-b", event(1, "customer.purchase"), 10)], monkeypatch)
    only_watermarks = [(partition, {"watermarks": [[3, 1003]], "events": []}) for partition in range(settings.partitions)]
    assert sorted(topics["lead"].sent, key=lambda sent: sent[0]) == only_watermarks
    assert sorted(topics["signal"].sent, key=lambda sent: sent[0]) == only_watermarks
    p_customer = key_partition("cust-b", settings.partitions)
    assert sorted(topics["customer"].sent, key=lambda sent: sent[0]) == [
        (partition, {"watermarks": [[3, 1003]], "events": [["cust-b", 3, 100, event(1, "customer.purchase")]] if partition == p_customer else []})
        for partition in range(settings.partitions)
    ]


def test_a_batch_of_dead_letters_only_sends_nothing(topics, pack, monkeypatch):
    pack([], monkeypatch)
    assert topics["lead"].sent == topics["customer"].sent == topics["signal"].sent == []


class Received:
    """A message of packed events as the family agents get it."""

    def __init__(self, partition: int, offset: int, value: dict):
        self.value = value
        self.message = type("Message", (), {"partition": partition, "offset": offset})()


def test_an_event_and_its_duplicate_in_one_message_count_once_however_far_its_batch_got(pipeline, settings):
    day = 86_400_000
    upstream = UpstreamWatermark(sources=settings.partitions)
    upstream.keep_only([0])
    for source in range(settings.partitions):
        upstream.observe(0, source, 10 * day)
    # On time when ingest read it (day 10), but its batch went on to day 40: the message's watermarks.
    first = {"event_id": "e1", "type": "customer.subscribed", "occurred_at": 10 * day}
    value = {"watermarks": [[source, 40 * day] for source in range(settings.partitions)],
             "events": [["cust-a", 2, 14, first], ["cust-a", 2, 15, dict(first)]]}  # fmt: skip
    batch = Batch({}, dict)
    applied = [event["event_id"] for _, event, _ in unseen_events(pipeline, batch, Received(0, 1, value), upstream)]
    assert applied == ["e1"]
    assert upstream.watermark_ms == 40 * day  # heard once the message is done
    # A later message: the id is now older than the horizon behind day 40 and is forgotten.
    later = {"event_id": "e2", "type": "customer.renewed", "occurred_at": 40 * day}
    value = {"watermarks": [], "events": [["cust-a", 2, 900, later]]}
    assert [event["event_id"] for _, event, _ in unseen_events(pipeline, batch, Received(0, 2, value), upstream)] == ["e2"]
    assert batch.state("cust-a")["seen"] == {"e2": 40 * day}
