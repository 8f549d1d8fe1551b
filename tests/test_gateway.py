"""`crm-pulse gateway` over real HTTP, in-process, with a recording broker: verification, translation, answers.
(tests/integration/test_gateway.py runs it on the real broker, with the worker.)"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import logging
import subprocess
import sys
import time
import uuid
import xml.etree.ElementTree as ElementTree
from pathlib import Path

import orjson
import pytest
from prometheus_client import REGISTRY

from crm_pulse.config import Settings, load_settings
from crm_pulse.gateway import Gateway, load_stage_map
from crm_pulse.schemas.records import DeadLetter
from tests.gateway_payloads import (
    EVENTS_SECRET, HUBSPOT_SECRET, PIPEDRIVE_PASSWORD, PIPEDRIVE_USER, SALESFORCE_HEADERS, SALESFORCE_ORG_15,
    SALESFORCE_ORG_18, basic, dumps, events_headers, hubspot_event, hubspot_v1_headers, hubspot_v2_headers,
    hubspot_v3_headers, opportunity, pipedrive_v1_current, pipedrive_v1_deal, pipedrive_v2, salesforce_message,
)  # fmt: skip
from tests.gateway_server import Served, app_server

ROOT = Path(__file__).resolve().parents[1]
NAMESPACE = uuid.UUID("5b0c6d38-4a55-4f0e-9d1e-0c7d3a1e6b21")  # docs/ingestion.md#event-ids
PUBLIC = "https://crm-pulse.example.com"


def expected_id(name: str) -> str:
    return str(uuid.uuid5(NAMESPACE, name))


class RecordingBroker:
    """Acknowledges every send at once, or never (`hang`), or refuses (`down`); keeps what it acknowledged."""

    def __init__(self):
        self.sent: list[tuple[str, bytes | None, dict]] = []
        self.hang = self.down = False

    async def send(self, topic: str, key: bytes | None, value: bytes) -> None:
        if self.hang:
            await asyncio.sleep(3600)
        if self.down:
            raise ConnectionError("broker down")
        self.sent.append((topic, key, orjson.loads(value)))

    async def ready(self) -> bool:
        return not self.down

    def on(self, topic: str) -> list:
        return [(key, value) for t, key, value in self.sent if t == topic]


def settings(**overrides) -> Settings:
    return Settings(
        broker="kafka://127.0.0.1:9", input_topic="in", dlq_topic="dlq", gateway_public_url=PUBLIC,
        gateway_mapping=ROOT / "mappings" / "gateway.toml", gateway_ack_timeout_seconds=0.5,
        gateway_max_body_bytes=64 * 1024, hubspot_client_secret=HUBSPOT_SECRET, pipedrive_username=PIPEDRIVE_USER,
        pipedrive_password=PIPEDRIVE_PASSWORD, salesforce_organization_id=SALESFORCE_ORG_15,
        events_signing_secret=EVENTS_SECRET, **overrides,
    )  # fmt: skip


@pytest.fixture
def broker():
    return RecordingBroker()


@pytest.fixture
def gateway(broker):
    s = settings()
    with Served(app_server(Gateway(s, broker.send, broker.ready, load_stage_map(s.gateway_mapping)).app())) as served:
        yield served


def metric(name: str, **labels) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


def answer(response: tuple) -> tuple[int, object]:
    return response[0], orjson.loads(response[1])


def now_ms() -> int:
    return int(time.time() * 1000)


# --- point 1: the endpoints ------------------------------------------------------------------------------


def test_health_readiness_follows_the_broker_and_metrics_are_served(gateway, broker):
    assert answer(gateway.get("/healthz")) == (200, {"status": "ok"})
    assert answer(gateway.get("/readyz")) == (200, {"status": "ready"})
    broker.down = True
    assert answer(gateway.get("/readyz")) == (503, {"status": "broker unreachable"})
    assert gateway.get("/healthz")[0] == 200  # alive, only not ready
    status, body, headers = gateway.get("/metrics")
    assert status == 200 and headers["Content-Type"].startswith("text/plain")
    assert b"# TYPE crm_gateway_ack_seconds histogram" in body


def test_a_source_without_its_secret_is_not_served(broker):
    bare = Settings(broker="kafka://127.0.0.1:9")
    with Served(app_server(Gateway(bare, broker.send, broker.ready).app())) as served:
        for source in ("hubspot", "pipedrive", "salesforce", "events"):
            status, body, _ = served.post(f"/webhooks/{source}", b"[]", {"Content-Type": "application/json"})
            assert (status, orjson.loads(body)) == (404, {"error": f"the {source} webhook is not configured "
                                                                    f"(docs/ingestion.md)"})  # fmt: skip
    assert broker.sent == []


# --- point 2: verification -------------------------------------------------------------------------------


def test_hubspot_v3_signature_over_the_public_uri(gateway, broker):
    body = dumps([hubspot_event(101, "deal.creation", 9001, now_ms() - 1000)])
    uri = f"{PUBLIC}/webhooks/hubspot"
    status, answer, _ = gateway.post("/webhooks/hubspot", body, hubspot_v3_headers(uri, body, now_ms()))
    assert (status, orjson.loads(answer)) == (200, {"published": 1, "dead_lettered": 0})
    (key, event), = broker.on("in")
    assert key == b"hubspot-deal-9001"
    assert event["event_id"] == expected_id(f"hubspot:62515:101:lead.created")


@pytest.mark.parametrize("case, headers, reason", [
    ("wrong secret", lambda uri, body: hubspot_v3_headers(uri, body, now_ms(), secret="not-it"), "bad_signature"),
    ("the internal URI", lambda uri, body: hubspot_v3_headers(uri.replace(PUBLIC, "http://127.0.0.1"), body, now_ms()),
     "bad_signature"),
    ("6 minutes old", lambda uri, body: hubspot_v3_headers(uri, body, now_ms() - 360_000), "stale_timestamp"),
    ("6 minutes ahead", lambda uri, body: hubspot_v3_headers(uri, body, now_ms() + 360_000), "stale_timestamp"),
    ("other body", lambda uri, body: hubspot_v3_headers(uri, body + b" ", now_ms()), "bad_signature"),
    ("no signature", lambda uri, body: {"Content-Type": "application/json"}, "missing_signature"),
    ("a timestamp of 5,000 digits", lambda uri, body: {**hubspot_v3_headers(uri, body, now_ms()),
                                                       "X-HubSpot-Request-Timestamp": "9" * 5000}, "missing_signature"),
    ("superscript digits", lambda uri, body: {**hubspot_v3_headers(uri, body, now_ms()),
                                               "X-HubSpot-Request-Timestamp": "²³"}, "missing_signature"),
])  # fmt: skip
def test_hubspot_refuses_what_its_secret_did_not_sign_now(gateway, broker, case, headers, reason):
    body = dumps([hubspot_event(102, "deal.creation", 9002, now_ms())])
    before = metric("crm_gateway_verification_failures_total", source="hubspot", reason=reason)
    status, _, _ = gateway.post("/webhooks/hubspot", body, headers(f"{PUBLIC}/webhooks/hubspot", body))
    assert status == 401
    assert metric("crm_gateway_verification_failures_total", source="hubspot", reason=reason) == before + 1
    assert broker.sent == []


def test_hubspot_v1_and_v2_signatures(gateway, broker):
    v1 = dumps([hubspot_event(103, "deal.creation", 9003, now_ms())])
    v2 = dumps([hubspot_event(104, "deal.creation", 9004, now_ms())])
    assert gateway.post("/webhooks/hubspot", v1, hubspot_v1_headers(v1))[0] == 200
    assert gateway.post("/webhooks/hubspot", v2, hubspot_v2_headers(f"{PUBLIC}/webhooks/hubspot", v2))[0] == 200
    assert gateway.post("/webhooks/hubspot", v2, hubspot_v1_headers(v1))[0] == 401  # v1 of another body
    assert [key for key, _ in broker.on("in")] == [b"hubspot-deal-9003", b"hubspot-deal-9004"]


def test_hubspot_v3_is_checked_when_it_comes_with_the_older_signature(gateway, broker):
    """HubSpot sends X-HubSpot-Signature-Version: v1 with the v1 signature, and the v3 one besides: v3 decides, so
    a replay with a valid v1 signature but a stale v3 timestamp is refused."""
    uri = f"{PUBLIC}/webhooks/hubspot"
    fresh = dumps([hubspot_event(105, "deal.creation", 9005, now_ms())])
    stale = dumps([hubspot_event(106, "deal.creation", 9006, now_ms())])
    forged = dumps([hubspot_event(107, "deal.creation", 9007, now_ms())])
    before = metric("crm_gateway_verification_failures_total", source="hubspot", reason="stale_timestamp")
    answers = [
        gateway.post("/webhooks/hubspot", fresh, {**hubspot_v1_headers(fresh),
                                                  **hubspot_v3_headers(uri, fresh, now_ms())}),
        gateway.post("/webhooks/hubspot", stale, {**hubspot_v1_headers(stale),
                                                  **hubspot_v3_headers(uri, stale, now_ms() - 360_000)}),
        gateway.post("/webhooks/hubspot", forged, {**hubspot_v1_headers(forged),
                                                   **hubspot_v3_headers(uri, forged, now_ms(), secret="not-it")}),
    ]  # fmt: skip
    assert [(status, orjson.loads(body)) for status, body, _ in answers] == [
        (200, {"published": 1, "dead_lettered": 0}),
        (401, {"error": "X-HubSpot-Request-Timestamp is more than 5 minutes away"}),
        (401, {"error": "the signature does not match"}),
    ]
    assert metric("crm_gateway_verification_failures_total", source="hubspot", reason="stale_timestamp") == before + 1
    assert [key for key, _ in broker.on("in")] == [b"hubspot-deal-9005"]


def test_hubspot_v3_signs_the_target_url_with_hubspots_own_decoding(gateway, broker):
    """A target URL with escapes in its query: HubSpot decodes %3A, %2F, %3F, %40, %21, %24, %27, %28, %29, %2A,
    %2C and %3B before signing, and leaves the others (%26, %20) as they are."""
    path = "/webhooks/hubspot?account=acme%3Aeu%2C1&team=sales%26ops%20emea"
    body = dumps([hubspot_event(108, "deal.creation", 9008, now_ms())])
    signed_by_hubspot = hubspot_v3_headers(f"{PUBLIC}{path}", body, now_ms())
    digest = hmac.new(HUBSPOT_SECRET.encode(), b"POST" + f"{PUBLIC}/webhooks/hubspot?account=acme:eu,1&team=sales%26ops"
                      f"%20emea".encode() + body + signed_by_hubspot["X-HubSpot-Request-Timestamp"].encode(),
                      hashlib.sha256)  # fmt: skip
    assert signed_by_hubspot["X-HubSpot-Signature-v3"] == base64.b64encode(digest.digest()).decode()
    assert gateway.post(path, body, signed_by_hubspot)[0] == 200
    # Signed over the URI decoded altogether (`&`, ` `): not what HubSpot signs, refused.
    decoded = hubspot_v3_headers(f"{PUBLIC}/webhooks/hubspot?account=acme:eu,1&team=sales&ops emea", body, now_ms())
    assert gateway.post(path, body, decoded)[0] == 401
    assert [key for key, _ in broker.on("in")] == [b"hubspot-deal-9008"]


def test_pipedrive_basic_credentials(gateway, broker):
    body = dumps(pipedrive_v1_deal("added", 31, 1_767_225_600, pipedrive_v1_current(
        31, 1, "open", "2026-01-01 00:00:00", "2026-01-01 00:00:00"), None))  # fmt: skip
    for headers in (basic(password="wrong"), basic(user="other"), {"Content-Type": "application/json"},
                    {**basic(), "Authorization": "Basic !!!"}):  # fmt: skip
        status, _, answer_headers = gateway.post("/webhooks/pipedrive", body, headers)
        assert status == 401
    assert broker.sent == []
    assert gateway.post("/webhooks/pipedrive", body, basic())[0] == 200
    assert len(broker.on("in")) == 1


def test_salesforce_checks_the_organization_and_acks_in_soap(gateway, broker):
    fields = opportunity("0065g00000Opp01AAA", "Prospecting", "2026-01-01T09:00:00.000Z", "2026-01-01T09:00:00.000Z")
    other_org = salesforce_message([("04l5g00000N00001AA", fields)], "00D5g000009ZZZZEAZ")
    status, body, _ = gateway.post("/webhooks/salesforce", other_org, SALESFORCE_HEADERS)
    assert status == 403 and broker.sent == []
    # The configured id has 15 characters, the message the 18 of the same org.
    ours = salesforce_message([("04l5g00000N00001AA", fields)], SALESFORCE_ORG_18)
    status, body, headers = gateway.post("/webhooks/salesforce", ours, SALESFORCE_HEADERS)
    assert status == 200 and headers["Content-Type"] == "text/xml; charset=utf-8"
    assert b'<notificationsResponse xmlns="http://soap.sforce.com/2005/09/outbound"><Ack>true</Ack>' in body
    assert len(broker.on("in")) == 1


def test_signed_contract_events(gateway, broker):
    events = [{"event_id": "e1", "type": "lead.created", "occurred_at": "2026-01-01T00:00:00Z", "lead_id": "L1",
               "payload": {"source": "web"}}]  # fmt: skip
    body = dumps(events)
    t = int(time.time())
    assert gateway.post("/webhooks/events", body, events_headers(body, t - 301))[0] == 401
    assert gateway.post("/webhooks/events", body, events_headers(body, t, secret="not-it"))[0] == 401
    assert gateway.post("/webhooks/events", body, {**events_headers(body, t), "X-CRM-Pulse-Signature": f"t={t}"})[0] == 401
    assert broker.sent == []
    assert gateway.post("/webhooks/events", body, events_headers(body, t))[0] == 200
    assert broker.on("in") == [(b"L1", events[0])]


def test_secrets_come_from_files_and_never_show(tmp_path, monkeypatch, gateway, caplog):
    (tmp_path / "crm_pulse_hubspot_client_secret").write_text("from-a-file")
    monkeypatch.setenv("CRM_PULSE_SECRETS_DIR", str(tmp_path))
    loaded = load_settings()
    assert loaded.hubspot_client_secret.get_secret_value() == "from-a-file"
    assert "from-a-file" not in repr(loaded) and "from-a-file" not in str(loaded)
    caplog.set_level(logging.DEBUG)
    body = dumps([hubspot_event(105, "deal.creation", 9005, now_ms())])
    gateway.post("/webhooks/hubspot", body, hubspot_v3_headers(f"{PUBLIC}/webhooks/hubspot", body, now_ms(), "x"))
    assert HUBSPOT_SECRET not in caplog.text


# --- point 3: translation --------------------------------------------------------------------------------


def test_hubspot_deal_through_its_stages(gateway, broker):
    t = 1_767_225_600_000
    batch = [
        hubspot_event(201, "deal.creation", 77, t),
        hubspot_event(202, "deal.propertyChange", 77, t + 1000, "dealstage", "qualifiedtobuy"),
        hubspot_event(203, "deal.propertyChange", 77, t + 2000, "amount", "12500.50"),
        hubspot_event(204, "deal.propertyChange", 77, t + 3000, "dealstage", "closedwon"),
        hubspot_event(205, "contact.creation", 88, t + 4000),
        hubspot_event(206, "deal.propertyChange", 78, t + 5000, "dealstage", "closedlost"),
    ]
    body = dumps(batch)
    status, answer, _ = gateway.post("/webhooks/hubspot", body, hubspot_v1_headers(body))
    assert (status, orjson.loads(answer)) == (200, {"published": 5, "dead_lettered": 0})
    assert [value for _, value in broker.on("in")] == [
        {"event_id": expected_id("hubspot:62515:201:lead.created"), "type": "lead.created", "occurred_at": t,
         "lead_id": "hubspot-deal-77", "payload": {"source": "hubspot"}},
        {"event_id": expected_id("hubspot:62515:202:lead.stage_changed"), "type": "lead.stage_changed",
         "occurred_at": t + 1000, "lead_id": "hubspot-deal-77", "pipeline": "default",
         "payload": {"from": "unknown", "to": "qualified"}},
        {"event_id": expected_id("hubspot:62515:204:deal.won"), "type": "deal.won", "occurred_at": t + 3000,
         "lead_id": "hubspot-deal-77", "pipeline": "default", "payload": {"amount": 12500.5, "currency": "USD"}},
        {"event_id": expected_id("hubspot:62515:205:lead.created"), "type": "lead.created", "occurred_at": t + 4000,
         "lead_id": "hubspot-contact-88", "payload": {"source": "hubspot"}},
        {"event_id": expected_id("hubspot:62515:206:deal.lost"), "type": "deal.lost", "occurred_at": t + 5000,
         "lead_id": "hubspot-deal-78", "pipeline": "default", "payload": {"reason": "closedlost"}},
    ]  # fmt: skip


def test_hubspot_generic_object_subscriptions_translate_as_the_legacy_ones(gateway, broker):
    """`object.creation` / `object.propertyChange` name the object by objectTypeId: deals 0-3, contacts 0-1;
    other objects (a company, 0-2) give nothing."""
    t = 1_767_225_600_000
    batch = [
        hubspot_event(211, "object.creation", 79, t, object_type="0-3"),
        hubspot_event(212, "object.propertyChange", 79, t + 1000, "dealstage", "qualifiedtobuy", object_type="0-3"),
        hubspot_event(213, "object.creation", 89, t + 2000, object_type="0-1"),
        hubspot_event(214, "object.creation", 99, t + 3000, object_type="0-2"),
    ]
    body = dumps(batch)
    status, answer, _ = gateway.post("/webhooks/hubspot", body, hubspot_v1_headers(body))
    assert (status, orjson.loads(answer)) == (200, {"published": 3, "dead_lettered": 0})
    assert [value for _, value in broker.on("in")] == [
        {"event_id": expected_id("hubspot:62515:211:lead.created"), "type": "lead.created", "occurred_at": t,
         "lead_id": "hubspot-deal-79", "payload": {"source": "hubspot"}},
        {"event_id": expected_id("hubspot:62515:212:lead.stage_changed"), "type": "lead.stage_changed",
         "occurred_at": t + 1000, "lead_id": "hubspot-deal-79", "pipeline": "default",
         "payload": {"from": "unknown", "to": "qualified"}},
        {"event_id": expected_id("hubspot:62515:213:lead.created"), "type": "lead.created", "occurred_at": t + 2000,
         "lead_id": "hubspot-contact-89", "payload": {"source": "hubspot"}},
    ]  # fmt: skip


def test_pipedrive_v1_and_v2_deals_and_activities(gateway, broker):
    v1_moved = pipedrive_v1_deal("updated", 31, 1_767_229_200, pipedrive_v1_current(
        31, 3, "open", "2026-01-01 00:00:00", "2026-01-01 01:00:00", 900),
        pipedrive_v1_current(31, 2, "open", "2026-01-01 00:00:00", "2026-01-01 00:30:00", 900))  # fmt: skip
    v2_won = pipedrive_v2("8f7a0c2e-0b1d-4c53-9a57-2f6f1f3e0a01", "change", "deal",
                          {"id": 32, "value": 4200, "currency": "EUR", "status": "won", "stage_id": 4, "pipeline_id": 1,
                           "owner_id": 9002, "add_time": "2026-01-01T00:00:00Z", "update_time": "2026-01-02T10:00:00Z"},
                          {"status": "open"}, "2026-01-02T10:00:00.123Z")  # fmt: skip
    v2_activity = pipedrive_v2("8f7a0c2e-0b1d-4c53-9a57-2f6f1f3e0a02", "create", "activity",
                               {"id": 5, "type": "call", "deal_id": 32, "owner_id": 9002,
                                "add_time": "2026-01-01T12:00:00Z"}, None, "2026-01-01T12:00:00Z")  # fmt: skip
    for doc in (v1_moved, v2_won, v2_activity):
        assert gateway.post("/webhooks/pipedrive", dumps(doc), basic())[0] == 200
    assert [value for _, value in broker.on("in")] == [
        {"event_id": expected_id(f"pipedrive:v1:deal:31:{1_767_229_200_000_123}:lead.stage_changed"),
         "type": "lead.stage_changed", "occurred_at": "2026-01-01T01:00:00Z", "lead_id": "pipedrive-deal-31",
         "pipeline": "1", "rep_id": "pipedrive-user-9001", "payload": {"from": "qualified", "to": "proposal"}},
        {"event_id": expected_id("pipedrive:8f7a0c2e-0b1d-4c53-9a57-2f6f1f3e0a01:deal.won"), "type": "deal.won",
         "occurred_at": "2026-01-02T10:00:00Z", "lead_id": "pipedrive-deal-32", "pipeline": "1",
         "rep_id": "pipedrive-user-9002", "payload": {"amount": 4200.0, "currency": "EUR"}},
        {"event_id": expected_id("pipedrive:8f7a0c2e-0b1d-4c53-9a57-2f6f1f3e0a02:lead.activity"),
         "type": "lead.activity", "occurred_at": "2026-01-01T12:00:00Z", "lead_id": "pipedrive-deal-32",
         "rep_id": "pipedrive-user-9002", "payload": {"kind": "call", "direction": "outbound"}},
    ]  # fmt: skip


def test_salesforce_notifications_of_one_message(gateway, broker):
    created = opportunity("0065g00000Opp02AAA", "Qualification", "2026-01-01T09:00:00.000Z", "2026-01-01T09:00:00.000Z")
    moved = opportunity("0065g00000Opp02AAA", "Negotiation/Review", "2026-01-01T09:00:00.000Z", "2026-01-03T09:00:00.000Z")
    won = opportunity("0065g00000Opp02AAA", "Closed Won", "2026-01-01T09:00:00.000Z", "2026-01-05T09:00:00.000Z",
                      amount=7300.0, closed=True, won=True)  # fmt: skip
    message = salesforce_message([("04l5g00000N0000AAA", created), ("04l5g00000N0000BAA", moved),
                                  ("04l5g00000N0000CAA", won)])  # fmt: skip
    assert gateway.post("/webhooks/salesforce", message, SALESFORCE_HEADERS)[0] == 200
    envelope = {"lead_id": "salesforce-opportunity-0065g00000Opp02AAA", "rep_id": "salesforce-user-0055g00000Rep01AAA",
                "account_id": "0015g00000XyZ12AAB"}  # fmt: skip
    assert [value for _, value in broker.on("in")] == [
        {"event_id": expected_id("salesforce:0065g00000Opp02AAA:2026-01-01T09:00:00.000Z:lead.created"), "type": "lead.created",
         "occurred_at": "2026-01-01T09:00:00.000Z", **envelope, "payload": {"source": "salesforce", "stage": "qualified"}},
        {"event_id": expected_id("salesforce:0065g00000Opp02AAA:2026-01-03T09:00:00.000Z:lead.stage_changed"), "type": "lead.stage_changed",
         "occurred_at": "2026-01-03T09:00:00.000Z", **envelope, "payload": {"from": "unknown", "to": "negotiation"}},
        {"event_id": expected_id("salesforce:0065g00000Opp02AAA:2026-01-05T09:00:00.000Z:deal.won"), "type": "deal.won",
         "occurred_at": "2026-01-05T09:00:00.000Z", **envelope, "payload": {"amount": 7300.0, "currency": "USD"}},
    ]  # fmt: skip


MARCH_31, APRIL_30 = 1_774_915_200_000, 1_777_507_200_000  # 2026-03-31 and 2026-04-30, 00:00 UTC, epoch ms


def test_hubspot_amount_close_date_and_forecast_category_changes_give_deal_updated_snapshots(gateway, broker):
    t = 1_767_225_600_000
    batch = [
        # No close date known yet: nothing to snapshot, the amount is remembered.
        hubspot_event(221, "deal.propertyChange", 80, t, "amount", "10000"),
        hubspot_event(222, "deal.propertyChange", 80, t + 1000, "closedate", str(MARCH_31)),
        hubspot_event(223, "deal.propertyChange", 80, t + 2000, "hs_forecast_category", "COMMIT"),
        hubspot_event(224, "object.propertyChange", 80, t + 3000, "closedate", str(APRIL_30), object_type="0-3"),
        hubspot_event(225, "deal.propertyChange", 80, t + 4000, "amount", "7500.25"),
        # A close date without any amount seen: nothing yet (0 would read as a cut from the amount it has).
        hubspot_event(226, "deal.propertyChange", 81, t + 5000, "closedate", str(MARCH_31)),
        hubspot_event(227, "deal.propertyChange", 80, t + 6000, "dealstage", "closedwon"),
    ]
    body = dumps(batch)
    status, answer, _ = gateway.post("/webhooks/hubspot", body, hubspot_v1_headers(body))
    assert (status, orjson.loads(answer)) == (200, {"published": 5, "dead_lettered": 0})

    def updated(n: int, deal: int, at: int, amount: float, close: int, category: str | None = None) -> dict:
        payload = {"amount": amount, "currency": "USD", "close_date": close}
        return {"event_id": expected_id(f"hubspot:62515:{n}:deal.updated"), "type": "deal.updated", "occurred_at": at,
                "lead_id": f"hubspot-deal-{deal}",
                "payload": payload | ({"forecast_category": category} if category else {})}  # fmt: skip

    assert [value for _, value in broker.on("in")] == [
        updated(222, 80, t + 1000, 10000.0, MARCH_31),
        updated(223, 80, t + 2000, 10000.0, MARCH_31, "commit"),
        updated(224, 80, t + 3000, 10000.0, APRIL_30, "commit"),
        updated(225, 80, t + 4000, 7500.25, APRIL_30, "commit"),
        {"event_id": expected_id("hubspot:62515:227:deal.won"), "type": "deal.won", "occurred_at": t + 6000,
         "lead_id": "hubspot-deal-80", "pipeline": "default", "payload": {"amount": 7500.25, "currency": "USD"}},
    ]  # fmt: skip
    # Deal 81's amount comes: its first snapshot, then an omitted category; a cleared close date: no snapshot
    # until one is set again.
    later = [hubspot_event(228, "deal.propertyChange", 81, t + 7000, "amount", "300"),
             hubspot_event(229, "deal.propertyChange", 81, t + 8000, "hs_forecast_category", "OMIT"),
             hubspot_event(230, "deal.propertyChange", 81, t + 9000, "closedate", ""),
             hubspot_event(231, "deal.propertyChange", 81, t + 10000, "amount", "200")]  # fmt: skip
    body = dumps(later)
    status, answer, _ = gateway.post("/webhooks/hubspot", body, hubspot_v1_headers(body))
    assert (status, orjson.loads(answer)) == (200, {"published": 2, "dead_lettered": 0})
    assert [value for _, value in broker.on("in")][-2:] == [updated(228, 81, t + 7000, 300.0, MARCH_31),
                                                            updated(229, 81, t + 8000, 300.0, MARCH_31, "omitted")]


def test_pipedrive_value_currency_and_expected_close_date_changes_give_deal_updated(gateway, broker):
    before = pipedrive_v1_current(33, 3, "open", "2026-01-01 00:00:00", "2026-01-01 00:30:00", 900)
    v1_cut = pipedrive_v1_deal("updated", 33, 1_767_229_200, {
        **pipedrive_v1_current(33, 3, "open", "2026-01-01 00:00:00", "2026-01-01 01:00:00", 600),
        "expected_close_date": "2026-03-31"}, {**before, "expected_close_date": "2026-03-31"})  # fmt: skip
    # v2: only the changed field in `previous`; the stage too moved in the same change.
    data = {"id": 34, "value": 4200, "currency": "EUR", "status": "open", "stage_id": 3, "pipeline_id": 1,
            "owner_id": 9002, "expected_close_date": "2026-04-30", "add_time": "2026-01-01T00:00:00Z",
            "update_time": "2026-01-02T10:00:00Z"}  # fmt: skip
    v2_pushed = pipedrive_v2("8f7a0c2e-0b1d-4c53-9a57-2f6f1f3e0a03", "change", "deal", data,
                             {"expected_close_date": "2026-03-31", "stage_id": 2}, "2026-01-02T10:00:00.123Z")  # fmt: skip
    # Changes that give no snapshot: the title alone; a value on a deal without a close date.
    v2_title = pipedrive_v2("8f7a0c2e-0b1d-4c53-9a57-2f6f1f3e0a04", "change", "deal", {**data, "title": "B"},
                            {"title": "A"}, "2026-01-02T11:00:00Z")  # fmt: skip
    v2_no_date = pipedrive_v2("8f7a0c2e-0b1d-4c53-9a57-2f6f1f3e0a05", "change", "deal",
                              {**data, "expected_close_date": None}, {"value": 4000}, "2026-01-02T12:00:00Z")  # fmt: skip
    # Created with a value and an expected close date: its first snapshot with its creation.
    v2_created = pipedrive_v2("8f7a0c2e-0b1d-4c53-9a57-2f6f1f3e0a06", "create", "deal",
                              {**data, "id": 35, "stage_id": 1, "value": 250}, None, "2026-01-01T00:00:00Z")  # fmt: skip
    for doc in (v1_cut, v2_pushed, v2_title, v2_no_date, v2_created):
        assert gateway.post("/webhooks/pipedrive", dumps(doc), basic())[0] == 200
    assert [value for _, value in broker.on("in")][-2:] == [
        {"event_id": expected_id("pipedrive:8f7a0c2e-0b1d-4c53-9a57-2f6f1f3e0a06:lead.created"), "type": "lead.created",
         "occurred_at": "2026-01-01T00:00:00Z", "lead_id": "pipedrive-deal-35", "pipeline": "1",
         "rep_id": "pipedrive-user-9002", "payload": {"source": "pipedrive", "stage": "new"}},
        {"event_id": expected_id("pipedrive:8f7a0c2e-0b1d-4c53-9a57-2f6f1f3e0a06:deal.updated"), "type": "deal.updated",
         "occurred_at": "2026-01-01T00:00:00Z", "lead_id": "pipedrive-deal-35", "pipeline": "1",
         "rep_id": "pipedrive-user-9002",
         "payload": {"amount": 250.0, "currency": "EUR", "close_date": "2026-04-30T00:00:00Z"}},
    ]  # fmt: skip
    assert [value for _, value in broker.on("in")][:-2] == [
        {"event_id": expected_id(f"pipedrive:v1:deal:33:{1_767_229_200_000_123}:deal.updated"), "type": "deal.updated",
         "occurred_at": "2026-01-01T01:00:00Z", "lead_id": "pipedrive-deal-33", "pipeline": "1",
         "rep_id": "pipedrive-user-9001",
         "payload": {"amount": 600.0, "currency": "EUR", "close_date": "2026-03-31T00:00:00Z"}},
        {"event_id": expected_id("pipedrive:8f7a0c2e-0b1d-4c53-9a57-2f6f1f3e0a03:lead.stage_changed"),
         "type": "lead.stage_changed", "occurred_at": "2026-01-02T10:00:00Z", "lead_id": "pipedrive-deal-34",
         "pipeline": "1", "rep_id": "pipedrive-user-9002", "payload": {"from": "qualified", "to": "proposal"}},
        {"event_id": expected_id("pipedrive:8f7a0c2e-0b1d-4c53-9a57-2f6f1f3e0a03:deal.updated"), "type": "deal.updated",
         "occurred_at": "2026-01-02T10:00:00Z", "lead_id": "pipedrive-deal-34", "pipeline": "1",
         "rep_id": "pipedrive-user-9002",
         "payload": {"amount": 4200.0, "currency": "EUR", "close_date": "2026-04-30T00:00:00Z"}},
    ]  # fmt: skip


def test_salesforce_amount_close_date_and_forecast_category_give_deal_updated_and_no_false_stage_change(gateway, broker):
    opp, created = "0065g00000Opp03AAA", "2026-01-01T09:00:00.000Z"
    new = opportunity(opp, "Qualification", created, created, amount=10000.0, close_date="2026-03-31",
                      forecast="Pipeline")  # fmt: skip
    cut = opportunity(opp, "Qualification", created, "2026-01-02T09:00:00.000Z", amount=8000.0,
                      close_date="2026-03-31", forecast="Pipeline")  # fmt: skip
    moved = opportunity(opp, "Negotiation/Review", created, "2026-01-03T09:00:00.000Z", amount=8000.0,
                        close_date="2026-03-31", forecast="Pipeline")  # fmt: skip
    committed = opportunity(opp, "Negotiation/Review", created, "2026-01-04T09:00:00.000Z", amount=8000.0,
                            close_date="2026-04-30", forecast="Commit")  # fmt: skip
    message = salesforce_message([("04l5g00000N0001AAA", new), ("04l5g00000N0002AAA", cut),
                                  ("04l5g00000N0003AAA", moved), ("04l5g00000N0004AAA", committed)])  # fmt: skip
    assert gateway.post("/webhooks/salesforce", message, SALESFORCE_HEADERS)[0] == 200
    envelope = {"lead_id": f"salesforce-opportunity-{opp}", "rep_id": "salesforce-user-0055g00000Rep01AAA",
                "account_id": "0015g00000XyZ12AAB"}  # fmt: skip

    def event(at: str, kind: str, payload: dict) -> dict:
        return {"event_id": expected_id(f"salesforce:{opp}:{at}:{kind}"), "type": kind, "occurred_at": at, **envelope,
                "payload": payload}  # fmt: skip

    def updated(at: str, amount: float, close: str, category: str) -> dict:
        return event(at, "deal.updated", {"amount": amount, "currency": "USD", "close_date": close,
                                          "forecast_category": category})  # fmt: skip

    first = [
        event(created, "lead.created", {"source": "salesforce", "stage": "qualified"}),
        updated(created, 10000.0, "2026-03-31T00:00:00Z", "pipeline"),
        updated("2026-01-02T09:00:00.000Z", 8000.0, "2026-03-31T00:00:00Z", "pipeline"),  # the amount alone
        event("2026-01-03T09:00:00.000Z", "lead.stage_changed", {"from": "unknown", "to": "negotiation"}),
        updated("2026-01-04T09:00:00.000Z", 8000.0, "2026-04-30T00:00:00Z", "commit"),
    ]
    assert [value for _, value in broker.on("in")] == first
    # Retried (the same notifications, after a 503 say): the same events again, which the worker drops by id. A later
    # notification of the same record (a field the gateway does not read changed): nothing.
    assert gateway.post("/webhooks/salesforce", message, SALESFORCE_HEADERS)[0] == 200
    touched = opportunity(opp, "Negotiation/Review", created, "2026-01-05T09:00:00.000Z", amount=8000.0,
                          close_date="2026-04-30", forecast="Commit")  # fmt: skip
    assert gateway.post("/webhooks/salesforce", salesforce_message([("04l5g00000N0005AAA", touched)]),
                        SALESFORCE_HEADERS)[0] == 200  # fmt: skip
    assert [value for _, value in broker.on("in")] == first + first


# --- point 4: answers ------------------------------------------------------------------------------------


def test_a_redelivery_gives_the_same_event_ids(gateway, broker):
    body = dumps([hubspot_event(301, "deal.propertyChange", 91, 1_767_225_600_000, "dealstage", "contractsent")])
    again = dumps([{**orjson.loads(body)[0], "attemptNumber": 1}])
    assert gateway.post("/webhooks/hubspot", body, hubspot_v1_headers(body))[0] == 200
    assert gateway.post("/webhooks/hubspot", again, hubspot_v1_headers(again))[0] == 200
    first, second = (value["event_id"] for _, value in broker.on("in"))
    assert first == second == expected_id("hubspot:62515:301:lead.stage_changed")


def test_an_unknown_stage_is_dead_lettered_with_its_reason_and_answered_2xx(gateway, broker):
    poison = hubspot_event(401, "deal.propertyChange", 92, 1_767_225_600_000, "dealstage", "999888")
    fine = hubspot_event(402, "deal.creation", 93, 1_767_225_600_000)
    body = dumps([poison, fine])
    before = metric("crm_gateway_translation_failures_total", source="hubspot", reason="unknown_stage")
    status, answer, _ = gateway.post("/webhooks/hubspot", body, hubspot_v1_headers(body))
    assert (status, orjson.loads(answer)) == (200, {"published": 1, "dead_lettered": 1})
    (key, dead), = broker.on("dlq")
    record = DeadLetter.model_validate(dead)
    assert (record.reason, record.error, record.source.gateway) == (
        "untranslatable", "unknown_stage: hubspot stage '999888' is not in the gateway mapping", "hubspot")
    assert orjson.loads(base64.b64decode(record.original_base64)) == poison
    assert metric("crm_gateway_translation_failures_total", source="hubspot", reason="unknown_stage") == before + 1
    assert [value["lead_id"] for _, value in broker.on("in")] == ["hubspot-deal-93"]


def test_a_contract_event_that_fails_validation_is_dead_lettered_as_the_worker_would(gateway, broker):
    body = dumps([{"event_id": "e2", "type": "deal.won", "occurred_at": "2026-01-01T00:00:00Z", "lead_id": "L2",
                   "payload": {"amount": -5}}])  # fmt: skip
    status, body, _ = gateway.post("/webhooks/events", body, events_headers(body, int(time.time())))
    assert (status, orjson.loads(body)) == (200, {"published": 0, "dead_lettered": 1})
    (_, dead), = broker.on("dlq")
    assert (dead["reason"], dead["error"]) == ("invalid_field", "payload.amount: Input should be greater than or equal to 0")
    assert broker.on("in") == []


@pytest.mark.parametrize("failure", ["hang", "down"])
def test_no_acknowledgement_in_time_answers_503_for_a_retry(gateway, broker, failure):
    setattr(broker, failure, True)
    body = dumps([hubspot_event(501, "deal.creation", 94, now_ms())])
    started = time.monotonic()
    status, answer, headers = gateway.post("/webhooks/hubspot", body, hubspot_v1_headers(body))
    assert (status, headers["Retry-After"]) == (503, "30")
    assert orjson.loads(answer) == {"error": "the broker did not acknowledge the events in time; deliver again"}
    assert time.monotonic() - started < 3  # the 0.5 s deadline, not the broker's pace


@pytest.mark.parametrize("path, body, headers, status, error", [
    ("/webhooks/hubspot", b"[" * 70_000, {"Content-Type": "application/json"}, 413, "the body is over 65536 bytes"),
    ("/webhooks/hubspot", b"[]", {"Content-Type": "text/plain"}, 415, "Content-Type must be application/json"),
    ("/webhooks/salesforce", b"<a/>", {"Content-Type": "application/json"}, 415,
     "Content-Type must be text/xml or application/xml"),
    ("/webhooks/hubspot", b'[{"eventId": 1', None, 400, "unparseable JSON: unexpected end of data: line 1 column 15 (char 14)"),
    ("/webhooks/hubspot", b'{"eventId": 1}', None, 400,
     "expected a JSON array of HubSpot events, each with eventId and occurredAt"),
    ("/webhooks/pipedrive", b"[]", basic(), 400, "expected a Pipedrive webhook: a JSON object with meta"),
    ("/webhooks/salesforce", b"<soapenv:Envelope", SALESFORCE_HEADERS, 400, "unparseable XML: unclosed token: line 1, column 0"),
    ("/webhooks/salesforce", b'<!DOCTYPE x [<!ENTITY a "b">]><x>&a;</x>', SALESFORCE_HEADERS, 400,
     "a DOCTYPE or ENTITY declaration has no place in an outbound message"),
])  # fmt: skip
def test_bad_input_answers(gateway, broker, path, body, headers, status, error):
    headers = headers or hubspot_v1_headers(body)
    got, answer, _ = gateway.post(path, body, headers)
    assert (got, orjson.loads(answer)) == (status, {"error": error})
    assert broker.sent == []


# --- point 5: metrics ------------------------------------------------------------------------------------


def test_requests_and_time_to_ack_are_counted(gateway, broker):
    accepted = metric("crm_gateway_requests_total", source="pipedrive", outcome="accepted")
    refused = metric("crm_gateway_requests_total", source="pipedrive", outcome="unauthenticated")
    acks = metric("crm_gateway_ack_seconds_count", source="pipedrive")
    body = dumps(pipedrive_v1_deal("added", 41, 1_767_225_600, pipedrive_v1_current(
        41, 1, "open", "2026-01-01 00:00:00", "2026-01-01 00:00:00"), None))  # fmt: skip
    gateway.post("/webhooks/pipedrive", body, basic())
    gateway.post("/webhooks/pipedrive", body, basic(password="no"))
    assert metric("crm_gateway_requests_total", source="pipedrive", outcome="accepted") == accepted + 1
    assert metric("crm_gateway_requests_total", source="pipedrive", outcome="unauthenticated") == refused + 1
    assert metric("crm_gateway_ack_seconds_count", source="pipedrive") == acks + 1


# --- the command -----------------------------------------------------------------------------------------


def test_the_command_needs_a_broker_and_a_free_port(tmp_path):
    import os
    import socket

    clean = {k: v for k, v in os.environ.items() if not k.startswith("CRM_PULSE_")}
    run = subprocess.run([sys.executable, "-m", "crm_pulse.cli", "gateway"], capture_output=True, text=True, env=clean)
    assert (run.returncode, run.stderr) == (1, "crm-pulse: CRM_PULSE_BROKER is not set: set it to the broker your "
                                               "worker reads (kafka://host:port)\n")  # fmt: skip
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        env = {**clean, "CRM_PULSE_BROKER": "kafka://127.0.0.1:9", "CRM_PULSE_GATEWAY_PORT": str(port)}
        run = subprocess.run([sys.executable, "-m", "crm_pulse.cli", "gateway"], capture_output=True, text=True, env=env)
    assert (run.returncode, run.stderr) == (1, f"crm-pulse: CRM_PULSE_GATEWAY_PORT={port}: 127.0.0.1:{port} is in "
                                               f"use; stop what listens there or choose another port\n")  # fmt: skip


def test_a_salesforce_notification_with_an_unknown_stage_is_dead_lettered_as_xml(gateway, broker):
    odd = opportunity("0065g00000OppXXAAA", "Sleeping", "2026-01-01T09:00:00.000Z", "2026-01-02T09:00:00.000Z")
    fine = opportunity("0065g00000OppYYAAA", "Prospecting", "2026-01-01T09:00:00.000Z", "2026-01-01T09:00:00.000Z")
    message = salesforce_message([("04l5g00000N0000XAA", odd), ("04l5g00000N0000YAA", fine)])
    status, body, _ = gateway.post("/webhooks/salesforce", message, SALESFORCE_HEADERS)
    assert status == 200 and b"<Ack>true</Ack>" in body
    (_, dead), = broker.on("dlq")
    assert (dead["reason"], dead["error"]) == ("untranslatable",
                                               "unknown_stage: salesforce stage 'Sleeping' is not in the gateway mapping")
    original = ElementTree.fromstring(base64.b64decode(dead["original_base64"]))
    outbound, sobject = "{http://soap.sforce.com/2005/09/outbound}", "{urn:sobject.enterprise.soap.sforce.com}"
    assert original.tag == f"{outbound}Notification" and original.findtext(f"{outbound}Id") == "04l5g00000N0000XAA"
    assert original.findtext(f"{outbound}sObject/{sobject}StageName") == "Sleeping"
    assert [value["lead_id"] for _, value in broker.on("in")] == ["salesforce-opportunity-0065g00000OppYYAAA"]


def test_a_chunked_body_without_a_length_is_cut_off_at_the_limit(gateway, broker):
    chunks = iter([b"[" + b" " * 40_000] * 2)  # urllib sends an iterable without Content-Length chunked
    status, answer, _ = gateway.post("/webhooks/events", chunks, {"Content-Type": "application/json"})
    assert (status, orjson.loads(answer)) == (413, {"error": "the body is over 65536 bytes"})
    assert broker.sent == []


@pytest.mark.parametrize("text, error", [
    ("[zoho]\n", "unknown zoho"),
    ("[pipedrive.pipelines.1]\n1 = 2\n", "pipedrive stage '1' must map to a stage name (a string)"),
    ("[salesforce.stages\n", "Expected ']' at the end of a table declaration (at line 1, column 19)"),
])  # fmt: skip
def test_a_mapping_that_cannot_be_used_is_named_in_one_line(tmp_path, text, error):
    from crm_pulse.config import SettingsInvalid

    path = tmp_path / "gateway.toml"
    path.write_text(text)
    with pytest.raises(SettingsInvalid) as raised:
        load_stage_map(path)
    assert str(raised.value) == f"CRM_PULSE_GATEWAY_MAPPING={path}: {error}"


def test_salesforce_notifications_of_one_state_give_one_event_id(gateway, broker):
    """Two notifications queued before the deal closed, both sent after it: each carries the closed deal."""
    won = opportunity("0065g00000OppZZAAA", "Closed Won", "2026-01-01T09:00:00.000Z", "2026-01-05T09:00:00.000Z",
                      amount=10.0, closed=True, won=True)  # fmt: skip
    message = salesforce_message([("04l5g00000N00001AA", won), ("04l5g00000N00002AA", won)])
    assert gateway.post("/webhooks/salesforce", message, SALESFORCE_HEADERS)[0] == 200
    ids = [value["event_id"] for _, value in broker.on("in")]
    assert ids == [expected_id("salesforce:0065g00000OppZZAAA:2026-01-05T09:00:00.000Z:deal.won")] * 2


ODD_VALUES = (None, True, 0, -1, 1e308, "", "x" * 300, "2026-13-45 99:99:99", [], [1], {}, {"id": None})


def mutations(document, rng):
    """`document` with one value somewhere in it replaced by an odd one, or removed."""
    paths = []

    def walk(node, path):
        for key, value in (node.items() if isinstance(node, dict) else enumerate(node)):
            paths.append(path + (key,))
            if isinstance(value, (dict, list)):
                walk(value, path + (key,))

    walk(document, ())
    for _ in range(200):
        copy = orjson.loads(orjson.dumps(document))
        *parents, last = rng.choice(paths)
        node = copy
        for key in parents:
            node = node[key]
        if isinstance(node, dict) and rng.random() < 0.3:
            del node[last]
        else:
            node[last] = rng.choice(ODD_VALUES)
        yield copy


def test_verified_payloads_of_odd_shapes_are_answered_and_never_crash_the_gateway(gateway, broker):
    import random

    rng = random.Random(19)
    hubspot = [hubspot_event(601, "deal.propertyChange", 95, 1_767_225_600_000, "dealstage", "closedwon")]
    pipedrive = pipedrive_v1_deal("updated", 96, 1_767_229_200, pipedrive_v1_current(
        96, 3, "won", "2026-01-01 00:00:00", "2026-01-01 01:00:00", 900),
        pipedrive_v1_current(96, 2, "open", "2026-01-01 00:00:00", "2026-01-01 00:30:00", 900))  # fmt: skip
    outcomes = {}
    for path, document, sign in (("/webhooks/hubspot", hubspot, hubspot_v1_headers),
                                 ("/webhooks/pipedrive", pipedrive, lambda body: basic())):  # fmt: skip
        for odd in mutations(document, rng):
            body = dumps(odd)
            status, answer, _ = gateway.post(path, body, sign(body))
            assert status in (200, 400), (path, odd, status, answer)
            outcomes[status] = outcomes.get(status, 0) + 1
    # Each answered as the verified input it is: translated, dead-lettered, ignored or refused as malformed.
    assert sum(outcomes.values()) == 400 and gateway.alive
    for topic, _, value in broker.sent:
        if topic == "dlq":
            assert DeadLetter.model_validate(value).reason in ("untranslatable", "invalid_field", "bad_timestamp")
