"""Configuration from `CRM_PULSE_*` environment variables (docs/configuration.md)."""

from __future__ import annotations

import os
import re
from datetime import date
from functools import cached_property
from pathlib import Path
from typing import Literal
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from pydantic import Field, SecretStr, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict, SettingsError

from crm_pulse.streams.deals import DealPolicy
from crm_pulse.streams.leads import StallPolicy

EPOCH = date(1970, 1, 1)


class SettingsInvalid(ValueError):
    """A setting that cannot be used: the message is one line naming it, its value and what it expects."""


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="CRM_PULSE_", frozen=True)

    broker: str | None = Field(None, description="kafka://host:port[,host:port]; unset starts an embedded broker")
    # Which broker `broker` unset starts: Tansu (in memory, the demo's default) or Apache Kafka (KRaft, the
    # version deploy/kafka/pom.xml pins); the test suite runs against either.
    embedded_broker: Literal["tansu", "kafka"] = "tansu"
    # Tansu needs work-arounds that Apache Kafka must not pay for (each says so where it is applied). "auto"
    # asks the cluster: Tansu answers with its own cluster id.
    broker_kind: Literal["auto", "kafka", "tansu"] = "auto"
    # How long `worker`, `import` and `alerts` wait for a broker that does not answer before they give up.
    broker_connect_timeout_seconds: float = Field(10, gt=0)
    app_id: str = "crm-pulse"
    input_topic: str = "crm-events"
    alerts_topic: str = "crm-alerts"
    dlq_topic: str = "crm-events-dlq"
    partitions: int = Field(4, ge=1)
    replication_factor: int = Field(1, ge=1)

    metrics_host: str = "127.0.0.1"
    metrics_port: int = 6066
    # rocksdb:// keeps tables on disk under data_dir (a restart reads back only what the changelogs added
    # since); memory:// rebuilds them from the changelogs.
    store: Literal["memory://", "rocksdb://"] = "memory://"
    data_dir: str = "data"
    # Faust refuses to start when a RocksDB store has applied a changelog offset beyond the topic's end.
    # Tansu sometimes reports an end offset one short of what it acknowledged, so unset means: on for
    # Apache Kafka, off for Tansu.
    recovery_consistency_check: bool | None = None
    # How long the broker may hold a fetch that finds no new data. Apache Kafka answers as soon as data
    # arrives, so unset leaves Faust's 1,500 ms there; Tansu holds every fetch its full wait (a record waited
    # a median 412 ms with 1,500 ms, 4 ms with 20 ms), and every hop between agents pays it: 20 ms there.
    fetch_max_wait_ms: int | None = Field(None, ge=0)

    clock: Literal["wall", "event"] = "wall"
    grace_seconds: float = Field(2 * 86400, ge=0)
    dedupe_horizon_seconds: float = Field(14 * 86400, ge=0)

    stall_stage_days: dict[str, float] = {"new": 2, "qualified": 5, "proposal": 7, "negotiation": 10}
    stall_default_days: float = 7
    stall_p90_factor: float = 2.0
    stall_p90_min_samples: int = 20
    stall_scan_seconds: float = Field(30, gt=0)
    closed_stages: frozenset[str] = frozenset({"won", "lost"})
    deal_stages: frozenset[str] = frozenset({"proposal", "negotiation"})
    # Deal inspection (docs/deals.md): each pipeline's open stages in order ("default" for leads without a
    # configured pipeline), the share of its amount a deal must lose for an alert, and how long after its
    # close date an open deal is past due.
    deal_stage_order: dict[str, list[str]] = {"default": ["new", "qualified", "proposal", "negotiation"]}
    deal_amount_decrease_share: float = Field(0.2, gt=0, le=1)
    deal_past_due_grace_seconds: float = Field(86400, ge=0)
    # The trailing window of closed deals that stage conversion and P(win | stage) are learned from.
    deal_history_days: int = Field(180, ge=1)
    baseline_start: date | None = Field(None, description="First day of the baseline period (e.g. before the CRM)")
    baseline_end: date | None = Field(None, description="Last day of the baseline period")
    # The IANA zone whose calendar days the daily buckets, rolling windows and calendar periods count.
    business_timezone: str = "UTC"

    security_protocol: Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"] = "PLAINTEXT"
    sasl_mechanism: Literal["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"] | None = None
    sasl_username: str | None = None
    sasl_password: SecretStr | None = None
    ssl_cafile: str | None = None
    ssl_certfile: str | None = None
    ssl_keyfile: str | None = None

    # Where `crm-pulse alerts notify` posts (a Slack-compatible incoming webhook; its URL holds a token).
    webhook_url: SecretStr | None = None
    # `crm-pulse alerts notify` routing (docs/alerts.md#notify-route-alerts-to-reps).
    rep_directory: Path | None = None
    notify_channels: frozenset[Literal["slack", "email", "teams", "webhook"]] = frozenset({"slack"})
    slack_bot_token: SecretStr | None = None
    slack_api_url: str = "https://slack.com/api/chat.postMessage"
    smtp_host: str | None = None
    smtp_port: int = Field(587, ge=1, le=65535)
    smtp_starttls: bool = True
    smtp_username: str | None = None
    smtp_password: SecretStr | None = None
    smtp_from: str | None = None
    smtp_cafile: str | None = None
    teams_webhook_url: SecretStr | None = None
    signed_webhook_url: SecretStr | None = None
    signed_webhook_secret: SecretStr | None = None
    crm_record_url: str | None = None
    # Unset: `<app id>-notify-sent` (compacted) and `<app id>-notify-dlq`.
    notify_sent_topic: str | None = None
    notify_dlq_topic: str | None = None
    notify_metrics_host: str = "127.0.0.1"
    notify_metrics_port: int = Field(6067, ge=0, le=65535)
    # When a rep's alerts go out (docs/alerts.md#grouping-digests-and-quiet-hours).
    notify_group_seconds: float = Field(0, ge=0)
    notify_digest: bool = False
    notify_quiet_hours: bool = False
    # Snooze links (docs/alerts.md#snooze-links): notify signs them, `crm-pulse gateway` serves them at this public
    # base URL and publishes each confirmed snooze to the topic notify follows.
    notify_link_secret: SecretStr | None = None
    notify_link_base_url: str | None = None
    notify_link_valid_seconds: float = Field(7 * 86400, gt=0)
    notify_snooze_seconds: float = Field(3 * 86400, gt=0)
    # Unset: `<app id>-notify-snoozes` (compacted).
    notify_snoozes_topic: str | None = None

    # `crm-pulse gateway` (docs/ingestion.md). A source whose secret is unset answers 404.
    gateway_host: str = "127.0.0.1"
    gateway_port: int = Field(8088, ge=0, le=65535)
    # The scheme and host the CRMs call (https://crm-pulse.example.com): HubSpot signs the full URI it called,
    # which a proxy in front of the gateway changes. Unset: the URL the request arrived at.
    gateway_public_url: str | None = None
    gateway_mapping: Path | None = None
    gateway_max_body_bytes: int = Field(1024 * 1024, ge=1024)
    # HubSpot gives up on a webhook after 5 s: answer 503 before it does, so that it retries.
    gateway_ack_timeout_seconds: float = Field(4, gt=0)
    hubspot_client_secret: SecretStr | None = None
    pipedrive_username: str | None = None
    pipedrive_password: SecretStr | None = None
    salesforce_organization_id: str | None = None
    events_signing_secret: SecretStr | None = None

    log_level: str = "info"

    @field_validator("broker")
    @classmethod
    def _kafka_url(cls, value: str | None) -> str | None:
        if value and not value.startswith("kafka://"):
            raise ValueError("CRM_PULSE_BROKER must look like kafka://host:port[,host:port]")
        return value or None

    @field_validator("business_timezone")
    @classmethod
    def _known_zone(cls, value: str) -> str:
        try:
            ZoneInfo(value)
        except (ZoneInfoNotFoundError, ValueError):
            raise ValueError("not an IANA time zone; use a name such as UTC or Europe/Berlin") from None
        return value

    @model_validator(mode="after")
    def _dedupe_outlives_grace(self) -> "Settings":
        # An event id may be forgotten only once a duplicate of it would be rejected as late.
        if self.dedupe_horizon_seconds < self.grace_seconds:
            raise ValueError("CRM_PULSE_DEDUPE_HORIZON_SECONDS must be at least CRM_PULSE_GRACE_SECONDS")
        return self

    @model_validator(mode="after")
    def _baseline_is_a_period(self) -> "Settings":
        if (self.baseline_start is None) != (self.baseline_end is None):
            raise ValueError("set both CRM_PULSE_BASELINE_START and CRM_PULSE_BASELINE_END, or neither")
        if self.baseline_start and self.baseline_start > self.baseline_end:
            raise ValueError("CRM_PULSE_BASELINE_START is after CRM_PULSE_BASELINE_END")
        return self

    @model_validator(mode="after")
    def _sasl_needs_mechanism(self) -> "Settings":
        if self.security_protocol.startswith("SASL_") and not self.sasl_mechanism:
            raise ValueError(f"CRM_PULSE_SECURITY_PROTOCOL={self.security_protocol} needs CRM_PULSE_SASL_MECHANISM")
        return self

    @property
    def effective_notify_sent_topic(self) -> str:
        return self.notify_sent_topic or f"{self.app_id}-notify-sent"

    @model_validator(mode="after")
    def _snooze_links_need_both(self) -> "Settings":
        if (self.notify_link_secret is None) != (self.notify_link_base_url is None):
            raise ValueError("set both CRM_PULSE_NOTIFY_LINK_SECRET and CRM_PULSE_NOTIFY_LINK_BASE_URL, or neither")
        return self

    @property
    def effective_notify_snoozes_topic(self) -> str:
        return self.notify_snoozes_topic or f"{self.app_id}-notify-snoozes"

    @property
    def effective_notify_dlq_topic(self) -> str:
        return self.notify_dlq_topic or f"{self.app_id}-notify-dlq"

    @property
    def on_tansu(self) -> bool:
        """The worker runs with the broker kind resolved (`crm_pulse.broker.broker_for`)."""
        return self.broker_kind == "tansu"

    @property
    def effective_recovery_consistency_check(self) -> bool:
        return not self.on_tansu if self.recovery_consistency_check is None else self.recovery_consistency_check

    @property
    def effective_fetch_max_wait_ms(self) -> int | None:
        """None: Faust's own."""
        return (20 if self.on_tansu else None) if self.fetch_max_wait_ms is None else self.fetch_max_wait_ms

    @cached_property
    def stall_policy(self) -> StallPolicy:
        return StallPolicy(
            stage_days=dict(self.stall_stage_days),
            default_days=self.stall_default_days,
            p90_factor=self.stall_p90_factor,
            p90_min_samples=self.stall_p90_min_samples,
            closed_stages=self.closed_stages,
            deal_stages=self.deal_stages,
        )

    @cached_property
    def deal_policy(self) -> DealPolicy:
        return DealPolicy(
            stage_order={pipeline: tuple(stages) for pipeline, stages in self.deal_stage_order.items()},
            decrease_share=self.deal_amount_decrease_share,
            past_due_grace_ms=int(self.deal_past_due_grace_seconds * 1000),
            closed_stages=self.closed_stages,
        )

    @cached_property
    def business_zone(self) -> ZoneInfo | None:
        """None for UTC: its day numbers are a plain division (`streams.kpis.day_of`)."""
        return None if self.business_timezone == "UTC" else ZoneInfo(self.business_timezone)

    @property
    def baseline_days(self) -> tuple[int, int] | None:
        """The baseline period as (first, last) day numbers of the business time zone, as the KPI sums count days."""
        if self.baseline_start is None or self.baseline_end is None:
            return None
        return (self.baseline_start - EPOCH).days, (self.baseline_end - EPOCH).days

    @property
    def bootstrap_servers(self) -> list[str]:
        assert self.broker, "broker is resolved before clients connect"
        return [host.removeprefix("kafka://") for host in self.broker.split(",")]


# What a setting given as JSON must look like, for the error that says it is not.
JSON_SHAPES = {
    "stall_stage_days": 'a JSON object of stage → days, e.g. {"new": 2, "qualified": 5}',
    "closed_stages": 'a JSON array of stage names, e.g. ["won", "lost"]',
    "deal_stages": 'a JSON array of stage names, e.g. ["proposal", "negotiation"]',
    "deal_stage_order": 'a JSON object of pipeline → its open stages in order, e.g. {"default": ["new", "qualified"]}',
    "notify_channels": 'a JSON array of channels among slack, email, teams, webhook, e.g. ["slack", "email"]',
}


def env_name(field: str) -> str:
    return f"{Settings.model_config['env_prefix']}{field.upper()}"


def worker_environment(**settings: str) -> dict[str, str]:
    """This process's environment with the given settings (field name → the value as its variable holds it),
    for a child process that reads its settings from there."""
    return {**os.environ, **{env_name(field): value for field, value in settings.items()}}


def kafka_cache(default: Path) -> Path:
    """Where Apache Kafka's jars are kept (`crm_pulse.kafka`): CRM_PULSE_KAFKA_CACHE, else `default`. Not a
    setting: the test fixtures and benchmarks that start Apache Kafka have no settings to pass."""
    return Path(os.environ.get("CRM_PULSE_KAFKA_CACHE", default))


def load_settings() -> Settings:
    """Settings from the environment, or SettingsInvalid naming the first setting that is wrong."""
    try:
        # Secrets may also come from files named after their variable (crm_pulse_hubspot_client_secret), as
        # Docker and Kubernetes mount them. Not a setting itself: it says where the settings are.
        return Settings(_secrets_dir=os.environ.get("CRM_PULSE_SECRETS_DIR"))
    except SettingsError as exc:  # a JSON setting that does not parse
        field = match.group(1) if (match := re.search(r'field "(\w+)"', str(exc))) else None
        if field is None:
            raise SettingsInvalid(str(exc)) from exc
        name = env_name(field)
        raise SettingsInvalid(f"{name}={os.environ.get(name)!r} is not JSON: expected {JSON_SHAPES.get(field, 'JSON')}") from exc
    except ValidationError as exc:
        error = exc.errors()[0]
        message = error["msg"].removeprefix("Value error, ")
        if not error["loc"]:  # a rule across settings, whose message names them
            raise SettingsInvalid(message) from exc
        name = env_name(str(error["loc"][0]))
        within = "".join(f"[{part!r}]" for part in error["loc"][1:])
        expected = f" (expected {JSON_SHAPES[error['loc'][0]]})" if error["loc"][0] in JSON_SHAPES else ""
        raise SettingsInvalid(f"{name}={os.environ.get(name)!r}: {within and within + ': '}{message}{expected}") from exc
