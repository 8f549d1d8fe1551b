"""`crm-pulse gateway` on the real broker with the worker: each CRM's webhooks move deals through stages and the
worker's dwell and win-rate KPIs show them; redeliveries through a restarted gateway are de-duplicated; 1,000
hostile requests publish nothing."""

from __future__ import annotations

import random
import urllib.request
import time
from pathlib import Path

import orjson
import pytest
from kafka import KafkaConsumer, TopicPartition
from kafka.admin import KafkaAdminClient, NewTopic

from crm_pulse.broker import EmbeddedBroker
from crm_pulse.config import Settings
from crm_pulse.gateway import load_stage_map, serve
from tests.gateway_payloads import (
    EVENTS_SECRET, HUBSPOT_SECRET, PIPEDRIVE_PASSWORD, PIPEDRIVE_USER, SALESFORCE_HEADERS, SALESFORCE_ORG_18, basic,
    dumps, events_headers, hubspot_event, hubspot_v1_headers, hubspot_v3_headers, opportunity, pipedrive_v1_current,
    pipedrive_v1_deal, pipedrive_v2, salesforce_message,
)  # fmt: skip
from tests.gateway_server import Served
from tests.integration.conftest import BROKER_KIND, on_tansu_only

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
HOUR = 3_600_000
T0 = 1_767_225_600_000  # 2026-01-01T00:00:00Z
MAX_BODY = 64 * 1024


def gateway_for(broker_url: str, input_topic: str, dlq_topic: str) -> Served:
    settings = Settings(
        broker=broker_url, broker_kind=BROKER_KIND, input_topic=input_topic, dlq_topic=dlq_topic,
        gateway_mapping=ROOT / "mappings" / "gateway.toml", gateway_max_body_bytes=MAX_BODY,
        hubspot_client_secret=HUBSPOT_SECRET, pipedrive_username=PIPEDRIVE_USER, pipedrive_password=PIPEDRIVE_PASSWORD,
        salesforce_organization_id=SALESFORCE_ORG_18, events_signing_secret=EVENTS_SECRET,
    )  # fmt: skip
    stages = load_stage_map(settings.gateway_mapping)
    return Served(lambda port, stop: serve(settings.model_copy(update={"gateway_port": port}), stages, stop))


def m(name, **labels):
    return (name, tuple(sorted(labels.items())))


def hubspot_post(gateway: Served, events: list[dict]) -> int:
    """Signed as HubSpot signs its webhooks: the v1 signature (X-HubSpot-Signature-Version: v1) and the v3 one."""
    body = dumps(events)
    uri = f"http://127.0.0.1:{gateway.port}/webhooks/hubspot"
    headers = {**hubspot_v1_headers(body), **hubspot_v3_headers(uri, body, int(time.time() * 1000))}
    return gateway.post("/webhooks/hubspot", body, headers)[0]


def pd_time(ms: int) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(ms / 1000))


def pd_iso(ms: int) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(ms / 1000))


def sf_iso(ms: int) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S.000Z", time.gmtime(ms / 1000))


def kpis_reach(worker, new_obs: int, won: int, lost: int) -> dict:
    return worker.wait_for(
        lambda got: got.get(m("crm_stage_dwell_observations", stage="new", window="7d")) == new_obs
        and got.get(m("crm_deals_won", window="7d")) == won and got.get(m("crm_deals_lost", window="7d")) == lost,
        what=f"{new_obs} exits from new, {won} won, {lost} lost", timeout=90,
    )  # fmt: skip


def test_each_crm_moves_deals_into_the_workers_kpis(start_worker, broker):
    worker = start_worker()
    with gateway_for(broker.url, worker.topic("input"), worker.topic("dlq")) as gateway:
        # HubSpot: deal 1 new 10 h, qualified 30 h, won (amount 1,000); deal 2 new 20 h, lost.
        won_event = hubspot_event(1004, "deal.propertyChange", 1, T0 + 40 * HOUR, "dealstage", "closedwon")
        assert hubspot_post(gateway, [
            hubspot_event(1001, "deal.creation", 1, T0),
            hubspot_event(1002, "deal.propertyChange", 1, T0 + 10 * HOUR, "dealstage", "qualifiedtobuy"),
            hubspot_event(1003, "deal.propertyChange", 1, T0 + 11 * HOUR, "amount", "1000"),
            won_event,
            hubspot_event(1005, "deal.creation", 2, T0 + 1 * HOUR),
            hubspot_event(1006, "deal.propertyChange", 2, T0 + 21 * HOUR, "dealstage", "closedlost"),
        ]) == 200  # fmt: skip
        metrics = kpis_reach(worker, new_obs=2, won=1, lost=1)
        assert metrics[m("crm_stage_dwell_mean_seconds", stage="new", window="7d")] == 15 * 3600
        assert metrics[m("crm_stage_dwell_mean_seconds", stage="qualified", window="7d")] == 30 * 3600
        assert metrics[m("crm_win_rate_ratio", window="7d")] == 0.5

        # Pipedrive: deal 31 (v1 added, v2 stage change, v2 won) new 5 h, qualified 13 h, won 500;
        # deal 32 (v2 created, v1 won) new 1 h, won 250.
        current = pipedrive_v1_current(31, 1, "open", pd_time(T0 + 2 * HOUR), pd_time(T0 + 2 * HOUR))
        deal31 = {"id": 31, "value": 500, "currency": "USD", "stage_id": 2, "pipeline_id": 1, "owner_id": 9001,
                  "add_time": pd_iso(T0 + 2 * HOUR), "status": "open"}  # fmt: skip
        deal32 = {"id": 32, "value": 250, "currency": "USD", "stage_id": 1, "pipeline_id": 1, "owner_id": 9001,
                  "add_time": pd_iso(T0 + 3 * HOUR), "update_time": pd_iso(T0 + 3 * HOUR), "status": "open"}  # fmt: skip
        for doc in (
            pipedrive_v1_deal("added", 31, (T0 + 2 * HOUR) // 1000, current, None),
            pipedrive_v2("d31-stage", "change", "deal", {**deal31, "update_time": pd_iso(T0 + 7 * HOUR)},
                         {"stage_id": 1}, pd_iso(T0 + 7 * HOUR)),
            pipedrive_v2("d31-won", "change", "deal", {**deal31, "status": "won", "update_time": pd_iso(T0 + 20 * HOUR)},
                         {"status": "open"}, pd_iso(T0 + 20 * HOUR)),
            pipedrive_v2("d32-new", "create", "deal", deal32, None, pd_iso(T0 + 3 * HOUR)),
            pipedrive_v1_deal("updated", 32, (T0 + 4 * HOUR) // 1000,
                              pipedrive_v1_current(32, 1, "won", pd_time(T0 + 3 * HOUR), pd_time(T0 + 4 * HOUR), 250),
                              pipedrive_v1_current(32, 1, "open", pd_time(T0 + 3 * HOUR), pd_time(T0 + 3 * HOUR), 250)),
        ):  # fmt: skip
            assert gateway.post("/webhooks/pipedrive", dumps(doc), basic())[0] == 200
        # new: 10, 20, 5, 1 h; qualified: 30, 13 h; 3 won, 1 lost.
        metrics = kpis_reach(worker, new_obs=4, won=3, lost=1)
        assert metrics[m("crm_stage_dwell_mean_seconds", stage="new", window="7d")] == 9 * 3600
        assert metrics[m("crm_stage_dwell_mean_seconds", stage="qualified", window="7d")] == 21.5 * 3600
        assert metrics[m("crm_win_rate_ratio", window="7d")] == 0.75

        # Salesforce, one message of three notifications: new 3 h, qualified 22 h, lost.
        created = sf_iso(T0 + 5 * HOUR)
        message = salesforce_message([
            ("04l5g00000N000S1AA", opportunity("0065g00000OppS1AAA", "Prospecting", created, created)),
            ("04l5g00000N000S2AA", opportunity("0065g00000OppS1AAA", "Qualification", created, sf_iso(T0 + 8 * HOUR))),
            ("04l5g00000N000S3AA", opportunity("0065g00000OppS1AAA", "Closed Lost", created, sf_iso(T0 + 30 * HOUR),
                                               closed=True)),
        ])  # fmt: skip
        status, body, _ = gateway.post("/webhooks/salesforce", message, SALESFORCE_HEADERS)
        assert status == 200 and b"<Ack>true</Ack>" in body
        metrics = kpis_reach(worker, new_obs=5, won=3, lost=2)
        assert metrics[m("crm_stage_dwell_mean_seconds", stage="new", window="7d")] == pytest.approx(39 / 5 * 3600)
        assert metrics[m("crm_stage_dwell_mean_seconds", stage="qualified", window="7d")] == pytest.approx(65 / 3 * 3600)
        assert metrics[m("crm_win_rate_ratio", window="7d")] == 0.6
        assert metrics[m("crm_won_revenue", window="7d")] == 1750

    # HubSpot delivers the won event again, to a restarted gateway: the same event id, applied once.
    with gateway_for(broker.url, worker.topic("input"), worker.topic("dlq")) as restarted:
        assert hubspot_post(restarted, [{**won_event, "attemptNumber": 1}]) == 200
    metrics = worker.wait_for(lambda got: got.get(m("crm_events_duplicate_total", type="deal.won")) == 1,
                              what="the redelivery to be recognised", timeout=60)  # fmt: skip
    assert metrics[m("crm_deals_won", window="7d")] == 3
    assert metrics[m("crm_won_revenue", window="7d")] == 1750
    assert sum(v for (name, _), v in metrics.items() if name == "crm_events_invalid_total") == 0


def test_crm_amount_and_close_date_changes_reach_the_workers_deal_alerts(start_worker, broker):
    # The Salesforce events come after HubSpot's two days later: a grace of 10 days keeps them in time.
    worker = start_worker(CRM_PULSE_GRACE_SECONDS=str(10 * 86400))
    day = 24 * HOUR
    with gateway_for(broker.url, worker.topic("input"), worker.topic("dlq")) as gateway:
        # HubSpot deal 5: 10,000 due on day 30, pushed to day 45 and cut to 7,000 (30 %).
        assert hubspot_post(gateway, [
            hubspot_event(1101, "deal.creation", 5, T0),
            hubspot_event(1102, "deal.propertyChange", 5, T0 + HOUR, "amount", "10000"),
            hubspot_event(1103, "deal.propertyChange", 5, T0 + 2 * HOUR, "closedate", str(T0 + 30 * day)),
            hubspot_event(1104, "deal.propertyChange", 5, T0 + day, "closedate", str(T0 + 45 * day)),
            hubspot_event(1105, "deal.propertyChange", 5, T0 + 2 * day, "amount", "7000"),
        ]) == 200  # fmt: skip
        # Salesforce: created at 5,000 due 2026-02-15, then the close date alone pushed to 2026-03-01.
        created = sf_iso(T0 + 3 * HOUR)
        message = salesforce_message([
            ("04l5g00000N000T1AA", opportunity("0065g00000OppT1AAA", "Prospecting", created, created, amount=5000.0,
                                               close_date="2026-02-15")),
            ("04l5g00000N000T2AA", opportunity("0065g00000OppT1AAA", "Prospecting", created, sf_iso(T0 + 3 * day),
                                               amount=5000.0, close_date="2026-03-01")),
        ])  # fmt: skip
        assert gateway.post("/webhooks/salesforce", message, SALESFORCE_HEADERS)[0] == 200
    metrics = worker.wait_for(lambda got: got.get(m("crm_alerts_emitted_total", type="deal.close_date_slipped")) == 2
                              and got.get(m("crm_alerts_emitted_total", type="deal.amount_decreased")) == 1,
                              what="two slips and a cut")  # fmt: skip
    # The Salesforce edit kept the stage: no stage change (it would restart the deal's dwell in "new").
    assert metrics[m("crm_events_processed_total", type="deal.updated")] == 5
    assert metrics[m("crm_events_processed_total", type="lead.stage_changed")] == 0
    alerts = [orjson.loads(r.value) for r in worker.read_all("alerts")]
    deal = [(a["type"], a["lead_id"], a["previous_close_date"], a["close_date"], a["push_count"], a["previous_amount"],
             a["amount"]) for a in alerts if a["type"] in ("deal.close_date_slipped", "deal.amount_decreased")]  # fmt: skip
    assert sorted(deal) == [
        ("deal.amount_decreased", "hubspot-deal-5", None, "2026-02-15T00:00:00.000Z", None, 10000.0, 7000.0),
        ("deal.close_date_slipped", "hubspot-deal-5", "2026-01-31T00:00:00.000Z", "2026-02-15T00:00:00.000Z", 1, None,
         10000.0),
        ("deal.close_date_slipped", "salesforce-opportunity-0065g00000OppT1AAA", "2026-02-15T00:00:00.000Z",
         "2026-03-01T00:00:00.000Z", 1, None, 5000.0),
    ]  # fmt: skip


@on_tansu_only
def test_while_the_broker_is_down_the_gateway_is_unready_and_answers_503_then_recovers(tmp_path):
    """Its own Tansu, stopped and started again on the same port (in memory: it comes back empty)."""
    own = EmbeddedBroker().start()
    try:
        create_topics(own.url, ["down-events", "down-dlq"])
        body = dumps([{"event_id": "d1", "type": "lead.created", "occurred_at": T0, "lead_id": "D",
                       "payload": {"source": "web"}}])  # fmt: skip
        with gateway_for(own.url, "down-events", "down-dlq") as gateway:
            assert gateway.get("/readyz")[0] == 200
            own.stop()
            assert gateway.get("/readyz")[0] == 503
            started = time.monotonic()
            status, _, headers = gateway.post("/webhooks/events", body, events_headers(body, int(time.time())))
            assert (status, headers["Retry-After"]) == (503, "30")
            assert time.monotonic() - started < 4 + 2  # the ack deadline, not the client's patience
            assert gateway.get("/healthz")[0] == 200
            own.start()
            create_topics(own.url, ["down-events", "down-dlq"])
            # The CRM's retry: accepted once the broker acknowledges it.
            deadline = time.monotonic() + 60
            while (status := gateway.post("/webhooks/events", body, events_headers(body, int(time.time())))[0]) != 200:
                assert status == 503 and time.monotonic() < deadline
                time.sleep(1)
            assert gateway.get("/readyz")[0] == 200
            offsets = end_offsets(own.url.removeprefix("kafka://"), ["down-events"])
            # Sends cancelled at the deadline may still have reached the broker: at least the retry is there.
            assert sum(offsets.values()) >= 1
    finally:
        own.stop()


def create_topics(broker_url: str, topics: list[str]) -> None:
    admin = KafkaAdminClient(bootstrap_servers=[broker_url.removeprefix("kafka://")])
    try:
        admin.create_topics([NewTopic(t, 1, 1) for t in topics])
    finally:
        admin.close()


def end_offsets(bootstrap: str, topics: list[str]) -> dict:
    consumer = KafkaConsumer(bootstrap_servers=[bootstrap])
    try:
        partitions = [TopicPartition(t, p) for t in topics for p in sorted(consumer.partitions_for_topic(t) or ())]
        return consumer.end_offsets(partitions)
    finally:
        consumer.close()


def test_a_thousand_hostile_requests_are_refused_and_publish_nothing(broker):
    bootstrap = broker.url.removeprefix("kafka://")
    topics = [f"hostile-{time.time_ns()}-events", f"hostile-{time.time_ns()}-dlq"]
    create_topics(broker.url, topics)
    rng = random.Random(19)
    now_s = int(time.time())
    good_hubspot = dumps([hubspot_event(1, "deal.creation", 1, T0)])
    good_pipedrive = dumps(pipedrive_v2("p-1", "create", "deal", {"id": 1, "stage_id": 1, "pipeline_id": 1,
                                        "add_time": pd_iso(T0), "status": "open"}, None, pd_iso(T0)))  # fmt: skip
    good_events = dumps([{"event_id": "x", "type": "lead.created", "occurred_at": T0, "lead_id": "X",
                          "payload": {"source": "web"}}])  # fmt: skip
    huge = b"[" + b" " * (MAX_BODY + 1) + b"]"

    with gateway_for(broker.url, *topics) as gateway:
        before = end_offsets(bootstrap, topics)
        uri = f"http://127.0.0.1:{gateway.port}/webhooks/hubspot"
        now_ms = now_s * 1000
        attacks = [
            # (path, body, headers, expected status)
            lambda: ("/webhooks/hubspot", good_hubspot, hubspot_v3_headers(uri, good_hubspot, now_ms, "guess"), 401),
            lambda: ("/webhooks/hubspot", good_hubspot, hubspot_v3_headers(uri, good_hubspot, now_ms - 301_000), 401),
            lambda: ("/webhooks/hubspot", good_hubspot[: rng.randrange(1, len(good_hubspot))],
                     hubspot_v3_headers(uri, good_hubspot, now_ms), 401),
            lambda: ("/webhooks/hubspot", huge, hubspot_v3_headers(uri, huge, now_ms), 413),
            lambda: ("/webhooks/pipedrive", good_pipedrive, basic(password=f"guess-{rng.random()}"), 401),
            lambda: ("/webhooks/pipedrive", good_pipedrive, basic(user="admin"), 401),
            lambda: ("/webhooks/pipedrive", huge, basic(), 413),
            lambda: ("/webhooks/salesforce", salesforce_message([("04l5g00000N00000AA", opportunity(
                     "0065g00000Opp00AAA", "Prospecting", sf_iso(T0), sf_iso(T0)))], org="00D000000000001AAA"),
                     SALESFORCE_HEADERS, 403),
            lambda: ("/webhooks/events", good_events, events_headers(good_events, now_s, "guess"), 401),
            lambda: ("/webhooks/events", good_events, events_headers(good_events, now_s - 600), 401),
            lambda: ("/webhooks/events", good_events[:-3], events_headers(good_events, now_s), 401),
            lambda: ("/webhooks/events", good_events, {"Content-Type": "application/x-www-form-urlencoded"}, 415),
        ]  # fmt: skip
        statuses = {}
        for i in range(1000):
            path, body, headers, expected = attacks[i % len(attacks)]()
            status = gateway.post(path, body, headers)[0]
            assert status == expected, (i, path, status, expected)
            statuses[expected] = statuses.get(expected, 0) + 1
        assert statuses == {401: 667, 413: 167, 403: 83, 415: 83}
        assert gateway.alive and gateway.get("/healthz")[0] == 200
        assert end_offsets(bootstrap, topics) == before
        # Still serving: a genuine request goes through.
        assert gateway.post("/webhooks/events", good_events, events_headers(good_events, int(time.time())))[0] == 200
        after = end_offsets(bootstrap, topics)
    assert {tp.topic: after[tp] - before[tp] for tp in before} == {topics[0]: 1, topics[1]: 0}


def test_the_command_serves_until_sigterm(broker, tmp_path):
    """`crm-pulse gateway` as a process: it creates its topics, serves, and stops cleanly on SIGTERM."""
    import os
    import subprocess
    import sys

    from crm_pulse.broker import free_port, wait_for_port

    port, name = free_port(), f"cmd-{time.time_ns()}"
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("CRM_PULSE_")},
           "CRM_PULSE_BROKER": broker.url, "CRM_PULSE_INPUT_TOPIC": f"{name}-events", "CRM_PULSE_DLQ_TOPIC": f"{name}-dlq",
           "CRM_PULSE_ALERTS_TOPIC": f"{name}-alerts", "CRM_PULSE_PARTITIONS": "1", "CRM_PULSE_GATEWAY_PORT": str(port),
           "CRM_PULSE_EVENTS_SIGNING_SECRET": EVENTS_SECRET}  # fmt: skip
    log = tmp_path / "gateway.log"
    with open(log, "wb") as out:
        process = subprocess.Popen([sys.executable, "-m", "crm_pulse.cli", "gateway"], env=env, stdout=out, stderr=out)
    try:
        wait_for_port(port, timeout=60)
        body = dumps([{"event_id": "c1", "type": "lead.created", "occurred_at": T0, "lead_id": "C",
                       "payload": {"source": "web"}}])  # fmt: skip
        served = Served.answer(urllib.request.Request(f"http://127.0.0.1:{port}/webhooks/events", data=body,
                                                      headers=events_headers(body, int(time.time()))))  # fmt: skip
        assert served[0] == 200, log.read_text()
        assert end_offsets(broker.url.removeprefix("kafka://"), [f"{name}-events", f"{name}-dlq"]) == {
            TopicPartition(f"{name}-events", 0): 1, TopicPartition(f"{name}-dlq", 0): 0}
    finally:
        process.terminate()
        assert process.wait(30) == 0, log.read_text()
    assert EVENTS_SECRET not in log.read_text()
