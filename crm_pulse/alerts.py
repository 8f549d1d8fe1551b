"""Example consumers of the `crm-alerts` contract (docs/alerts.md): `tail` prints alerts; `notify`
(crm_pulse/notify.py) routes them to reps."""

from __future__ import annotations

import itertools
import logging
import sys
from typing import TextIO

import orjson
from kafka import KafkaConsumer, TopicPartition
from pydantic import ValidationError

from crm_pulse.broker import BrokerUnusable, client_security, log_in, principal
from crm_pulse.config import Settings
from crm_pulse.schemas.records import Alert, DealAlert

log = logging.getLogger(__name__)

DAY_SECONDS = 86400


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


def _version(raw: bytes | None) -> object:
    try:
        doc = orjson.loads(raw or b"")
    except orjson.JSONDecodeError:
        return None
    return doc.get("schema_version") if isinstance(doc, dict) else None


def parse_any_alert(raw: bytes | None) -> Alert | DealAlert:
    """A stall alert (version 1) or a deal alert (version 2), or ValueError with the reason."""
    version = _version(raw)
    if isinstance(version, int) and version not in (1, 2):
        raise ValueError(f"unsupported schema_version {version!r}; this consumer reads versions 1 and 2")
    if version != 2:
        return parse_alert(raw)
    try:
        return DealAlert.model_validate_json(raw, extra="ignore")
    except ValidationError as exc:
        errors = exc.errors(include_url=False)
    raise ValueError("; ".join(f"{'.'.join(map(str, e['loc'])) or 'value'}: {e['msg']}" for e in errors))


def format_deal_alert(alert: DealAlert) -> str:
    if alert.type == "deal.close_date_slipped":
        details = f"close={alert.close_date} was={alert.previous_close_date} pushes={alert.push_count}"
    elif alert.type == "deal.past_due":
        details = f"close={alert.close_date}"
    elif alert.type == "deal.stage_regressed":
        details = f"from={alert.from_stage} to={alert.to_stage}"
    elif alert.type == "deal.amount_decreased":
        details = f"amount={alert.amount:g} was={alert.previous_amount:g} cut={alert.decrease_ratio:.0%}"
    else:
        details = f"health={alert.health:g} band={alert.health_band} was={alert.previous_health_band}"
    return f"{alert.detected_at} {alert.type} rep={alert.rep_id} lead={alert.lead_id} stage={alert.stage} {details}"


def format_alert(alert: Alert | DealAlert) -> str:
    if isinstance(alert, DealAlert):
        return format_deal_alert(alert)
    return (
        f"{alert.detected_at} {alert.type} rep={alert.rep_id} lead={alert.lead_id} stage={alert.stage} "
        f"idle={alert.idle_seconds / DAY_SECONDS:.1f}d threshold={alert.threshold_seconds / DAY_SECONDS:.1f}d "
        f"rule={alert.rule}"
    )


def kafka_consumer(settings: Settings, *topics: str, **options) -> KafkaConsumer:
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
    consumer = kafka_consumer(settings)
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
                    print(format_alert(parse_any_alert(record.value)), file=out, flush=True)
                except ValueError as exc:
                    print(f"invalid record {where(record)}: {exc}", file=sys.stderr, flush=True)
    except KeyboardInterrupt:
        pass
    finally:
        consumer.close()


def where(record) -> str:
    return f"{record.topic}/{record.partition}@{record.offset}"
