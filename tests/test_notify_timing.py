"""Grouping, digests, quiet hours and snoozes in the notifier, under a controlled clock and without a broker:
records handed to `Notifier` as the consume loop does, channels that record what they are sent, and a producer
that keeps what is written to notify's topics."""

from __future__ import annotations

import hashlib
import hmac
import urllib.error
import urllib.request
from datetime import datetime
from types import SimpleNamespace
from urllib.parse import parse_qs, urlparse

import orjson
import pytest
from kafka import TopicPartition
from prometheus_client import REGISTRY, CollectorRegistry

from crm_pulse.channels import Channel
from crm_pulse.config import Settings
from crm_pulse.directory import DirectoryFile
from crm_pulse.notify import Notifier, NotifyMetrics, Offsets, SentSet
from crm_pulse.gateway import Gateway
from crm_pulse.snooze import LinkRefused, Snoozes, check_link, snooze_link, snooze_record
from tests.gateway_server import Served, app_server

DIRECTORY = """
[reps.rep-7]
name = "Ana Lima"
email = "ana@example.com"
timezone = "Europe/Berlin"
working_hours = "09:00-17:30"
manager = "rep-1"

[reps.rep-1]
name = "Bo Chen"
email = "bo@example.com"
timezone = "Europe/Berlin"
working_hours = "09:00-17:30"
"""


def utc(text: str) -> datetime:
    return datetime.fromisoformat(text.replace("Z", "+00:00"))


class Recorder(Channel):
    def __init__(self, name: str, per_recipient: bool):
        self.name, self.per_recipient, self.sent, self.messages = name, per_recipient, [], []

    def send(self, message, alert, address):
        self.sent.append((address, message.headline, message.facts))
        self.messages.append(message)


class Producer:
    def __init__(self):
        self.records: list[tuple[str, bytes, bytes]] = []

    def send(self, topic, key, value):
        self.records.append((topic, key, value))
        return SimpleNamespace(get=lambda timeout: None)

    def read(self, topic: str) -> list:
        return [SimpleNamespace(key=k, value=v) for t, k, v in self.records if t == topic]

    def follow(self, topic: str):
        """Like notify's TopicReader: each call gives the topic's records written since the last."""
        seen = 0

        def new() -> list:
            nonlocal seen
            records = self.read(topic)
            seen, fresh = len(records), records[seen:]
            return fresh

        return new

    async def send_async(self, topic, key, value):  # the gateway's send: acknowledged at once
        self.send(topic, key, value)


def alert_record(offset: int, alert_id: str, lead: str, published: str, kind: str = "lead.stalled"):
    value = {
        "schema_version": 1, "alert_id": alert_id, "type": kind, "lead_id": lead, "rep_id": "rep-7",
        "team_id": None, "pipeline": None, "stage": "qualified", "idle_since": "2026-01-01T00:00:00.000Z",
        "idle_seconds": 6 * 86400.0, "threshold_seconds": 5 * 86400.0, "rule": "stage_threshold",
        "detected_at": published, "account_id": None, "deal_value": None,
    }  # fmt: skip
    return SimpleNamespace(topic="alerts", partition=0, offset=offset, key=b"rep-7", value=orjson.dumps(value),
                           timestamp=int(utc(published).timestamp() * 1000))  # fmt: skip


def deal_record(offset: int, alert_id: str, lead: str, published: str, **fields):
    value = {
        "schema_version": 2, "alert_id": alert_id, "type": "deal.close_date_slipped", "lead_id": lead,
        "rep_id": "rep-7", "team_id": None, "pipeline": None, "account_id": None, "stage": "proposal",
        "detected_at": published, "amount": 8000.0, "close_date": "2026-02-27T00:00:00.000Z",
        "previous_close_date": "2026-01-30T00:00:00.000Z", "push_count": 3, "previous_amount": None,
        "decrease_ratio": None, "from_stage": None, "to_stage": None, "health": None, "health_band": None,
        "previous_health_band": None, **fields,
    }  # fmt: skip
    return SimpleNamespace(topic="alerts", partition=0, offset=offset, key=b"rep-7", value=orjson.dumps(value),
                           timestamp=int(utc(published).timestamp() * 1000))  # fmt: skip


class Clock:
    def __init__(self, start: str):
        self.at = utc(start)

    def __call__(self) -> datetime:
        return self.at

    def set(self, text: str) -> None:
        self.at = utc(text)


@pytest.fixture
def setup(tmp_path):
    (tmp_path / "reps.toml").write_text(DIRECTORY)

    def make(clock: Clock, producer: Producer | None = None, snoozes: bool = False, **settings):
        producer = producer or Producer()
        settings = Settings(broker="kafka://127.0.0.1:1", app_id="t", rep_directory=tmp_path / "reps.toml",
                            notify_channels=frozenset({"email"}), **settings)  # fmt: skip
        email, teams = Recorder("email", True), Recorder("teams", False)
        registry = CollectorRegistry()
        sent = SentSet("t-notify-sent", producer, producer.read("t-notify-sent"))
        held_snoozes = Snoozes(producer.follow("t-notify-snoozes")) if snoozes else None
        notifier = Notifier(settings, [email, teams], DirectoryFile(tmp_path / "reps.toml"), producer, sent,
                            NotifyMetrics(registry), 1, 0, held_snoozes, clock)  # fmt: skip
        return SimpleNamespace(notifier=notifier, email=email, teams=teams, producer=producer, registry=registry,
                               snoozes=held_snoozes, settings=settings)  # fmt: skip

    return make


def count(registry, channel: str, outcome: str) -> float | None:
    return registry.get_sample_value("crm_notifications_total", {"channel": channel, "outcome": outcome})


A1_TEXT = "Lead L1 stalled in stage qualified: idle 6.0d, threshold 5.0d, rep Ana Lima"
A2_TEXT = "Lead L2 stalled in stage qualified: idle 6.0d, threshold 5.0d, rep Ana Lima"


def test_quiet_hours_hold_a_group_until_the_reps_morning_then_post_it_once(setup):
    clock = Clock("2026-01-06T16:25:00Z")  # 17:25 in Berlin; Ana works until 17:30
    run = setup(clock, notify_group_seconds=600, notify_quiet_hours=True)
    a1 = alert_record(0, "a1", "L1", "2026-01-06T16:25:00Z")
    a2 = alert_record(1, "a2", "L2", "2026-01-06T16:28:00Z")
    assert [run.notifier.handle(a1), run.notifier.handle(a2)] == ["held", "held"]
    # Read again (a rebalance, or the worker publishing it twice): held once.
    assert run.notifier.handle(a1) == "duplicate"
    # Teams posts each alert once, to a shared channel, and is not held.
    assert [headline for _, headline, _ in run.teams.sent] == ["Lead L1 stalled in stage qualified",
                                                               "Lead L2 stalled in stage qualified"]  # fmt: skip
    assert run.registry.get_sample_value("crm_notifications_held") == 2

    # The group was due at 16:35 UTC, after Ana's day: it waits for 09:00 in Berlin, 08:00 UTC.
    for now in ("2026-01-06T16:35:00Z", "2026-01-07T07:59:59Z"):
        clock.set(now)
        assert run.notifier.release() == []
    assert run.email.sent == []
    clock.set("2026-01-07T08:00:00Z")
    released = run.notifier.release()
    assert [(item.alert.alert_id, outcome) for item, outcome in released] == [("a1", "posted"), ("a2", "posted")]
    assert run.email.sent == [("ana@example.com", "2 lead alerts for Ana Lima", f"{A1_TEXT}\n{A2_TEXT}")]
    assert run.notifier.release() == []
    assert count(run.registry, "email", "delivered") == 2
    assert run.registry.get_sample_value("crm_notifications_held") == 0
    # One record for the message, naming both deliveries: on record together or not at all.
    sent = [(k, orjson.loads(v)) for t, k, v in run.producer.records if t == "t-notify-sent"]
    keys = ["a1|email|rep:rep-7", "a2|email|rep:rep-7"]
    assert [(k.decode(), v["keys"]) for k, v in sent if "keys" in v] == [
        (hashlib.sha256("\n".join(keys).encode()).hexdigest(), keys)
    ]


def test_a_restarted_notifier_holds_again_what_it_held_and_posts_nothing_twice(setup):
    clock = Clock("2026-01-06T20:00:00Z")  # 21:00 in Berlin
    producer = Producer()
    first = setup(clock, producer, notify_quiet_hours=True)
    records = [alert_record(0, "a1", "L1", "2026-01-06T20:00:00Z"), alert_record(1, "a2", "L2", "2026-01-06T20:01:00Z")]
    assert [first.notifier.handle(r) for r in records] == ["held", "held"]
    # Killed here: nothing was committed, so the restarted notifier reads both records again.
    clock.set("2026-01-07T08:00:05Z")
    second = setup(clock, producer, notify_quiet_hours=True)
    assert [second.notifier.handle(r) for r in records] == ["held", "held"]
    assert [outcome for _, outcome in second.notifier.release()] == ["posted", "posted"]
    assert second.email.sent == [("ana@example.com", "2 lead alerts for Ana Lima", f"{A1_TEXT}\n{A2_TEXT}")]
    # Killed again before committing: a third reads them again, finds both sent, and posts nothing.
    third = setup(clock, producer, notify_quiet_hours=True)
    assert [third.notifier.handle(r) for r in records] == ["duplicate", "duplicate"]
    assert third.email.sent == [] and third.notifier.held == {}


def test_a_partition_taken_away_takes_its_held_alerts_with_it(setup):
    clock = Clock("2026-01-06T20:00:00Z")
    run = setup(clock, notify_quiet_hours=True)
    on_0 = alert_record(0, "a1", "L1", "2026-01-06T20:00:00Z")
    on_1 = alert_record(0, "a2", "L2", "2026-01-06T20:00:00Z")
    on_1.partition = 1
    assert [run.notifier.handle(on_0), run.notifier.handle(on_1)] == ["held", "held"]
    run.notifier.forget({TopicPartition("alerts", 1)})
    assert run.registry.get_sample_value("crm_notifications_held") == 1
    clock.set("2026-01-07T08:00:00Z")
    assert [(item.alert.alert_id, outcome) for item, outcome in run.notifier.release()] == [("a2", "posted")]
    assert run.email.sent == [("ana@example.com", "Lead L2 stalled in stage qualified", A2_TEXT.split(": ", 1)[1])]


def test_a_digest_goes_out_at_the_start_of_the_next_working_day(setup):
    clock = Clock("2026-01-06T10:00:00Z")  # 11:00 in Berlin: working, but this day's digest has gone
    run = setup(clock, notify_digest=True)
    records = [
        alert_record(0, "a1", "L1", "2026-01-06T10:00:00Z"),
        alert_record(1, "a2", "L1", "2026-01-06T12:00:00Z", kind="lead.stall_escalated"),
    ]
    assert [run.notifier.handle(r) for r in records] == ["held", "held"]
    clock.set("2026-01-07T07:59:59Z")
    assert run.notifier.release() == []
    clock.set("2026-01-07T08:00:00Z")
    assert [outcome for _, outcome in run.notifier.release()] == ["posted", "posted"]
    escalated = "Lead L1 still stalled in stage qualified (escalated): idle 6.0d, threshold 5.0d, rep Ana Lima"
    # Ana gets both in one message; Bo, her manager, the escalation alone, as a single alert's message.
    assert run.email.sent == [
        ("ana@example.com", "2 lead alerts for Ana Lima", f"{A1_TEXT}\n{escalated}, manager Bo Chen"),
        ("bo@example.com", "Lead L1 still stalled in stage qualified (escalated)",
         "idle 6.0d, threshold 5.0d, rep Ana Lima, manager Bo Chen"),
    ]  # fmt: skip


D1_TEXT = ("Deal D1: close date pushed from 2026-01-30 to 2026-02-27 (3 pushes): stage proposal, amount 8,000.00, "
           "rep Ana Lima")


def test_a_deal_alert_is_held_and_grouped_with_the_reps_stall_alerts_and_a_snoozed_deal_is_not_posted(setup):
    clock = Clock("2026-01-06T20:00:00Z")  # 21:00 in Berlin: after Ana's day
    producer = Producer()
    run = setup(clock, producer, snoozes=True, notify_quiet_hours=True, notify_link_secret="link-secret",
                notify_link_base_url="https://crm-pulse.example.com")  # fmt: skip
    records = [alert_record(0, "a1", "L1", "2026-01-06T20:00:00Z"), deal_record(1, "d1", "D1", "2026-01-06T20:01:00Z"),
               deal_record(2, "d2", "D2", "2026-01-06T20:02:00Z", type="deal.past_due")]  # fmt: skip
    assert [run.notifier.handle(r) for r in records] == ["held", "held", "held"]
    assert [headline for _, headline, _ in run.teams.sent] == [
        "Lead L1 stalled in stage qualified", "Deal D1: close date pushed from 2026-01-30 to 2026-02-27 (3 pushes)",
        "Deal D2 is past its close date 2026-02-27 and still open",
    ]  # fmt: skip
    producer.send("t-notify-snoozes", *snooze_record("D2", "rep-7", utc("2026-01-08T00:00:00Z")))
    clock.set("2026-01-07T08:00:00Z")
    assert [(item.alert.alert_id, outcome) for item, outcome in run.notifier.release()] == [
        ("d2", "snoozed"), ("a1", "posted"), ("d1", "posted"),
    ]  # fmt: skip
    [(address, headline, facts)] = run.email.sent
    assert (address, headline) == ("ana@example.com", "2 lead alerts for Ana Lima")
    [stall_line, deal_line] = facts.split("\n")
    assert stall_line.startswith(f"{A1_TEXT} · Snooze this lead: https://crm-pulse.example.com/snooze?lead=L1&rep=rep-7&")
    assert deal_line.startswith(f"{D1_TEXT} · Snooze this lead: https://crm-pulse.example.com/snooze?lead=D1&rep=rep-7&")


def test_a_record_of_a_version_notify_does_not_read_is_invalid_and_posted_nowhere(setup):
    run = setup(Clock("2026-01-06T10:00:00Z"))
    record = deal_record(0, "d9", "D9", "2026-01-06T10:00:00Z", schema_version=3)
    assert run.notifier.handle(record) == "invalid"
    assert run.email.sent == run.teams.sent == []


def test_offsets_stop_at_the_first_held_alert():
    offsets, partition = Offsets(), TopicPartition("alerts", 0)
    records = [SimpleNamespace(topic="alerts", partition=0, offset=n) for n in range(4)]
    for record, held in zip(records, (False, True, False, True)):
        offsets.read(record, held)
    assert offsets.to_commit() == {partition: 1}
    offsets.committed.update(offsets.to_commit())
    assert offsets.to_commit() == {}
    offsets.released(records[1])
    assert offsets.to_commit() == {partition: 3}
    offsets.committed.update(offsets.to_commit())
    offsets.released(records[3])
    assert offsets.to_commit() == {partition: 4}
    offsets.forget(set())
    assert offsets.to_commit() == {}


SECRET = b"link-secret"


def expected_signature(lead: str, rep: str, expires: int) -> str:
    return hmac.new(SECRET, f"{lead}\n{rep}\n{expires}".encode(), hashlib.sha256).hexdigest()


def test_snooze_links_are_signed_and_checked():
    link = snooze_link("https://crm-pulse.example.com/", SECRET, "L 1", "rep-7", 1767787200)
    parsed = urlparse(link)
    assert (parsed.scheme, parsed.netloc, parsed.path) == ("https", "crm-pulse.example.com", "/snooze")
    assert parse_qs(parsed.query) == {"lead": ["L 1"], "rep": ["rep-7"], "expires": ["1767787200"],
                                      "signature": [expected_signature("L 1", "rep-7", 1767787200)]}  # fmt: skip
    assert check_link(SECRET, parsed.query, utc("2026-01-07T11:59:59Z")) == ("L 1", "rep-7")
    refusals = [
        (parsed.query, "2026-01-07T12:00:00Z", SECRET),
        (parsed.query.replace("L+1", "L+2"), "2026-01-07T00:00:00Z", SECRET),
        (parsed.query, "2026-01-07T00:00:00Z", b"another-secret"),
        ("lead=L1&rep=rep-7", "2026-01-07T00:00:00Z", SECRET),
    ]
    refused = []
    for query, now, secret in refusals:
        with pytest.raises(LinkRefused) as raised:
            check_link(secret, query, utc(now))
        refused.append((raised.value.status, raised.value.outcome, str(raised.value)))
    assert refused == [
        (410, "expired", "the link expired at 2026-01-07T12:00:00+00:00; use the one in a newer alert"),
        (403, "bad_signature", "the link's signature is not valid"),
        (403, "bad_signature", "the link's signature is not valid"),
        (400, "incomplete", "the link is incomplete: it needs lead, rep, expires and signature"),
    ]


def fetch(url: str, method: str = "GET") -> tuple[int, str]:
    try:
        with urllib.request.urlopen(urllib.request.Request(url, method=method, data=b"" if method == "POST" else None),
                                    timeout=5) as response:  # fmt: skip
            return response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def link_metric(outcome: str) -> float:
    return REGISTRY.get_sample_value("crm_gateway_snooze_links_total", {"outcome": outcome}) or 0.0


def test_a_snooze_link_served_by_the_gateway_suppresses_the_leads_alerts_until_the_snooze_ends(setup):
    """The notifier signs the link; the gateway serves it and publishes the snooze; the notifier, following the
    snoozes topic, holds the lead's next alerts back. Only the topic connects the two."""
    clock = Clock("2026-01-06T10:00:00Z")
    producer = Producer()
    gateway_settings = Settings(broker="kafka://127.0.0.1:1", app_id="t", notify_link_secret="link-secret",
                                notify_link_base_url="http://unused", notify_snooze_seconds=86400)  # fmt: skip
    gateway = Gateway(gateway_settings, producer.send_async, None, now=clock)
    with Served(app_server(gateway.app())) as served:
        run = setup(clock, producer, snoozes=True, notify_link_secret="link-secret", notify_snooze_seconds=86400,
                    notify_link_base_url=f"http://127.0.0.1:{served.port}")  # fmt: skip
        # The message carries a link for its lead, valid for 7 days.
        assert run.notifier.handle(alert_record(0, "a1", "L1", "2026-01-06T10:00:00Z")) == "posted"
        link = run.email.messages[0].snooze
        assert run.teams.messages[0].snooze == link
        expires = int(utc("2026-01-13T10:00:00Z").timestamp())
        assert link == (f"http://127.0.0.1:{served.port}/snooze?lead=L1&rep=rep-7&expires={expires}"
                        f"&signature={expected_signature('L1', 'rep-7', expires)}")  # fmt: skip

        # Opening it asks to confirm and changes nothing; a forged one is refused with one line.
        status, body = fetch(link)
        assert status == 200 and "Snooze lead L1 until 2026-01-07 10:00 UTC" in body
        bad_signatures = link_metric("bad_signature")
        assert fetch(link.replace("rep-7", "rep-8"), "POST") == (403, "the link's signature is not valid\n")
        assert link_metric("bad_signature") == bad_signatures + 1
        assert producer.read("t-notify-snoozes") == []
        assert run.notifier.handle(alert_record(1, "a2", "L1", "2026-01-06T10:05:00Z")) == "posted"

        # Confirmed: published to the compacted topic, and L1's alerts suppressed for a day; L2's still posted.
        status, body = fetch(link, "POST")
        assert status == 200 and "No alerts about lead L1 until 2026-01-07 10:00 UTC" in body
        [record] = producer.read("t-notify-snoozes")
        assert (record.key, orjson.loads(record.value)) == (b"L1", {"lead_id": "L1", "rep_id": "rep-7",
                                                                    "until": "2026-01-07T10:00:00+00:00"})  # fmt: skip
        assert run.notifier.handle(alert_record(2, "a3", "L1", "2026-01-06T11:00:00Z")) == "snoozed"
        assert run.notifier.handle(alert_record(3, "a4", "L2", "2026-01-06T11:00:00Z")) == "posted"
        assert (count(run.registry, "email", "snoozed"), count(run.registry, "teams", "snoozed")) == (1, 1)
        # A notifier started later reads the snooze back; once it ends, L1's alerts go out again.
        restarted = Snoozes(producer.follow("t-notify-snoozes"))
        assert restarted.snoozed("L1", utc("2026-01-07T09:59:59Z")) is True
        assert restarted.snoozed("L1", utc("2026-01-07T10:00:00Z")) is False
        clock.set("2026-01-07T10:00:00Z")
        assert run.notifier.handle(alert_record(4, "a5", "L1", "2026-01-07T10:00:00Z")) == "posted"
        # Expired: refused with its own status, nothing written.
        clock.set("2026-01-13T10:00:00Z")
        assert fetch(link, "POST") == (410, "the link expired at 2026-01-13T10:00:00+00:00; use the one in a newer "
                                            "alert\n")  # fmt: skip
        assert fetch(link.split("&signature=")[0], "POST") == (400, "the link is incomplete: it needs lead, rep, "
                                                                     "expires and signature\n")  # fmt: skip
        assert len(producer.read("t-notify-snoozes")) == 1


def test_a_held_alert_whose_lead_is_snoozed_by_its_release_is_not_posted(setup):
    """An alert held for the rep's morning is dropped if its lead is snoozed by then."""
    clock = Clock("2026-01-06T20:00:00Z")  # 21:00 in Berlin
    producer = Producer()
    run = setup(clock, producer, snoozes=True, notify_quiet_hours=True, notify_link_secret="link-secret",
                notify_link_base_url="https://crm-pulse.example.com")  # fmt: skip
    assert run.notifier.handle(alert_record(0, "a1", "L1", "2026-01-06T20:00:00Z")) == "held"
    producer.send("t-notify-snoozes", *snooze_record("L1", "rep-7", utc("2026-01-08T00:00:00Z")))
    clock.set("2026-01-07T08:00:00Z")
    assert [(item.alert.alert_id, outcome) for item, outcome in run.notifier.release()] == [("a1", "snoozed")]
    assert run.email.sent == [] and count(run.registry, "email", "snoozed") == 1


def test_the_gateway_answers_503_when_the_broker_does_not_save_the_snooze():
    async def down(topic, key, value):
        raise ConnectionError("broker down")

    settings = Settings(broker="kafka://127.0.0.1:1", app_id="t", notify_link_secret="link-secret",
                        notify_link_base_url="http://unused")  # fmt: skip
    clock = Clock("2026-01-06T10:00:00Z")
    with Served(app_server(Gateway(settings, down, None, now=clock).app())) as served:
        link = snooze_link(f"http://127.0.0.1:{served.port}", SECRET, "L1", "rep-7", int(clock().timestamp()) + 60)
        assert fetch(link, "POST") == (503, "the snooze could not be saved now; open the link again in a minute\n")


def test_without_a_link_secret_the_gateway_serves_no_snooze_links():
    async def never(topic, key, value):
        raise AssertionError("nothing to publish")

    with Served(app_server(Gateway(Settings(broker="kafka://127.0.0.1:1"), never, None).app())) as served:
        assert fetch(f"http://127.0.0.1:{served.port}/snooze?lead=L1", "POST")[0] == 404
