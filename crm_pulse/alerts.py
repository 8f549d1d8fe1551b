"""Example consumers of the `crm-alerts` contract (docs/alerts.md): `tail` prints alerts, `notify` posts them
to a Slack-compatible webhook."""

from __future__ import annotations

import http.client
import itertools
import logging
import sys
import time
import urllib.error
import urllib.request
from collections import OrderedDict
from datetime import datetime, timezone
from email.utils import parsedate_to_datetime
from functools import partial
from typing import Callable, TextIO

import orjson
from kafka import KafkaConsumer, TopicPartition
from kafka.errors import CommitFailedError
from kafka.structs import OffsetAndMetadata
from pydantic import ValidationError

from crm_pulse.broker import BrokerUnusable, client_security, log_in, principal
from crm_pulse.config import Settings
from crm_pulse.schemas.records import Alert

log = logging.getLogger(__name__)

DAY_SECONDS = 86400
MAX_DELAY_SECONDS = 30.0
REMEMBERED_IDS = 100_000


def parse_alert(raw: bytes | None) -> Alert:
    """A record value as a v1 alert, or ValueError with the reason.

    Unknown fields are ignored: the contract may gain optional fields without leaving version 1."""
    try:
        return Alert.model_validate_json(raw or b"", extra="ignore")
    except ValidationError as exc:
        errors = exc.errors(include_url=False)
    for error in errors:
        if error["loc"] == ("schema_version",):
            raise ValueError(f"unsupported schema_version {error['input']!r}; this consumer reads version 1")
    raise ValueError("; ".join(f"{'.'.join(map(str, e['loc'])) or 'value'}: {e['msg']}" for e in errors))


def format_alert(alert: Alert) -> str:
    return (
        f"{alert.detected_at} {alert.type} rep={alert.rep_id} lead={alert.lead_id} stage={alert.stage} "
        f"idle={alert.idle_seconds / DAY_SECONDS:.1f}d threshold={alert.threshold_seconds / DAY_SECONDS:.1f}d "
        f"rule={alert.rule}"
    )


def _consumer(settings: Settings, *topics: str, **options) -> KafkaConsumer:
    if not settings.broker:
        raise SystemExit("set CRM_PULSE_BROKER=kafka://host:port to the cluster the worker publishes alerts to")
    log_in(settings)  # a refused login fails here with its cause; KafkaConsumer would retry it for 30 s
    return KafkaConsumer(
        *topics, bootstrap_servers=settings.bootstrap_servers, enable_auto_commit=False, **options,
        **client_security(settings),
    )  # fmt: skip


def tail(settings: Settings, from_beginning: bool, follow: bool, out: TextIO) -> None:
    """Print one line per alert on the alerts topic; report a record that breaks the contract on stderr, with
    its position and the reason, and carry on.

    `tail` is a viewer, like `tail -f` or `kafka-console-consumer`: it assign()s itself every partition and
    commits nothing. So it never moves a real consumer's position, two people tailing at once both see every
    alert (members of one consumer group would split the partitions between them), and it starts at once, where
    a group join costs seconds. It starts at the end of each partition, or at the beginning with
    `from_beginning`. With `follow` it runs until interrupted; without, it stops at the end offsets seen on
    start. Partitions added to the topic while it runs are seen on the next start. `notify` is the consumer
    that joins a group and commits.
    """
    consumer = _consumer(settings)
    try:
        topic = settings.alerts_topic
        # None: the topic does not exist, or this client may not see it.
        partitions = [TopicPartition(topic, p) for p in sorted(consumer.partitions_for_topic(topic) or ())]
        if not partitions:
            raise BrokerUnusable(
                f"topic {topic} does not exist on {settings.broker}, or {principal(settings)} may not read it"
            )
        consumer.assign(partitions)
        if from_beginning:
            consumer.seek_to_beginning()
        else:
            consumer.seek_to_end()
        end = consumer.end_offsets(partitions)
        while follow or any(consumer.position(tp) < end[tp] for tp in partitions):
            for record in itertools.chain.from_iterable(consumer.poll(timeout_ms=500).values()):
                try:
                    print(format_alert(parse_alert(record.value)), file=out, flush=True)
                except ValueError as exc:
                    print(f"invalid record {_where(record)}: {exc}", file=sys.stderr, flush=True)
    except KeyboardInterrupt:
        pass
    finally:
        consumer.close()


def slack_message(alert: Alert) -> dict:
    """A Slack incoming-webhook payload: plain `text` (the notification fallback) and a mrkdwn section."""
    idle, threshold = alert.idle_seconds / DAY_SECONDS, alert.threshold_seconds / DAY_SECONDS
    lead, stage, rep = (_escape(v) for v in (alert.lead_id, alert.stage, alert.rep_id))
    headline = {
        "lead.stalled": f"Lead {lead} stalled in stage {stage}",
        "lead.stall_escalated": f"Lead {lead} still stalled in stage {stage} (escalated)",
        "lead.stall_cleared": f"Lead {lead} is moving again after stalling in stage {stage}",
    }[alert.type]
    facts = f"idle {idle:.1f}d, threshold {threshold:.1f}d, rep {rep}"
    details = f"{alert.type} · detected {alert.detected_at} · rule {alert.rule} · alert {alert.alert_id}"
    return {
        "text": f"{headline}: {facts}",
        "blocks": [
            {"type": "section", "text": {"type": "mrkdwn", "text": f"*{headline}*\n{facts}"}},
            {"type": "context", "elements": [{"type": "mrkdwn", "text": details}]},
        ],
    }


def _escape(text: str) -> str:
    # The three characters Slack's mrkdwn treats as control sequences.
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def _retry_after(value: str | None) -> float | None:
    """Seconds from a Retry-After header: delta-seconds or an HTTP date."""
    if value is None:
        return None
    try:
        return float(value)
    except ValueError:
        pass
    try:
        return (parsedate_to_datetime(value) - datetime.now(timezone.utc)).total_seconds()
    except (TypeError, ValueError):
        return None


def post_with_retries(url: str, body: bytes, max_attempts: int, backoff_seconds: float, timeout_seconds: float) -> bool:
    """POST `body`; retry connection errors, 5xx and 429 with exponential backoff (or Retry-After)."""
    request = urllib.request.Request(url, data=body, headers={"Content-Type": "application/json"}, method="POST")
    for attempt in range(1, max_attempts + 1):
        retry_after = None
        try:
            with urllib.request.urlopen(request, timeout=timeout_seconds) as response:
                response.read()
            return True
        except urllib.error.HTTPError as exc:
            exc.close()
            if exc.code != 429 and exc.code < 500:
                log.error("webhook answered HTTP %d; the request will not get better by retrying", exc.code)
                return False
            error, retry_after = f"HTTP {exc.code}", _retry_after(exc.headers.get("Retry-After"))
        except (OSError, http.client.HTTPException) as exc:
            error = repr(exc)
        if attempt < max_attempts:
            wait = backoff_seconds * 2 ** (attempt - 1) if retry_after is None else retry_after
            delay = min(max(wait, 0), MAX_DELAY_SECONDS)
            log.warning("webhook attempt %d/%d failed (%s); retrying in %.1fs", attempt, max_attempts, error, delay)
            time.sleep(delay)
    log.error("webhook attempt %d/%d failed (%s); giving up", max_attempts, max_attempts, error)
    return False


def notify(
    settings: Settings,
    url: str,
    *,
    group: str | None = None,
    from_beginning: bool = False,
    max_attempts: int = 5,
    backoff_seconds: float = 1.0,
    timeout_seconds: float = 10.0,
    max_idle_seconds: float | None = None,
) -> dict[str, int]:
    """Post every alert to the webhook `url` as a Slack message, in partition order, so each rep's alerts arrive
    in order (alerts are keyed by rep).

    Reads in the consumer group `group` (default `<app id>-alerts-notify`; give each webhook its own group) and
    commits a record's offset only once its post succeeded or was given up on, so a restart resumes after the
    last alert handled and loses none. A group without committed offsets starts at the end of the topic, so
    hooking up a webhook does not flood it with the backlog, unless `from_beginning`.

    Connection errors, 5xx and 429 are retried, waiting `backoff_seconds` × 2^(attempt − 1) or Retry-After (at
    most 30 s), up to `max_attempts` posts; then the alert is logged and counted as failed and the loop moves on.
    Other 4xx answers are not retried. An alert_id already posted in this run is not posted again; after a
    restart, an alert whose post succeeded but whose commit did not is posted again (at least once).

    Runs until interrupted, or until no record has arrived for `max_idle_seconds` once partitions are assigned.
    Returns the counts of posted, failed, duplicate and invalid records.
    """
    if max_attempts < 1:
        raise SystemExit("max_attempts must be at least 1")
    consumer = _consumer(
        settings,
        settings.alerts_topic,
        group_id=group or f"{settings.app_id}-alerts-notify",
        auto_offset_reset="earliest" if from_beginning else "latest",
        # One record per poll, and room for its whole retry sequence between polls, so a slow webhook does not
        # get this member evicted from the group.
        max_poll_records=1,
        max_poll_interval_ms=int(max_attempts * (MAX_DELAY_SECONDS + timeout_seconds) * 1000) + 60_000,
        # Kafka's pre-3.0 default rather than 45 s: a dead notifier's partitions move on sooner, and Tansu, which
        # holds a join for half the session timeout, assigns partitions in 5 s instead of 23.
        session_timeout_ms=10_000,
    )
    deliver = partial(
        post_with_retries, url, max_attempts=max_attempts, backoff_seconds=backoff_seconds,
        timeout_seconds=timeout_seconds,
    )  # fmt: skip
    counts = dict.fromkeys(("posted", "failed", "duplicate", "invalid"), 0)
    posted: OrderedDict[str, None] = OrderedDict()
    last_record = time.monotonic()
    try:
        while max_idle_seconds is None or time.monotonic() - last_record < max_idle_seconds:
            batch = consumer.poll(timeout_ms=500)
            if batch or not consumer.assignment():
                last_record = time.monotonic()
            for record in itertools.chain.from_iterable(batch.values()):
                counts[_notify_one(record, posted, deliver)] += 1
                partition = TopicPartition(record.topic, record.partition)
                try:
                    consumer.commit({partition: OffsetAndMetadata(record.offset + 1)})
                except CommitFailedError as exc:
                    log.warning("could not commit %s (%s); it may be posted again", _where(record), exc)
    except KeyboardInterrupt:
        pass
    finally:
        consumer.close()
        log.info("notify stopped: %s", " ".join(f"{name}={count}" for name, count in counts.items()))
    return counts


def _notify_one(record, posted: OrderedDict[str, None], deliver: Callable[[bytes], bool]) -> str:
    """Post one record's alert unless this run posted it already; the name of the outcome."""
    try:
        alert = parse_alert(record.value)
    except ValueError as exc:
        log.warning("skipping invalid record %s: %s", _where(record), exc)
        return "invalid"
    if alert.alert_id in posted:
        return "duplicate"
    if not deliver(orjson.dumps(slack_message(alert))):
        log.error("gave up on alert %s (%s for lead %s)", alert.alert_id, alert.type, alert.lead_id)
        return "failed"
    posted[alert.alert_id] = None
    if len(posted) > REMEMBERED_IDS:
        posted.popitem(last=False)
    return "posted"


def _where(record) -> str:
    return f"{record.topic}/{record.partition}@{record.offset}"
