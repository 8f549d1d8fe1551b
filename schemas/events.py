"""The CRM event contract, version 1: one envelope for every event, a typed payload per event type.

Producers key each message by `lead_id` (lead and deal events) or `customer_id` (customer events):
per-entity state and de-duplication by `event_id` rely on every event of an entity sharing a partition.
"""

from __future__ import annotations

import re
import zlib
from datetime import datetime, timezone
from typing import Annotated, Literal, Union

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, TypeAdapter, WithJsonSchema

SCHEMA_VERSION = 1

Id = Annotated[str, Field(min_length=1, max_length=128)]


ISO_8601 = re.compile(r"\d{4}-\d{2}-\d{2}T\d{2}:\d{2}(:\d{2}(\.\d{1,6})?)?(Z|[+-]\d{2}:\d{2})")
LAST_MS = 32503680000000  # year 3000
CAMPAIGN_KEY_BUCKETS = 16


def to_epoch_ms(value: object) -> int:
    """Event time as epoch milliseconds: ISO-8601 strings must carry a UTC offset; ints are epoch ms."""
    if isinstance(value, bool):
        raise ValueError("timestamp must be ISO-8601 with offset or epoch milliseconds, not a boolean")
    if isinstance(value, int):
        if not 0 <= value < LAST_MS:
            raise ValueError(f"epoch milliseconds out of range: {value}")
        return value
    if isinstance(value, str):
        # fromisoformat alone accepts more than ISO-8601 (e.g. a trailing NUL); the offset is required.
        if not ISO_8601.fullmatch(value):
            raise ValueError(f"timestamp {value[:64]!r} is not ISO-8601 with a UTC offset")
        try:
            parsed = datetime.fromisoformat(value.replace("Z", "+00:00"))
        except ValueError:
            raise ValueError(f"unparseable timestamp {value[:64]!r}") from None
        ms = int(parsed.replace(microsecond=0).timestamp()) * 1000 + parsed.microsecond // 1000
        if not 0 <= ms < LAST_MS:
            raise ValueError(f"timestamp {value[:64]!r} is before 1970 or after 2999")
        return ms
    raise ValueError("timestamp must be ISO-8601 with offset or epoch milliseconds")


def ms_to_iso(ms: int) -> str:
    """Always millisecond precision, so that consumers can parse every timestamp with one format."""
    return datetime.fromtimestamp(ms / 1000, tz=timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


EventTime = Annotated[
    int,
    BeforeValidator(to_epoch_ms),
    WithJsonSchema(
        {
            "description": "Event time: ISO-8601 with UTC offset, or epoch milliseconds.",
            "anyOf": [{"type": "string", "format": "date-time"}, {"type": "integer", "minimum": 0}],
        }
    ),
]


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)


Currency = Annotated[str, Field(pattern="^[A-Z]{3}$")]


class LeadCreated(_Model):
    source: Id
    campaign: Id | None = None
    score: int | None = Field(default=None, ge=0, le=100)
    stage: Id = "new"
    # Additive v1: a lead created as an open deal may carry its amount and expected close date.
    amount: float | None = Field(default=None, ge=0, allow_inf_nan=False)
    close_date: EventTime | None = None


class LeadStageChanged(_Model):
    from_stage: Id = Field(alias="from")
    to_stage: Id = Field(alias="to")
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)


class LeadActivity(_Model):
    kind: Literal["call", "email", "meeting", "note"]
    direction: Literal["inbound", "outbound"]


class DealWon(_Model):
    amount: float = Field(ge=0, allow_inf_nan=False)
    currency: Annotated[str, Field(pattern="^[A-Z]{3}$")] = "USD"


class DealUpdated(_Model):
    """The open deal's current amount and expected close date: a snapshot, not a change, so a lost or
    duplicated update never leaves the deal half-updated."""

    amount: float = Field(ge=0, allow_inf_nan=False)
    currency: Currency = "USD"
    close_date: EventTime
    forecast_category: Literal["pipeline", "best_case", "commit", "closed", "omitted"] | None = None


class DealLost(_Model):
    reason: Annotated[str, Field(min_length=1, max_length=256)]


class CustomerSubscribed(_Model):
    plan: Id | None = None
    amount: float | None = Field(default=None, ge=0, allow_inf_nan=False)


class CustomerRenewed(_Model):
    amount: float | None = Field(default=None, ge=0, allow_inf_nan=False)


class CustomerCancelled(_Model):
    reason: Annotated[str, Field(max_length=256)] | None = None


class Purchase(_Model):
    amount: float = Field(ge=0, allow_inf_nan=False)
    currency: Annotated[str, Field(pattern="^[A-Z]{3}$")] = "USD"


class QuoteSent(_Model):
    quote_id: Id
    amount: float = Field(ge=0, allow_inf_nan=False)


class QuoteAccepted(_Model):
    quote_id: Id


class SurveyResponse(_Model):
    """Net Promoter (0-10) and/or Customer Effort (1-7, lower is easier) answers."""

    nps: int | None = Field(default=None, ge=0, le=10)
    effort: int | None = Field(default=None, ge=1, le=7)


class Ticket(_Model):
    ticket_id: Id


class Complaint(_Model):
    category: Id | None = None


class CampaignTouch(_Model):
    campaign: Id
    kind: Literal["touch", "click", "response"]


class MarketingSpend(_Model):
    campaign: Id
    amount: float = Field(ge=0, allow_inf_nan=False)
    purpose: Literal["acquisition", "retention"]


class UserActivity(_Model):
    action: Annotated[str, Field(min_length=1, max_length=64)]


class _Envelope(_Model):
    schema_version: Literal[1] = SCHEMA_VERSION
    event_id: Id
    occurred_at: EventTime
    lead_id: Id | None = None
    deal_id: Id | None = None
    customer_id: Id | None = None
    account_id: Id | None = None
    rep_id: Id | None = None
    team_id: Id | None = None
    pipeline: Id | None = None
    user_id: Id | None = None


class _LeadEvent(_Envelope):
    lead_id: Id

    @property
    def key(self) -> str:
        return self.lead_id


class _CustomerEvent(_Envelope):
    customer_id: Id

    @property
    def key(self) -> str:
        return self.customer_id


class _CampaignEvent(_Envelope):
    @property
    def key(self) -> str:
        # A campaign's events are independent of each other; only de-duplication keeps state for them. Spread
        # over buckets by event id, a busy campaign's recent ids are not one ever-growing state.
        return f"{self.payload.campaign}#{zlib.crc32(self.event_id.encode()) % CAMPAIGN_KEY_BUCKETS}"


class _UserEvent(_Envelope):
    user_id: Id

    @property
    def key(self) -> str:
        return self.user_id


class LeadCreatedEvent(_LeadEvent):
    type: Literal["lead.created"]
    payload: LeadCreated


class LeadStageChangedEvent(_LeadEvent):
    type: Literal["lead.stage_changed"]
    payload: LeadStageChanged


class LeadActivityEvent(_LeadEvent):
    type: Literal["lead.activity"]
    payload: LeadActivity


class DealWonEvent(_LeadEvent):
    type: Literal["deal.won"]
    payload: DealWon


class DealUpdatedEvent(_LeadEvent):
    type: Literal["deal.updated"]
    payload: DealUpdated


class DealLostEvent(_LeadEvent):
    type: Literal["deal.lost"]
    payload: DealLost


class CustomerSubscribedEvent(_CustomerEvent):
    type: Literal["customer.subscribed"]
    payload: CustomerSubscribed = CustomerSubscribed()


class CustomerRenewedEvent(_CustomerEvent):
    type: Literal["customer.renewed"]
    payload: CustomerRenewed = CustomerRenewed()


class CustomerCancelledEvent(_CustomerEvent):
    type: Literal["customer.cancelled"]
    payload: CustomerCancelled = CustomerCancelled()


class QuoteSentEvent(_LeadEvent):
    type: Literal["quote.sent"]
    payload: QuoteSent


class QuoteAcceptedEvent(_LeadEvent):
    type: Literal["quote.accepted"]
    payload: QuoteAccepted


class PurchaseEvent(_CustomerEvent):
    type: Literal["customer.purchase"]
    payload: Purchase


class SurveyResponseEvent(_CustomerEvent):
    type: Literal["survey.response"]
    payload: SurveyResponse


class TicketOpenedEvent(_CustomerEvent):
    type: Literal["ticket.opened"]
    payload: Ticket


class TicketContactedEvent(_CustomerEvent):
    type: Literal["ticket.contacted"]
    payload: Ticket


class TicketResolvedEvent(_CustomerEvent):
    type: Literal["ticket.resolved"]
    payload: Ticket


class ComplaintEvent(_CustomerEvent):
    type: Literal["complaint.filed"]
    payload: Complaint = Complaint()


class CampaignTouchEvent(_CampaignEvent):
    type: Literal["campaign.touch"]
    payload: CampaignTouch


class MarketingSpendEvent(_CampaignEvent):
    type: Literal["marketing.spend"]
    payload: MarketingSpend


class UserActivityEvent(_UserEvent):
    type: Literal["crm.user_activity"]
    payload: UserActivity


EVENT_CLASSES = (
    LeadCreatedEvent,
    LeadStageChangedEvent,
    LeadActivityEvent,
    DealWonEvent,
    DealLostEvent,
    CustomerSubscribedEvent,
    CustomerRenewedEvent,
    CustomerCancelledEvent,
    QuoteSentEvent,
    QuoteAcceptedEvent,
    PurchaseEvent,
    SurveyResponseEvent,
    TicketOpenedEvent,
    TicketContactedEvent,
    TicketResolvedEvent,
    ComplaintEvent,
    CampaignTouchEvent,
    MarketingSpendEvent,
    UserActivityEvent,
    DealUpdatedEvent,
)
EVENT_TYPES: tuple[str, ...] = tuple(cls.model_fields["type"].annotation.__args__[0] for cls in EVENT_CLASSES)
CrmEvent = Annotated[Union[EVENT_CLASSES], Field(discriminator="type")]
EVENT_ADAPTER: TypeAdapter[CrmEvent] = TypeAdapter(CrmEvent)
