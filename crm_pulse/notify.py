"""`crm-pulse alerts notify`: route each alert to its rep (and, escalated, their manager; unassigned, the team
channel) on the configured channels, each delivery posted once (docs/alerts.md#notify-route-alerts-to-reps).

The notifier is its own process, apart from the worker, so a slow or failing channel never slows the KPIs."""

from __future__ import annotations

import itertools
import logging
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import orjson
from kafka import KafkaProducer, TopicPartition
from kafka.admin import NewTopic
from kafka.errors import CommitFailedError, TopicAlreadyExistsError
from kafka.structs import OffsetAndMetadata
from prometheus_client import CollectorRegistry, Counter, Histogram, start_http_server

from crm_pulse.alerts import DAY_SECONDS, kafka_consumer, parse_alert, where
from crm_pulse.broker import bind_error, client_security, connect_admin
from crm_pulse.channels import MAX_DELAY_SECONDS, Channel, Message, configure_channels, deliver_with_retries
from crm_pulse.config import Settings, SettingsInvalid
from crm_pulse.directory import Directory, DirectoryFile
from crm_pulse.schemas.records import Alert, NotificationDeadLetter
from crm_pulse.streams.leads import ESCALATED

log = logging.getLogger(__name__)

HEADLINES = {
    "lead.stalled": "{lead} stalled in stage {stage}",
    "lead.stall_escalated": "{lead} still stalled in stage {stage} (escalated)",
    "lead.stall_cleared": "{lead} is moving again after stalling in stage {stage}",
}
# Alert to delivery spans a post (ms) up to the retries of a failing channel and a restart (minutes).
DELAY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 900, 3600)


def record_link(template: str | None, alert: Alert) -> str | None:
    """The CRM record's URL: CRM_PULSE_CRM_RECORD_URL with the alert's fields, e.g. {lead_id}, filled in."""
    return template.format_map(alert.model_dump()) if template else None


def check_link_template(template: str | None) -> None:
    if template is None:
        return
    try:
        template.format_map(dict.fromkeys(Alert.model_fields, ""))
    except (KeyError, IndexError, ValueError) as exc:
        fields = ", ".join(f"{{{name}}}" for name in Alert.model_fields)
        raise SettingsInvalid(
            f"CRM_PULSE_CRM_RECORD_URL={template!r} has an unknown placeholder {exc}; use the alert's fields: {fields}"
        ) from None


def compose(alert: Alert, directory: Directory | None, link_template: str | None) -> Message:
    """What a rep can act on: the lead and its account, the stage, idle time against the threshold and the rule
    that set it, the deal value, who owns it, and a link to the record."""
    reps = directory.reps if directory else {}
    owner = reps[alert.rep_id].display_name if alert.rep_id in reps else alert.rep_id
    lead = f"Lead {alert.lead_id}" + (f" (account {alert.account_id})" if alert.account_id else "")
    facts = [f"idle {alert.idle_seconds / DAY_SECONDS:.1f}d", f"threshold {alert.threshold_seconds / DAY_SECONDS:.1f}d",
             f"rep {owner}"]  # fmt: skip
    if alert.type == ESCALATED and alert.rep_id in reps and reps[alert.rep_id].manager:
        facts.append(f"manager {reps[reps[alert.rep_id].manager].display_name}")
    if alert.rep_id not in reps and alert.team_id:
        facts.append(f"team {alert.team_id}")
    if alert.deal_value is not None:
        facts.append(f"deal value {alert.deal_value:,.2f}")
    return Message(
        headline=HEADLINES[alert.type].format(lead=lead, stage=alert.stage),
        facts=", ".join(facts),
        details=f"{alert.type} · detected {alert.detected_at} · rule {alert.rule} · alert {alert.alert_id}",
        link=record_link(link_template, alert),
    )


@dataclass(frozen=True)
class Delivery:
    channel: Channel
    recipient: str  # rep:<id>, manager:<id>, team:<id>, or all (a channel that posts each alert once)
    address: str | None

    def key(self, alert_id: str) -> str:
        return f"{alert_id}|{self.channel.name}|{self.recipient}"


def route(alert: Alert, directory: Directory | None, channels: list[Channel]) -> list[Delivery]:
    """The rep, and their manager if the alert is an escalation; the team channel if the lead has no rep in the
    directory. Per-recipient channels reach those of them with an address there; the others post once."""
    reps = directory.reps if directory else {}
    recipients: list[tuple[str, str | None, str | None]] = []  # (recipient, Slack id, e-mail)
    if alert.rep_id in reps:
        rep = reps[alert.rep_id]
        recipients.append((f"rep:{rep.id}", rep.slack, rep.email))
        if alert.type == ESCALATED and rep.manager:
            manager = reps[rep.manager]
            recipients.append((f"manager:{manager.id}", manager.slack, manager.email))
    elif directory and alert.team_id in directory.team_channels:
        recipients.append((f"team:{alert.team_id}", directory.team_channels[alert.team_id], None))
    deliveries = []
    for channel in channels:
        if not channel.per_recipient:
            deliveries.append(Delivery(channel, "all", None))
            continue
        for recipient, slack, email in recipients:
            address = slack if channel.name == "slack" else email
            if address:
                deliveries.append(Delivery(channel, recipient, address))
    return deliveries


class SentSet:
    """The deliveries posted so far, by key, kept in a compacted topic: a restarted notifier reads them back
    and posts none of them again, even for alerts whose offsets it had not committed."""

    def __init__(self, settings: Settings, producer: KafkaProducer):
        self.topic, self.producer = settings.effective_notify_sent_topic, producer
        consumer = kafka_consumer(settings)
        try:
            partitions = [TopicPartition(self.topic, p) for p in consumer.partitions_for_topic(self.topic) or ()]
            consumer.assign(partitions)
            consumer.seek_to_beginning()
            end = consumer.end_offsets(partitions)
            self.keys: set[str] = set()
            while any(consumer.position(tp) < end[tp] for tp in partitions):
                for record in itertools.chain.from_iterable(consumer.poll(timeout_ms=500).values()):
                    self.keys.add(record.key.decode())
        finally:
            consumer.close()
        log.info("%d deliveries already sent (%s)", len(self.keys), self.topic)

    def __contains__(self, key: str) -> bool:
        return key in self.keys

    def add(self, key: str) -> None:
        # Waited for: once the next delivery starts, this one is on record.
        self.producer.send(self.topic, key=key.encode(), value=orjson.dumps({"sent_at": _now()})).get(timeout=30)
        self.keys.add(key)


def ensure_notify_topics(settings: Settings) -> None:
    admin = connect_admin(settings)
    try:
        existing = set(admin.list_topics())
        wanted = {
            settings.effective_notify_sent_topic: {"cleanup.policy": "compact"},
            settings.effective_notify_dlq_topic: {},
        }
        for name, config in wanted.items():
            if name not in existing:
                try:
                    admin.create_topics([NewTopic(name, settings.partitions, settings.replication_factor,
                                                  topic_configs=config)])  # fmt: skip
                    log.info("created topic %s", name)
                except TopicAlreadyExistsError:
                    pass
    finally:
        admin.close()


class NotifyMetrics:
    """Served on CRM_PULSE_NOTIFY_METRICS_PORT; labels are channel and outcome only, never a person."""

    def __init__(self, registry: CollectorRegistry):
        self.notifications = Counter(
            "crm_notifications", "Deliveries by channel and outcome (delivered, already_sent, dead_lettered)",
            ["channel", "outcome"], registry=registry,
        )  # fmt: skip
        self.delay = Histogram(
            "crm_notification_delay_seconds", "From the alert's publication to its delivery",
            ["channel"], buckets=DELAY_BUCKETS, registry=registry,
        )  # fmt: skip


def serve_metrics(settings: Settings) -> NotifyMetrics:
    host, port = settings.notify_metrics_host, settings.notify_metrics_port
    if (exc := bind_error(host, port)) is not None:
        raise SettingsInvalid(
            f"CRM_PULSE_NOTIFY_METRICS_PORT={port}: {host}:{port} cannot be bound ({exc.strerror}); "
            "stop what listens there or choose another port"
        )
    registry = CollectorRegistry()
    metrics = NotifyMetrics(registry)
    start_http_server(port, host, registry=registry)
    return metrics


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


class Notifier:
    def __init__(self, settings: Settings, channels: list[Channel], directory: DirectoryFile | None,
                 producer: KafkaProducer, sent: SentSet, metrics: NotifyMetrics, max_attempts: int,
                 backoff_seconds: float):  # fmt: skip
        self.settings, self.channels, self.directory = settings, channels, directory
        self.producer, self.sent, self.metrics = producer, sent, metrics
        self.max_attempts, self.backoff_seconds = max_attempts, backoff_seconds

    def handle(self, record) -> str:
        """Deliver one record's alert on every route not yet sent; the outcome: posted (every delivery made
        now or before, at least one now), duplicate (all made before), failed (one dead-lettered), invalid."""
        try:
            alert = parse_alert(record.value)
        except ValueError as exc:
            log.warning("skipping invalid record %s: %s", where(record), exc)
            return "invalid"
        published = orjson.loads(record.value)
        directory = self.directory.current() if self.directory else None
        deliveries = route(alert, directory, self.channels)
        if not deliveries:
            reason = f"nobody to notify: rep {alert.rep_id} is not in the directory, team {alert.team_id} has no team_channel"
            self.dead_letter(record, published, None, reason)
            return "failed"
        message = compose(alert, directory, self.settings.crm_record_url)
        outcomes = set()
        for delivery in deliveries:
            channel, key = delivery.channel, delivery.key(alert.alert_id)
            if key in self.sent:
                self.metrics.notifications.labels(channel.name, "already_sent").inc()
                outcomes.add("duplicate")
                continue
            reason = deliver_with_retries(
                channel.name, lambda: channel.send(message, published, delivery.address),
                self.max_attempts, self.backoff_seconds,
            )  # fmt: skip
            if reason is None:
                self.sent.add(key)
                self.metrics.notifications.labels(channel.name, "delivered").inc()
                self.metrics.delay.labels(channel.name).observe(max(time.time() - record.timestamp / 1000, 0))
                outcomes.add("posted")
            else:
                self.dead_letter(record, published, delivery, reason)
                outcomes.add("failed")
        return "failed" if "failed" in outcomes else "posted" if "posted" in outcomes else "duplicate"

    def dead_letter(self, record, published: dict, delivery: Delivery | None, reason: str) -> None:
        channel = delivery.channel.name if delivery else None
        letter = NotificationDeadLetter(
            alert_id=published["alert_id"], channel=channel, recipient=delivery.recipient if delivery else None,
            reason=reason, alert=published, dead_lettered_at=_now(),
        )  # fmt: skip
        topic = self.settings.effective_notify_dlq_topic
        self.producer.send(topic, key=record.key, value=letter.model_dump_json().encode()).get(timeout=30)
        self.metrics.notifications.labels(channel or "none", "dead_lettered").inc()
        log.error("dead-lettered alert %s to %s (%s): %s", letter.alert_id, channel, letter.recipient, reason)


def notify(
    settings: Settings,
    webhook_url: str | None = None,
    *,
    group: str | None = None,
    from_beginning: bool = False,
    max_attempts: int = 5,
    backoff_seconds: float = 1.0,
    timeout_seconds: float = 10.0,
    max_idle_seconds: float | None = None,
) -> dict[str, int]:
    """Route every alert, in partition order (alerts are keyed by rep, so each rep's arrive in order).

    Reads in the consumer group `group` (default `<app id>-alerts-notify`) and commits a record's offset once
    each of its deliveries was made or dead-lettered, so a restart loses no alert; the sent-set makes sure a
    delivery made before a restart is not made again. A group without committed offsets starts at the end of
    the topic unless `from_beginning`. Runs until interrupted, or until no record has arrived for
    `max_idle_seconds` once partitions are assigned. Returns the counts of posted, failed, duplicate and invalid
    records."""
    if max_attempts < 1:
        raise SettingsInvalid("--max-attempts must be at least 1")
    channels = configure_channels(settings, webhook_url, timeout_seconds)
    if any(channel.per_recipient for channel in channels) and not settings.rep_directory:
        raise SettingsInvalid(
            "alerts notify sends to reps (Slack bot or e-mail) and needs CRM_PULSE_REP_DIRECTORY, a TOML or CSV file"
        )
    check_link_template(settings.crm_record_url)
    directory = DirectoryFile(Path(settings.rep_directory)) if settings.rep_directory else None
    metrics = serve_metrics(settings)
    consumer = kafka_consumer(
        settings,
        settings.alerts_topic,
        group_id=group or f"{settings.app_id}-alerts-notify",
        auto_offset_reset="earliest" if from_beginning else "latest",
        # One record per poll, and room for the retries of all its deliveries between polls, so a slow channel
        # does not get this member evicted from the group.
        max_poll_records=1,
        max_poll_interval_ms=int(4 * max_attempts * (MAX_DELAY_SECONDS + timeout_seconds) * 1000) + 60_000,
        # Kafka's pre-3.0 default rather than 45 s: a dead notifier's partitions move on sooner, and Tansu, which
        # holds a join for half the session timeout, assigns partitions in 5 s instead of 23.
        session_timeout_ms=10_000,
    )
    producer = KafkaProducer(bootstrap_servers=settings.bootstrap_servers, acks="all", **client_security(settings))
    counts = dict.fromkeys(("posted", "failed", "duplicate", "invalid"), 0)
    try:
        ensure_notify_topics(settings)
        notifier = Notifier(settings, channels, directory, producer, SentSet(settings, producer), metrics,
                            max_attempts, backoff_seconds)  # fmt: skip
        last_record = time.monotonic()
        while max_idle_seconds is None or time.monotonic() - last_record < max_idle_seconds:
            batch = consumer.poll(timeout_ms=500)
            if batch or not consumer.assignment():
                last_record = time.monotonic()
            for record in itertools.chain.from_iterable(batch.values()):
                counts[notifier.handle(record)] += 1
                partition = TopicPartition(record.topic, record.partition)
                try:
                    consumer.commit({partition: OffsetAndMetadata(record.offset + 1)})
                except CommitFailedError as exc:
                    log.warning("could not commit %s (%s); the sent-set keeps it from being posted twice",
                                where(record), exc)  # fmt: skip
    except KeyboardInterrupt:
        pass
    finally:
        consumer.close()
        producer.close()
        log.info("notify stopped: %s", " ".join(f"{name}={count}" for name, count in counts.items()))
    return counts
