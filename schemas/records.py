"""Contracts of what crm-pulse publishes: `crm-alerts` records and `crm-events-dlq` records, version 1."""

from __future__ import annotations

import base64
import time
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from crm_pulse.schemas.events import ms_to_iso
from crm_pulse.schemas.validate import REASONS


class _Record(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Alert(_Record):
    """A stalled-lead alert; the Kafka message key is `rep_id`, so a notifier can route by rep."""

    schema_version: Literal[1] = 1
    alert_id: str = Field(description="Deterministic: the same stall of the same lead always has the same id.")
    type: Literal["lead.stalled", "lead.stall_escalated", "lead.stall_cleared"]
    lead_id: str
    rep_id: str = Field(description='The owning rep, or "unassigned".')
    team_id: str | None
    pipeline: str | None
    stage: str = Field(description="The stage the lead stalled in.")
    idle_since: str = Field(description="ISO-8601 UTC: the later of entering the stage and the last activity.")
    idle_seconds: float = Field(description="Idle time when the rule fired (or, for cleared, when it moved).")
    threshold_seconds: float
    rule: Literal["stage_threshold", "p90_dwell"]
    detected_at: str = Field(description="ISO-8601 UTC event time at which the stall began, escalated or cleared.")
    # Additive fields of version 1: absent from records of workers older than them (docs/alerts.md#versioning).
    account_id: str | None = Field(None, description="The latest account seen on the lead's events.")
    deal_value: float | None = Field(None, description="The amount of the lead's latest quote (quote.sent).")


class DealAlert(_Record):
    """A deal inspection alert (docs/deals.md), version 2 of the `crm-alerts` record: stall alerts stay version 1,
    so a v1 consumer skips these as a version it does not read. Keyed by `rep_id`, like the stall alerts."""

    schema_version: Literal[2] = 2
    alert_id: str = Field(description="Deterministic: uuid5 of the type, the lead and the occurrence.")
    type: Literal["deal.close_date_slipped", "deal.past_due", "deal.stage_regressed", "deal.amount_decreased",
                  "deal.health_dropped"]  # fmt: skip
    lead_id: str
    rep_id: str = Field(description='The owning rep, or "unassigned".')
    team_id: str | None
    pipeline: str | None
    account_id: str | None
    stage: str | None = Field(description="The deal's stage at detected_at.")
    detected_at: str = Field(description="ISO-8601 UTC event time of the occurrence.")
    amount: float | None = Field(description="The deal's amount (for slipped, decreased, past due: at the occurrence).")
    close_date: str | None = Field(description="ISO-8601 UTC expected close date (as amount).")
    previous_close_date: str | None = Field(description="close_date_slipped: the close date before the push.")
    push_count: int | None = Field(description="close_date_slipped: the pushes so far, this one included.")
    previous_amount: float | None = Field(description="amount_decreased: the amount before.")
    decrease_ratio: float | None = Field(description="amount_decreased: (previous - amount) / previous.")
    from_stage: str | None = Field(description="stage_regressed: the stage it left.")
    to_stage: str | None = Field(description="stage_regressed: the earlier stage it entered.")
    health: float | None = Field(description="health_dropped: the deal's health score, 0-100.")
    health_band: str | None = Field(description="health_dropped: the band it dropped to.")
    previous_health_band: str | None = Field(description="health_dropped: the band it dropped from.")


class SourcePosition(_Record):
    topic: str
    partition: int
    offset: int


class GatewaySource(_Record):
    """`crm-pulse gateway` dead-lettered it before publishing: the webhook endpoint it came to."""

    gateway: Literal["hubspot", "pipedrive", "salesforce", "events"]


# A verified webhook notification the gateway's mappings cannot turn into events (docs/ingestion.md).
GATEWAY_REASONS = ("untranslatable",)


class DeadLetter(_Record):
    """An input message that could not be processed, with the reason and its original bytes."""

    schema_version: Literal[1] = 1
    reason: Literal[REASONS + GATEWAY_REASONS]  # type: ignore[valid-type]
    error: str
    source: SourcePosition | GatewaySource
    key_base64: str | None
    original_base64: str
    dead_lettered_at: str


def dead_letter_record(reason: str, detail: str, source: dict, key: bytes | None, original: bytes) -> dict:
    """A `DeadLetter` as published: by the worker (source: the input position) and the gateway (its endpoint)."""
    return {
        "schema_version": 1,
        "reason": reason,
        "error": detail,
        "source": source,
        "key_base64": base64.b64encode(key).decode() if key is not None else None,
        "original_base64": base64.b64encode(original).decode(),
        "dead_lettered_at": ms_to_iso(int(time.time() * 1000)),
    }


class NotificationDeadLetter(_Record):
    """A delivery `crm-pulse alerts notify` gave up on, with the reason and the alert as it was published."""

    schema_version: Literal[1] = 1
    alert_id: str
    channel: Literal["slack", "email", "teams", "webhook"] | None = Field(
        description="The channel that failed, or null when the alert had nobody to go to."
    )
    recipient: str | None = Field(description='"rep:<id>", "manager:<id>", "team:<id>", "all" or null.')
    reason: str
    alert: dict
    dead_lettered_at: str
