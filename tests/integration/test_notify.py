"""`crm-pulse alerts notify` routing alerts to reps, end to end with real servers: alerts produced onto a
topic of the real embedded broker, a real SMTP server (aiosmtpd, STARTTLS and AUTH) receiving the e-mails, and
local HTTP servers standing in for Slack's Web API, a Teams webhook and a signed webhook."""

from __future__ import annotations

import hashlib
import hmac
import itertools
import os
import signal
import ssl
import subprocess
import sys
import time
import urllib.request
from email import message_from_bytes
from datetime import datetime
from email.policy import default as email_policy
from pathlib import Path
from urllib.parse import parse_qs, urlparse

import orjson
import pytest
from aiosmtpd.controller import Controller
from aiosmtpd.smtp import AuthResult
from kafka import KafkaAdminClient, KafkaConsumer, KafkaProducer, TopicPartition
from kafka.admin import NewTopic
from prometheus_client.parser import text_string_to_metric_families

from crm_pulse.broker import free_port
from crm_pulse.config import Settings
from crm_pulse.gateway import StageMap, serve
from tests.gateway_server import Served
from tests.integration.conftest import BROKER_KIND
from tests.integration.test_alert_consumers import webhook  # noqa: F401  (a fixture)
from tests.integration.test_kafka_security import _certificate, _key_pem, _pem

pytestmark = pytest.mark.integration

_names = itertools.count(1)
DIRECTORY = """
[reps.rep-7]
name = "Ana Lima"
email = "ana@example.com"
slack = "U07"
manager = "rep-1"
team = "team-emea"
team_channel = "C-EMEA"

[reps.rep-1]
name = "Bo Chen"
email = "bo@example.com"
slack = "U01"

[reps.rep-9]
name = "Cy Gone"
slack = "U-GONE"
"""


class Mailbox:
    """A real SMTP server on loopback that requires STARTTLS (a certificate from a throwaway CA) and AUTH as
    notifier/s3cret; it answers 451 for the addresses in `refuse`."""

    def __init__(self, tmp_path: Path):
        ca = _certificate("test-ca", ca=True)
        certificate, key = _certificate("smtp", ca, ip="127.0.0.1")
        self.cafile = tmp_path / "smtp-ca.pem"
        self.cafile.write_bytes(_pem(ca[0]))
        (tmp_path / "smtp.pem").write_bytes(_pem(certificate))
        (tmp_path / "smtp.key").write_bytes(_key_pem(key))
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(tmp_path / "smtp.pem", tmp_path / "smtp.key")
        self.messages: list[tuple[list[str], object]] = []
        self.refuse: set[str] = set()
        self.refusals = 0
        self.controller = Controller(
            self, hostname="127.0.0.1", port=free_port(), tls_context=context, require_starttls=True,
            authenticator=self.authenticate, auth_require_tls=True,
        )  # fmt: skip
        self.controller.start()

    @staticmethod
    def authenticate(server, session, envelope, mechanism, auth_data) -> AuthResult:
        return AuthResult(success=(auth_data.login, auth_data.password) == (b"notifier", b"s3cret"))

    async def handle_RCPT(self, server, session, envelope, address, rcpt_options):
        if address in self.refuse:
            self.refusals += 1
            return "451 4.3.0 mailbox busy, try later"
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_DATA(self, server, session, envelope):
        assert session.authenticated and session.ssl  # the notifier logged in, over TLS
        self.messages.append((envelope.rcpt_tos, message_from_bytes(envelope.content, policy=email_policy)))
        return "250 Message accepted"

    def received(self) -> list[tuple[str, str]]:
        """(recipient, subject) of each e-mail, in order."""
        return [(rcpt_tos[0], message["Subject"]) for rcpt_tos, message in self.messages]


@pytest.fixture
def mailbox(tmp_path):
    box = Mailbox(tmp_path)
    yield box
    box.controller.stop()


def alert(alert_id: str, kind: str, lead: str, rep: str, **fields) -> dict:
    return {
        "schema_version": 1, "alert_id": alert_id, "type": kind, "lead_id": lead, "rep_id": rep,
        "team_id": "team-emea", "pipeline": None, "stage": "qualified", "idle_since": "2026-01-01T00:00:00.000Z",
        "idle_seconds": 5 * 86400.0 if kind == "lead.stalled" else 10 * 86400.0, "threshold_seconds": 5 * 86400.0,
        "rule": "stage_threshold", "detected_at": "2026-01-06T00:00:00.000Z", "account_id": None,
        "deal_value": None, **fields,
    }  # fmt: skip


A1 = alert("a1", "lead.stalled", "L1", "rep-7", account_id="acct-acme", deal_value=12500.0)
A2 = alert("a2", "lead.stall_escalated", "L1", "rep-7", account_id="acct-acme", deal_value=12500.0)
A3 = alert("a3", "lead.stalled", "L5", "unassigned")
A4 = alert("a4", "lead.stalled", "L9", "rep-9")


def notifier_env(broker, tmp_path: Path, mailbox: Mailbox, slack_api: str, **settings: str) -> dict:
    """The settings of a notifier with its own alerts topic (created here, holding nothing yet) and app id."""
    n = next(_names)
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("CRM_PULSE_")},
        "CRM_PULSE_BROKER": broker.url,
        "CRM_PULSE_APP_ID": f"nt-{n}-{os.getpid()}",
        "CRM_PULSE_ALERTS_TOPIC": f"nt-{n}-{os.getpid()}-alerts",
        "CRM_PULSE_PARTITIONS": "1",
        "CRM_PULSE_LOG_LEVEL": "info",
        "CRM_PULSE_NOTIFY_METRICS_PORT": str(free_port()),
        "CRM_PULSE_REP_DIRECTORY": str(tmp_path / "reps.toml"),
        "CRM_PULSE_SLACK_BOT_TOKEN": "xoxb-test",
        "CRM_PULSE_SLACK_API_URL": slack_api,
        "CRM_PULSE_SMTP_HOST": "127.0.0.1",
        "CRM_PULSE_SMTP_PORT": str(mailbox.controller.port),
        "CRM_PULSE_SMTP_USERNAME": "notifier",
        "CRM_PULSE_SMTP_PASSWORD": "s3cret",
        "CRM_PULSE_SMTP_FROM": "crm-pulse@example.com",
        "CRM_PULSE_SMTP_CAFILE": str(mailbox.cafile),
        "CRM_PULSE_CRM_RECORD_URL": "https://crm.example.com/leads/{lead_id}",
        **settings,
    }
    (tmp_path / "reps.toml").write_text(DIRECTORY)
    admin = KafkaAdminClient(bootstrap_servers=broker.url.removeprefix("kafka://"))
    # Kept for good: some tests publish alerts stamped in January 2026, which Apache Kafka's default time
    # retention (7 days) deleted mid-test once its periodic check came round.
    admin.create_topics([NewTopic(env["CRM_PULSE_ALERTS_TOPIC"], 1, 1, topic_configs={"retention.ms": "-1"})])
    admin.close()
    return env


def publish(env: dict, *alerts: dict) -> None:
    producer = KafkaProducer(bootstrap_servers=env["CRM_PULSE_BROKER"].removeprefix("kafka://"))
    for value in alerts:
        producer.send(env["CRM_PULSE_ALERTS_TOPIC"], key=value["rep_id"].encode(), value=orjson.dumps(value))
    producer.flush()
    producer.close()


def notify_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "crm_pulse.cli", "alerts", "notify", "--from-beginning", *args]


def metrics(env: dict) -> dict[tuple, float]:
    url = f"http://127.0.0.1:{env['CRM_PULSE_NOTIFY_METRICS_PORT']}/metrics"
    with urllib.request.urlopen(url, timeout=5) as response:
        text = response.read().decode()
    return {(sample.name, tuple(sorted(sample.labels.items()))): sample.value
            for family in text_string_to_metric_families(text) for sample in family.samples}  # fmt: skip


def wait_until(predicate, what: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.2)


def slack_answer(body: dict) -> bytes:
    """Slack's Web API: HTTP 200 whether or not it posted; a user that left is channel_not_found."""
    if body["channel"] == "U-GONE":
        return orjson.dumps({"ok": False, "error": "channel_not_found"})
    return orjson.dumps({"ok": True, "channel": body["channel"], "ts": "1.0"})


def posted(hook) -> list[tuple[str, str]]:
    """(channel, fallback text) of each successful chat.postMessage."""
    return [(body["channel"], body["text"]) for status, body in hook.requests if status == 200]


L1_FACTS = "idle 5.0d, threshold 5.0d, rep Ana Lima, deal value 12,500.00"
L1_STALLED = f"Lead L1 (account acct-acme) stalled in stage qualified: {L1_FACTS}"
L1_ESCALATED = (
    "Lead L1 (account acct-acme) still stalled in stage qualified (escalated): "
    "idle 10.0d, threshold 5.0d, rep Ana Lima, manager Bo Chen, deal value 12,500.00"
)
L5_STALLED = "Lead L5 stalled in stage qualified: idle 5.0d, threshold 5.0d, rep unassigned, team team-emea"
L9_STALLED = "Lead L9 stalled in stage qualified: idle 5.0d, threshold 5.0d, rep Cy Gone"


def test_notify_routes_each_alert_to_its_recipients_on_every_channel(broker, tmp_path, mailbox, webhook):
    slack = webhook(429, answer=slack_answer)
    teams, signed = webhook(), webhook()
    env = notifier_env(
        broker, tmp_path, mailbox, slack.url,
        CRM_PULSE_NOTIFY_CHANNELS='["slack", "email", "teams", "webhook"]',
        CRM_PULSE_TEAMS_WEBHOOK_URL=teams.url, CRM_PULSE_SIGNED_WEBHOOK_URL=signed.url,
        CRM_PULSE_SIGNED_WEBHOOK_SECRET="whsec-1",
    )  # fmt: skip
    publish(env, A1, A2, A3, A4)

    process = subprocess.Popen(notify_command("--max-idle", "4"), env=env, stderr=subprocess.PIPE, text=True)
    try:
        wait_until(lambda: len(signed.requests) == 4, "the signed webhook to get four alerts")
        wait_until(lambda: metrics(env).get(("crm_notifications_total", (("channel", "webhook"), ("outcome", "delivered")))) == 4,
                   "the metrics of the last delivery")  # fmt: skip
        scraped = metrics(env)
    finally:
        _, stderr = process.communicate(timeout=60)

    # Ana's alerts reach her; the escalation Bo too; the unassigned lead the team channel; Cy left Slack.
    assert [status for status, _ in slack.requests][0] == 429  # retried after Retry-After: 1
    assert posted(slack) == [("U07", L1_STALLED), ("U07", L1_ESCALATED), ("U01", L1_ESCALATED),
                             ("C-EMEA", L5_STALLED), ("U-GONE", L9_STALLED)]  # fmt: skip
    assert {headers["Authorization"] for headers, _ in slack.raw} == {"Bearer xoxb-test"}
    assert slack.requests[1][1]["blocks"][0]["text"]["text"] == (
        f"*Lead L1 (account acct-acme) stalled in stage qualified*\n{L1_FACTS}\n"
        "<https://crm.example.com/leads/L1|Open in the CRM>"
    )
    assert mailbox.received() == [
        ("ana@example.com", "Lead L1 (account acct-acme) stalled in stage qualified"),
        ("ana@example.com", "Lead L1 (account acct-acme) still stalled in stage qualified (escalated)"),
        ("bo@example.com", "Lead L1 (account acct-acme) still stalled in stage qualified (escalated)"),
    ]
    first_mail = mailbox.messages[0][1]
    assert first_mail["From"] == "crm-pulse@example.com"
    assert first_mail.get_content().splitlines() == [  # lines end in CRLF on the wire
        L1_FACTS, "", "https://crm.example.com/leads/L1", "",
        "lead.stalled · detected 2026-01-06T00:00:00.000Z · rule stage_threshold · alert a1",
    ]  # fmt: skip
    # One Teams card and one signed post per alert.
    assert [body["attachments"][0]["content"]["body"][0]["text"] for _, body in teams.requests] == [
        "Lead L1 (account acct-acme) stalled in stage qualified",
        "Lead L1 (account acct-acme) still stalled in stage qualified (escalated)",
        "Lead L5 stalled in stage qualified", "Lead L9 stalled in stage qualified",
    ]  # fmt: skip
    assert teams.requests[0][1]["attachments"][0]["content"]["actions"] == [
        {"type": "Action.OpenUrl", "title": "Open in the CRM", "url": "https://crm.example.com/leads/L1"}
    ]
    for (headers, raw), sent in zip(signed.raw, (A1, A2, A3, A4)):
        timestamp = headers["X-CRM-Pulse-Timestamp"]
        expected = hmac.new(b"whsec-1", f"{timestamp}.".encode() + raw, hashlib.sha256).hexdigest()
        assert headers["X-CRM-Pulse-Signature"] == f"sha256={expected}"
        assert abs(int(timestamp) - time.time()) < 120
        assert orjson.loads(raw)["alert"] == sent
    assert orjson.loads(signed.raw[0][1])["link"] == "https://crm.example.com/leads/L1"

    # Cy's Slack delivery is a dead letter with the reason; the run reports one failed alert.
    [letter] = read_all(env, f"{env['CRM_PULSE_APP_ID']}-notify-dlq")
    letter = orjson.loads(letter.value)
    assert {k: letter[k] for k in ("schema_version", "alert_id", "channel", "recipient", "reason", "alert")} == {
        "schema_version": 1, "alert_id": "a4", "channel": "slack", "recipient": "rep:rep-9",
        "reason": "Slack error channel_not_found", "alert": A4,
    }  # fmt: skip
    assert "notify stopped: posted=3 failed=1 duplicate=0 invalid=0" in stderr
    assert process.returncode == 1

    counted = {dict(labels)["channel"] + "/" + dict(labels)["outcome"]: value
               for (name, labels), value in scraped.items() if name == "crm_notifications_total"}  # fmt: skip
    assert counted == {"slack/delivered": 4, "slack/dead_lettered": 1, "email/delivered": 3, "teams/delivered": 4,
                       "webhook/delivered": 4}  # fmt: skip
    delays = {dict(labels)["channel"]: value for (name, labels), value in scraped.items()
              if name == "crm_notification_delay_seconds_count"}  # fmt: skip
    assert delays == {"email": 3, "slack": 4, "teams": 4, "webhook": 4}
    # Only channel, outcome and bucket bounds as labels: no rep, no name.
    assert {key for (name, labels), _ in scraped.items() if name.startswith("crm_notification")
            for key, _ in labels} == {"channel", "outcome", "le"}  # fmt: skip


DEAL = {
    "schema_version": 2, "alert_id": "d1", "type": "deal.close_date_slipped", "lead_id": "D1", "rep_id": "rep-7",
    "team_id": "team-emea", "pipeline": None, "account_id": "acct-acme", "stage": "proposal",
    "detected_at": "2026-01-06T00:00:00.000Z", "amount": 12500.0, "close_date": "2026-02-27T00:00:00.000Z",
    "previous_close_date": "2026-01-30T00:00:00.000Z", "push_count": 2, "previous_amount": None,
    "decrease_ratio": None, "from_stage": None, "to_stage": None, "health": None, "health_band": None,
    "previous_health_band": None,
}  # fmt: skip
CUT = {**DEAL, "alert_id": "d2", "type": "deal.amount_decreased", "lead_id": "D2", "rep_id": "unassigned",
       "account_id": None, "amount": 7000.0, "close_date": None, "previous_close_date": None, "push_count": None,
       "previous_amount": 10000.0, "decrease_ratio": 0.3}  # fmt: skip
DEAL_SUBJECT = "Deal D1 (account acct-acme): close date pushed from 2026-01-30 to 2026-02-27 (2 pushes)"


def test_notify_routes_deal_alerts_to_the_rep_with_what_happened(broker, tmp_path, mailbox, webhook):
    slack = webhook(answer=slack_answer)
    env = notifier_env(broker, tmp_path, mailbox, slack.url, CRM_PULSE_NOTIFY_CHANNELS='["slack", "email"]')
    publish(env, DEAL, CUT, {**DEAL, "alert_id": "d3", "schema_version": 3})
    process = subprocess.Popen(notify_command("--max-idle", "4"), env=env, stderr=subprocess.PIPE, text=True)
    _, stderr = process.communicate(timeout=90)

    assert posted(slack) == [
        ("U07", f"{DEAL_SUBJECT}: stage proposal, amount 12,500.00, rep Ana Lima"),
        ("C-EMEA", "Deal D2: amount cut by 30% from 10,000.00 to 7,000.00: stage proposal, rep unassigned, "
                   "team team-emea"),
    ]  # fmt: skip
    assert mailbox.received() == [("ana@example.com", DEAL_SUBJECT)]
    assert mailbox.messages[0][1].get_content().splitlines() == [
        "stage proposal, amount 12,500.00, rep Ana Lima", "", "https://crm.example.com/leads/D1", "",
        "deal.close_date_slipped · detected 2026-01-06T00:00:00.000Z · alert d1",
    ]  # fmt: skip
    assert "unsupported schema_version 3; this consumer reads versions 1 and 2" in stderr
    assert "notify stopped: posted=2 failed=0 duplicate=0 invalid=1" in stderr
    assert process.returncode == 0


def read_all(env: dict, topic: str) -> list:
    consumer = KafkaConsumer(bootstrap_servers=env["CRM_PULSE_BROKER"].removeprefix("kafka://"))
    partitions = [TopicPartition(topic, p) for p in consumer.partitions_for_topic(topic) or ()]
    consumer.assign(partitions)
    consumer.seek_to_beginning()
    end = consumer.end_offsets(partitions)
    records = []
    while any(consumer.position(tp) < end[tp] for tp in partitions):
        for batch in consumer.poll(timeout_ms=500).values():
            records.extend(batch)
    consumer.close()
    return records


def test_a_notifier_killed_mid_delivery_loses_nothing_and_posts_nothing_twice(broker, tmp_path, mailbox, webhook):
    slack = webhook(answer=slack_answer)
    env = notifier_env(broker, tmp_path, mailbox, slack.url, CRM_PULSE_NOTIFY_CHANNELS='["email", "slack"]')
    publish(env, A1, A2)
    mailbox.refuse.add("bo@example.com")

    # A2 goes out by e-mail to Ana, then to Bo, whose server keeps answering 451: killed while retrying that.
    process = subprocess.Popen(notify_command("--max-attempts", "20"), env=env, stderr=subprocess.DEVNULL)
    try:
        wait_until(lambda: mailbox.refusals >= 1, "Bo's e-mail to be refused")
    finally:
        process.send_signal(signal.SIGKILL)
        process.wait(30)
    assert mailbox.received() == [
        ("ana@example.com", "Lead L1 (account acct-acme) stalled in stage qualified"),
        ("ana@example.com", "Lead L1 (account acct-acme) still stalled in stage qualified (escalated)"),
    ]
    assert posted(slack) == [("U07", L1_STALLED)]

    # A2's offset was never committed: the restarted notifier reads it again, and makes only what is missing.
    mailbox.refuse.clear()
    result = subprocess.run(notify_command("--max-idle", "4"), env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    assert mailbox.received() == [
        ("ana@example.com", "Lead L1 (account acct-acme) stalled in stage qualified"),
        ("ana@example.com", "Lead L1 (account acct-acme) still stalled in stage qualified (escalated)"),
        ("bo@example.com", "Lead L1 (account acct-acme) still stalled in stage qualified (escalated)"),
    ]
    assert posted(slack) == [("U07", L1_STALLED), ("U07", L1_ESCALATED), ("U01", L1_ESCALATED)]
    assert "3 deliveries already sent" in result.stderr
    assert "notify stopped: posted=1 failed=0 duplicate=0 invalid=0" in result.stderr


# A notifier whose clock is the instant in a file, so the test moves it across a rep's night.
CLOCKED_NOTIFIER = """
import logging, sys
from datetime import datetime
from pathlib import Path
from crm_pulse.config import load_settings
from crm_pulse.notify import notify
logging.basicConfig(level="INFO", format="%(message)s")
logging.getLogger("kafka").setLevel(logging.WARNING)
clock = Path(sys.argv[1])
notify(load_settings(), from_beginning=True, max_idle_seconds=float(sys.argv[2]),
       now=lambda: datetime.fromisoformat(clock.read_text()))
"""
BERLIN_ANA = """
[reps.rep-7]
name = "Ana Lima"
email = "ana@example.com"
timezone = "Europe/Berlin"
working_hours = "09:00-17:30"
"""


def test_alerts_held_overnight_survive_a_kill_and_go_out_once_in_one_message(broker, tmp_path, mailbox):
    env = notifier_env(broker, tmp_path, mailbox, "http://127.0.0.1:1", CRM_PULSE_NOTIFY_CHANNELS='["email"]',
                       CRM_PULSE_NOTIFY_QUIET_HOURS="true", CRM_PULSE_NOTIFY_GROUP_SECONDS="600")  # fmt: skip
    (tmp_path / "reps.toml").write_text(BERLIN_ANA)
    clock = tmp_path / "clock"
    clock.write_text("2026-01-06T20:05:00+00:00")  # 21:05 in Berlin
    producer = KafkaProducer(bootstrap_servers=env["CRM_PULSE_BROKER"].removeprefix("kafka://"))
    b1, b2 = alert("b1", "lead.stalled", "L1", "rep-7"), alert("b2", "lead.stalled", "L2", "rep-7")
    for value, published in ((b1, "2026-01-06T20:00:00+00:00"), (b2, "2026-01-06T20:01:00+00:00")):
        producer.send(env["CRM_PULSE_ALERTS_TOPIC"], key=b"rep-7", value=orjson.dumps(value),
                      timestamp_ms=int(datetime.fromisoformat(published).timestamp() * 1000))  # fmt: skip
    producer.flush()
    producer.close()
    def held() -> float | None:
        try:
            return metrics(env).get(("crm_notifications_held", ()))
        except OSError:  # not serving yet: it serves once it has read its compacted topics
            return None

    command = [sys.executable, "-c", CLOCKED_NOTIFIER, str(clock)]

    process = subprocess.Popen([*command, "60"], env=env, stderr=subprocess.DEVNULL)
    try:
        wait_until(lambda: held() == 2, "both alerts to be held")
    finally:
        process.send_signal(signal.SIGKILL)
        process.wait(30)
    assert mailbox.received() == []

    # Restarted, it reads both again (their offsets were not committed) and holds them till Ana's morning.
    process = subprocess.Popen([*command, "4"], env=env, stderr=subprocess.PIPE, text=True)
    try:
        wait_until(lambda: held() == 2, "both alerts to be held again")
        time.sleep(1)
        assert mailbox.received() == []
        clock.write_text("2026-01-07T08:00:00+00:00")  # 09:00 in Berlin
        wait_until(lambda: mailbox.received(), "the morning's e-mail")
    finally:
        _, stderr = process.communicate(timeout=60)
    assert mailbox.received() == [("ana@example.com", "2 lead alerts for Ana Lima")]
    assert mailbox.messages[0][1].get_content().splitlines() == [
        "Lead L1 stalled in stage qualified: idle 5.0d, threshold 5.0d, rep Ana Lima · https://crm.example.com/leads/L1",
        "Lead L2 stalled in stage qualified: idle 5.0d, threshold 5.0d, rep Ana Lima · https://crm.example.com/leads/L2",
        "", "alerts b1, b2",
    ]  # fmt: skip
    assert "notify stopped: posted=2 failed=0 duplicate=0 invalid=0 snoozed=0" in stderr
    assert process.returncode == 0

    # Both offsets are committed now: a third run reads nothing and sends nothing.
    result = subprocess.run([*command, "4"], env=env, capture_output=True, text=True, timeout=120)
    assert "notify stopped: posted=0 failed=0 duplicate=0 invalid=0 snoozed=0" in result.stderr
    assert len(mailbox.messages) == 1


def snoozed_count(env: dict) -> float | None:
    try:
        return metrics(env).get(("crm_notifications_total", (("channel", "email"), ("outcome", "snoozed"))))
    except OSError:
        return None


def test_a_snooze_link_followed_on_the_gateway_holds_back_the_leads_next_alert(broker, tmp_path, mailbox):
    """The notifier e-mails a link; the test follows it on `crm-pulse gateway` (another server, on the same
    broker); the running notifier learns of the snooze from the topic and holds L1's next alert back, and so does
    a notifier started afterwards."""
    # The link names the gateway's port, and the gateway publishes to the notifier's app's snoozes topic: the
    # gateway's settings are made once the notifier's are, before it starts.
    gateway = Served(lambda port, stop: serve(gateway_settings.model_copy(update={"gateway_port": port}), StageMap(),
                                              stop))  # fmt: skip
    env = notifier_env(broker, tmp_path, mailbox, "http://127.0.0.1:1", CRM_PULSE_NOTIFY_CHANNELS='["email"]',
                       CRM_PULSE_NOTIFY_LINK_SECRET="snooze-secret",
                       CRM_PULSE_NOTIFY_LINK_BASE_URL=f"http://127.0.0.1:{gateway.port}/")  # fmt: skip
    gateway_settings = Settings(broker=broker.url, broker_kind=BROKER_KIND, app_id=env["CRM_PULSE_APP_ID"],
                                notify_link_secret="snooze-secret", notify_link_base_url="http://unused")  # fmt: skip
    publish(env, A1)
    process = subprocess.Popen(notify_command(), env=env, stderr=subprocess.PIPE, text=True)
    try:
        wait_until(lambda: mailbox.received(), "the first e-mail")
        [link] = [line.removeprefix("Snooze this lead: ") for line in mailbox.messages[0][1].get_content().splitlines()
                  if line.startswith("Snooze this lead: ")]  # fmt: skip
        query = {name: values[0] for name, values in parse_qs(urlparse(link).query).items()}
        assert link.startswith(f"http://127.0.0.1:{gateway.port}/snooze?")
        assert (query["lead"], query["rep"]) == ("L1", "rep-7")
        assert abs(int(query["expires"]) - (time.time() + 7 * 86400)) < 120
        expected = hmac.new(b"snooze-secret", f"L1\nrep-7\n{query['expires']}".encode(), hashlib.sha256).hexdigest()
        assert query["signature"] == expected
        with gateway:
            status, page, _ = gateway.get(link.removeprefix(f"http://127.0.0.1:{gateway.port}"))
            assert status == 200 and b"Stop alerts about lead L1?" in page
            forged = link.replace(query["signature"], "0" * 64)
            assert Served.answer(urllib.request.Request(forged, data=b""))[:2] == (
                403, b"the link's signature is not valid\n")
            status, page, _ = Served.answer(urllib.request.Request(link, data=b""))
            assert status == 200 and b"No alerts about lead L1 until" in page

        # L1's escalation, published after the snooze, reaches neither Ana nor Bo; L2's alert goes out.
        publish(env, A2, alert("b2", "lead.stalled", "L2", "rep-7"))
        wait_until(lambda: len(mailbox.received()) == 2, "L2's e-mail")
        wait_until(lambda: snoozed_count(env) == 2, "the escalation to Ana and Bo to count as snoozed")
    finally:
        process.send_signal(signal.SIGINT)
        _, stderr = process.communicate(timeout=60)
    assert mailbox.received() == [("ana@example.com", "Lead L1 (account acct-acme) stalled in stage qualified"),
                                  ("ana@example.com", "Lead L2 stalled in stage qualified")]  # fmt: skip
    assert "notify stopped: posted=2 failed=0 duplicate=0 invalid=0 snoozed=1" in stderr
    [snooze] = read_all(env, f"{env['CRM_PULSE_APP_ID']}-notify-snoozes")
    until = datetime.fromisoformat(orjson.loads(snooze.value)["until"]).timestamp()
    assert snooze.key == b"L1" and abs(until - (time.time() + 3 * 86400)) < 120

    # A notifier started afterwards, the gateway gone, reads the snooze back from the topic.
    publish(env, alert("b3", "lead.stall_escalated", "L1", "rep-7", detected_at="2026-01-07T00:00:00.000Z"))
    result = subprocess.run(notify_command("--max-idle", "4"), env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "notify stopped: posted=0 failed=0 duplicate=0 invalid=0 snoozed=1" in result.stderr
    assert len(mailbox.messages) == 2
