"""`crm-pulse alerts notify`: route each alert to its rep (and, escalated, their manager; unassigned, the team
channel) on the configured channels, each delivery posted once (docs/alerts.md#notify-route-alerts-to-reps).

The notifier is its own process, apart from the worker, so a slow or failing channel never slows the KPIs."""

from __future__ import annotations

import hashlib
import itertools
import logging
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable

import orjson
from kafka import KafkaProducer, TopicPartition
from kafka.errors import CommitFailedError
from kafka.structs import OffsetAndMetadata
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

from crm_pulse.alerts import DAY_SECONDS, kafka_consumer, parse_any_alert, where
from crm_pulse.broker import bind_error, client_security, create_missing
from crm_pulse.channels import (
    MAX_DELAY_SECONDS, SNOOZE, Channel, Message, configure_channels, deliver_with_retries,
)  # fmt: skip
from crm_pulse.config import Settings, SettingsInvalid
from crm_pulse.directory import Directory, DirectoryFile
from crm_pulse.schedule import Timing, release_time
from crm_pulse.snooze import Snoozes, snooze_link
from crm_pulse.schemas.records import Alert, DealAlert, NotificationDeadLetter
from crm_pulse.streams.leads import ESCALATED

log = logging.getLogger(__name__)

HEADLINES = {
    "lead.stalled": "{lead} stalled in stage {stage}",
    "lead.stall_escalated": "{lead} still stalled in stage {stage} (escalated)",
    "lead.stall_cleared": "{lead} is moving again after stalling in stage {stage}",
}
# A link template may use only the fields every alert has, stall (v1) or deal (v2), so it fills in for both.
LINK_FIELDS = tuple(name for name in Alert.model_fields if name in DealAlert.model_fields)
# Alert to delivery spans a post (ms) up to the retries of a failing channel and a restart (minutes).
DELAY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 900, 3600)


def record_link(template: str | None, alert: Alert | DealAlert) -> str | None:
    """The CRM record's URL: CRM_PULSE_CRM_RECORD_URL with the alert's fields, e.g. {lead_id}, filled in."""
    return template.format_map(alert.model_dump()) if template else None


def check_link_template(template: str | None) -> None:
    if template is None:
        return
    try:
        template.format_map(dict.fromkeys(LINK_FIELDS, ""))
    except (KeyError, IndexError, ValueError) as exc:
        fields = ", ".join(f"{{{name}}}" for name in LINK_FIELDS)
        raise SettingsInvalid(
            f"CRM_PULSE_CRM_RECORD_URL={template!r} has an unknown placeholder {exc}; "
            f"use the fields every alert has (stall and deal): {fields}"
        ) from None


def _day(timestamp: str | None) -> str | None:
    """A close date as the date alone when it is a UTC midnight (as CRMs send dates), else in full."""
    return timestamp[:10] if timestamp and timestamp.endswith("T00:00:00.000Z") else timestamp


def deal_headline(alert: DealAlert, deal: str) -> str:
    """What happened to the deal, with the numbers the alert carries."""
    if alert.type == "deal.close_date_slipped":
        pushes = "1 push" if alert.push_count == 1 else f"{alert.push_count} pushes"
        return f"{deal}: close date pushed from {_day(alert.previous_close_date)} to {_day(alert.close_date)} ({pushes})"
    if alert.type == "deal.past_due":
        return f"{deal} is past its close date {_day(alert.close_date)} and still open"
    if alert.type == "deal.stage_regressed":
        return f"{deal} moved back from stage {alert.from_stage} to {alert.to_stage}"
    if alert.type == "deal.amount_decreased":
        return (f"{deal}: amount cut by {alert.decrease_ratio:.0%} from {alert.previous_amount:,.2f} "
                f"to {alert.amount:,.2f}")  # fmt: skip
    return f"{deal}: health dropped from {alert.previous_health_band} to {alert.health_band} (score {alert.health:.1f})"


def compose_deal(alert: DealAlert, owner: str, team: str | None, link: str | None, snooze: str | None) -> Message:
    """A deal alert: what happened in the headline; the deal's stage, amount and close date, and who owns it."""
    deal = f"Deal {alert.lead_id}" + (f" (account {alert.account_id})" if alert.account_id else "")
    facts = [f"stage {alert.stage}"] if alert.stage else []
    if alert.amount is not None and alert.type != "deal.amount_decreased":
        facts.append(f"amount {alert.amount:,.2f}")
    if alert.close_date and alert.type not in ("deal.close_date_slipped", "deal.past_due"):
        facts.append(f"close date {_day(alert.close_date)}")
    facts.append(f"rep {owner}")
    if team:
        facts.append(f"team {team}")
    return Message(
        headline=deal_headline(alert, deal), facts=", ".join(facts),
        details=f"{alert.type} · detected {alert.detected_at} · alert {alert.alert_id}", link=link, snooze=snooze,
    )  # fmt: skip


def compose(alert: Alert | DealAlert, directory: Directory | None, link_template: str | None,
            snooze: str | None = None) -> Message:  # fmt: skip
    """What a rep can act on: the lead and its account, the stage, idle time against the threshold and the rule
    that set it, the deal value, who owns it, a link to the record, and one that snoozes the lead."""
    reps = directory.reps if directory else {}
    if isinstance(alert, DealAlert):
        owner = reps[alert.rep_id].display_name if alert.rep_id in reps else alert.rep_id
        team = alert.team_id if alert.rep_id not in reps else None
        return compose_deal(alert, owner, team, record_link(link_template, alert), snooze)
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
        snooze=snooze,
    )


def compose_group(alerts: list[Alert | DealAlert], directory: Directory | None, link_template: str | None,
                  snooze: Callable[[Alert | DealAlert], str | None]) -> Message:  # fmt: skip
    """One alert's message, or for several of one rep's alerts one message with a line (and links) for each."""
    messages = [compose(alert, directory, link_template, snooze(alert)) for alert in alerts]
    if len(messages) == 1:
        return messages[0]
    reps = directory.reps if directory else {}
    rep_id = alerts[0].rep_id
    lines = [" · ".join(filter(None, (m.text, m.link, m.snooze and f"{SNOOZE}: {m.snooze}"))) for m in messages]
    return Message(
        headline=f"{len(alerts)} lead alerts for {reps[rep_id].display_name if rep_id in reps else rep_id}",
        facts="\n".join(lines),
        details="alerts " + ", ".join(alert.alert_id for alert in alerts),
        link=None,
    )


@dataclass(frozen=True)
class Delivery:
    channel: Channel
    recipient: str  # rep:<id>, manager:<id>, team:<id>, or all (a channel that posts each alert once)
    address: str | None

    def key(self, alert_id: str) -> str:
        return f"{alert_id}|{self.channel.name}|{self.recipient}"


def route(alert: Alert | DealAlert, directory: Directory | None, channels: list[Channel]) -> list[Delivery]:
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


class TopicReader:
    """One of notify's compacted topics, every partition from its beginning: each `new()` gives the records written
    since the last, up to the topic's end as of that call."""

    def __init__(self, settings: Settings, topic: str):
        self.consumer = kafka_consumer(settings)
        self.partitions = [TopicPartition(topic, p) for p in self.consumer.partitions_for_topic(topic) or ()]
        self.consumer.assign(self.partitions)
        self.consumer.seek_to_beginning()

    def new(self) -> list:
        records = []
        end = self.consumer.end_offsets(self.partitions)
        while any(self.consumer.position(tp) < end[tp] for tp in self.partitions):
            records.extend(itertools.chain.from_iterable(self.consumer.poll(timeout_ms=500).values()))
        return records

    def close(self) -> None:
        self.consumer.close()


def read_topic(settings: Settings, topic: str) -> list:
    """Every record of `topic`, from the beginning to its current end."""
    reader = TopicReader(settings, topic)
    try:
        return reader.new()
    finally:
        reader.close()


class SentSet:
    """The deliveries posted so far, by key, kept in a compacted topic: a restarted notifier reads them back
    and posts none of them again, even for alerts whose offsets it had not committed."""

    def __init__(self, topic: str, producer: KafkaProducer, records):
        self.topic, self.producer = topic, producer
        self.keys: set[str] = set()
        for record in records:
            self.keys.add(record.key.decode())
            self.keys.update(orjson.loads(record.value).get("keys", ()))
        log.info("%d deliveries already sent (%s)", len(self.keys), self.topic)

    def __contains__(self, key: str) -> bool:
        return key in self.keys

    def add(self, keys: list[str]) -> None:
        """Record one message's deliveries; a grouped message's in one record, so all or none are on record."""
        value: dict = {"sent_at": _now()}
        if len(keys) > 1:
            value["keys"] = keys
        key = keys[0] if len(keys) == 1 else hashlib.sha256("\n".join(keys).encode()).hexdigest()
        # Waited for: once the next delivery starts, this one is on record.
        self.producer.send(self.topic, key=key.encode(), value=orjson.dumps(value)).get(timeout=30)
        self.keys.update(keys)


def ensure_notify_topics(settings: Settings) -> None:
    wanted = {settings.effective_notify_sent_topic: {"cleanup.policy": "compact"},
              settings.effective_notify_dlq_topic: {}}
    if settings.notify_link_secret:
        wanted[settings.effective_notify_snoozes_topic] = {"cleanup.policy": "compact"}
    create_missing(settings, wanted)


class NotifyMetrics:
    """Served on CRM_PULSE_NOTIFY_METRICS_PORT; labels are channel and outcome only, never a person."""

    def __init__(self, registry: CollectorRegistry):
        self.notifications = Counter(
            "crm_notifications",
            "Deliveries by channel and outcome (delivered, already_sent, dead_lettered, snoozed)",
            ["channel", "outcome"], registry=registry,
        )  # fmt: skip
        self.delay = Histogram(
            "crm_notification_delay_seconds", "From the alert's publication to its delivery",
            ["channel"], buckets=DELAY_BUCKETS, registry=registry,
        )  # fmt: skip
        self.held = Gauge("crm_notifications_held", "Alerts held for grouping, a digest or quiet hours",
                          registry=registry)  # fmt: skip


def check_web_port(settings: Settings) -> None:
    host, port = settings.notify_metrics_host, settings.notify_metrics_port
    if (exc := bind_error(host, port)) is not None:
        raise SettingsInvalid(
            f"CRM_PULSE_NOTIFY_METRICS_PORT={port}: {host}:{port} cannot be bound ({exc.strerror}); "
            "stop what listens there or choose another port"
        )


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def utc_now() -> datetime:
    return datetime.now(timezone.utc)


@dataclass
class Held:
    """An alert whose deliveries to its rep (and their manager) wait for the rep's release time."""

    record: object
    alert: Alert | DealAlert
    published: dict
    deliveries: list[Delivery]
    outcomes: set[str] = field(default_factory=set)  # of each message made so far: posted or failed

    @property
    def outcome(self) -> str:
        return "failed" if "failed" in self.outcomes else "posted"


class Notifier:
    """Delivers alerts; with grouping, digests or quiet hours (`timing`), holds the deliveries to a rep in the
    directory, on the per-recipient channels, until `release` finds their time come by the clock `now`."""

    def __init__(self, settings: Settings, channels: list[Channel], directory: DirectoryFile | None,
                 producer: KafkaProducer, sent: SentSet, metrics: NotifyMetrics, max_attempts: int,
                 backoff_seconds: float, snoozes: Snoozes | None, now: Callable[[], datetime]):  # fmt: skip
        self.settings, self.channels, self.directory = settings, channels, directory
        self.producer, self.sent, self.metrics = producer, sent, metrics
        self.max_attempts, self.backoff_seconds = max_attempts, backoff_seconds
        self.snoozes, self.now = snoozes, now
        self.timing = Timing(settings.notify_group_seconds, settings.notify_digest, settings.notify_quiet_hours)
        self.held: dict[str, list[Held]] = {}  # by rep id, in the order read

    def handle(self, record) -> str:
        """Deliver one record's alert on every route not yet sent, or hold the rep's deliveries; the outcome:
        posted (every delivery made now or before, at least one now), duplicate (all made before), failed (one
        dead-lettered), snoozed (its lead is), invalid, or held (`release` gives the outcome later)."""
        try:
            alert = parse_any_alert(record.value)
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
        pending = []
        for delivery in deliveries:
            if delivery.key(alert.alert_id) in self.sent:
                self.metrics.notifications.labels(delivery.channel.name, "already_sent").inc()
            else:
                pending.append(delivery)
        # Held already: the worker published it again, or a rebalance handed its partition back from the start.
        if not pending or any(held.alert.alert_id == alert.alert_id for held in self.held.get(alert.rep_id, ())):
            return "duplicate"
        item = Held(record, alert, published, pending)
        self.catch_up_snoozes()
        if self.snoozed(item):
            return "snoozed"
        holds = self.timing.holds and directory is not None and alert.rep_id in directory.reps
        later = [delivery for delivery in pending if holds and delivery.channel.per_recipient]
        for delivery in pending:
            if delivery not in later:
                item.outcomes.add(self.send([item], delivery, directory))
        if later:
            item.deliveries = later
            self.held.setdefault(alert.rep_id, []).append(item)
            self.metrics.held.inc()
            return "held"
        return item.outcome

    def release(self) -> list[tuple[Held, str]]:
        """Post the held alerts of each rep whose time has come, one message per recipient; each with its
        outcome. A rep no longer in the directory has theirs posted at once."""
        now = self.now()
        directory = self.directory.current() if self.directory else None
        released = []
        for rep_id, items in list(self.held.items()):
            rep = directory.reps.get(rep_id) if directory else None
            first = datetime.fromtimestamp(min(item.record.timestamp for item in items) / 1000, timezone.utc)
            if rep is not None and release_time(rep, first, now, self.timing) > now:
                continue
            del self.held[rep_id]
            self.metrics.held.dec(len(items))
            groups: dict[tuple, tuple[Delivery, list[Held]]] = {}
            live = []
            self.catch_up_snoozes()
            for item in items:
                if self.snoozed(item):
                    released.append((item, "snoozed"))
                    continue
                live.append(item)
                for delivery in item.deliveries:
                    target = (delivery.channel.name, delivery.recipient, delivery.address)
                    groups.setdefault(target, (delivery, []))[1].append(item)
            for delivery, group in groups.values():
                outcome = self.send(group, delivery, directory)
                for item in group:
                    item.outcomes.add(outcome)
            released += [(item, item.outcome) for item in live]
        return released

    def forget(self, assigned: set[TopicPartition]) -> None:
        """Drop what is held from partitions this member no longer reads: their new reader holds it now."""
        for rep_id, items in list(self.held.items()):
            kept = [item for item in items if TopicPartition(item.record.topic, item.record.partition) in assigned]
            self.metrics.held.dec(len(items) - len(kept))
            if kept:
                self.held[rep_id] = kept
            else:
                del self.held[rep_id]

    def catch_up_snoozes(self) -> None:
        """Read the snoozes published since the last look (by the gateway, a process of its own) before deciding."""
        if self.snoozes is not None:
            self.snoozes.catch_up()

    def snoozed(self, item: Held) -> bool:
        if self.snoozes is None or not self.snoozes.snoozed(item.alert.lead_id, self.now()):
            return False
        for delivery in item.deliveries:
            self.metrics.notifications.labels(delivery.channel.name, "snoozed").inc()
        log.info("alert %s not posted: lead %s is snoozed", item.alert.alert_id, item.alert.lead_id)
        return True

    def snooze_link(self, alert: Alert | DealAlert) -> str | None:
        settings = self.settings
        if settings.notify_link_secret is None or settings.notify_link_base_url is None:
            return None
        expires = int(self.now().timestamp() + settings.notify_link_valid_seconds)
        secret = settings.notify_link_secret.get_secret_value().encode()
        return snooze_link(settings.notify_link_base_url, secret, alert.lead_id, alert.rep_id, expires)

    def send(self, items: list[Held], delivery: Delivery, directory: Directory | None) -> str:
        """One message with the alerts of `items` to the recipient of `delivery`: posted or failed."""
        channel = delivery.channel
        message = compose_group([item.alert for item in items], directory, self.settings.crm_record_url,
                                self.snooze_link)  # fmt: skip
        reason = deliver_with_retries(
            channel.name, lambda: channel.send(message, items[0].published, delivery.address),
            self.max_attempts, self.backoff_seconds,
        )  # fmt: skip
        if reason is not None:
            for item in items:
                self.dead_letter(item.record, item.published, delivery, reason)
            return "failed"
        self.sent.add([delivery.key(item.alert.alert_id) for item in items])
        for item in items:
            self.metrics.notifications.labels(channel.name, "delivered").inc()
            self.metrics.delay.labels(channel.name).observe(max(time.time() - item.record.timestamp / 1000, 0))
        return "posted"

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


class Offsets:
    """What may be committed on each partition: up to the first alert still held, else past the last read.
    A held alert's offset stays uncommitted, so a restarted notifier reads it, and holds it, again."""

    def __init__(self):
        self.next: dict[TopicPartition, int] = {}
        self.held: dict[TopicPartition, set[int]] = {}
        self.committed: dict[TopicPartition, int] = {}

    def read(self, record, held: bool) -> None:
        partition = TopicPartition(record.topic, record.partition)
        self.next[partition] = record.offset + 1
        if held:
            self.held.setdefault(partition, set()).add(record.offset)

    def released(self, record) -> None:
        self.held[TopicPartition(record.topic, record.partition)].discard(record.offset)

    def forget(self, assigned: set[TopicPartition]) -> None:
        for offsets in (self.next, self.held, self.committed):
            for partition in set(offsets) - assigned:
                del offsets[partition]

    def to_commit(self) -> dict[TopicPartition, int]:
        due = {partition: min(self.held.get(partition) or (following,)) for partition, following in self.next.items()}
        return {partition: offset for partition, offset in due.items() if self.committed.get(partition) != offset}


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
    now: Callable[[], datetime] = utc_now,
) -> dict[str, int]:
    """Route every alert, in partition order (alerts are keyed by rep, so each rep's arrive in order).

    Reads in the consumer group `group` (default `<app id>-alerts-notify`) and commits a record's offset once
    each of its deliveries was made or dead-lettered, so a restart loses no alert; the sent-set makes sure a
    delivery made before a restart is not made again. Held alerts (grouping, digests, quiet hours; timed by the
    clock `now`) keep their offsets and those after them uncommitted until posted. A group without committed
    offsets starts at the end of the topic unless `from_beginning`. Runs until interrupted, or until no record
    has arrived and none is held for `max_idle_seconds` once partitions are assigned. Returns the counts of
    posted, failed, duplicate, invalid and snoozed records."""
    if max_attempts < 1:
        raise SettingsInvalid("--max-attempts must be at least 1")
    channels = configure_channels(settings, webhook_url, timeout_seconds)
    if any(channel.per_recipient for channel in channels) and not settings.rep_directory:
        raise SettingsInvalid(
            "alerts notify sends to reps (Slack bot or e-mail) and needs CRM_PULSE_REP_DIRECTORY, a TOML or CSV file"
        )
    check_link_template(settings.crm_record_url)
    directory = DirectoryFile(Path(settings.rep_directory)) if settings.rep_directory else None
    check_web_port(settings)
    registry = CollectorRegistry()
    metrics = NotifyMetrics(registry)
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
    counts = dict.fromkeys(("posted", "failed", "duplicate", "invalid", "snoozed"), 0)
    server = snooze_reader = None
    try:
        ensure_notify_topics(settings)
        sent_topic = settings.effective_notify_sent_topic
        sent = SentSet(sent_topic, producer, read_topic(settings, sent_topic))
        snoozes = None
        if settings.notify_link_secret:
            # Followed, not only read at start: the gateway publishes the snoozes its links confirm.
            snooze_reader = TopicReader(settings, settings.effective_notify_snoozes_topic)
            snoozes = Snoozes(snooze_reader.new)
        server, _ = start_http_server(settings.notify_metrics_port, settings.notify_metrics_host, registry)
        notifier = Notifier(settings, channels, directory, producer, sent, metrics, max_attempts, backoff_seconds,
                            snoozes, now)  # fmt: skip
        offsets = Offsets()
        last_record = time.monotonic()
        while max_idle_seconds is None or time.monotonic() - last_record < max_idle_seconds:
            batch = consumer.poll(timeout_ms=500)
            if batch or not consumer.assignment() or notifier.held:
                last_record = time.monotonic()
            for record in itertools.chain.from_iterable(batch.values()):
                outcome = notifier.handle(record)
                offsets.read(record, held=outcome == "held")
                if outcome != "held":
                    counts[outcome] += 1
            for item, outcome in notifier.release():
                counts[outcome] += 1
                offsets.released(item.record)
            notifier.forget(consumer.assignment())
            offsets.forget(consumer.assignment())
            if due := offsets.to_commit():
                try:
                    consumer.commit({partition: OffsetAndMetadata(offset) for partition, offset in due.items()})
                    offsets.committed.update(due)
                except CommitFailedError as exc:
                    log.warning("could not commit %s (%s); the sent-set keeps alerts from being posted twice",
                                due, exc)  # fmt: skip
    except KeyboardInterrupt:
        pass
    finally:
        if server is not None:
            server.shutdown()
        if snooze_reader is not None:
            snooze_reader.close()
        consumer.close()
        producer.close()
        log.info("notify stopped: %s", " ".join(f"{name}={count}" for name, count in counts.items()))
    return counts
