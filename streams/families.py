"""Which family agent folds each event type: the lead, customer or signal agent."""

from __future__ import annotations

LEAD_TYPES = frozenset(
    {"lead.created", "lead.stage_changed", "lead.activity", "deal.won", "deal.lost", "deal.updated", "quote.sent",
     "quote.accepted"}
)
STATUS_TYPES = frozenset({"customer.subscribed", "customer.renewed", "customer.cancelled"})
CUSTOMER_TYPES = STATUS_TYPES | {
    "customer.purchase", "survey.response", "ticket.opened", "ticket.contacted", "ticket.resolved", "complaint.filed"
}  # fmt: skip
# Keyed by campaign or CRM user: entities whose only state is what de-duplication and "distinct active" need.
SIGNAL_TYPES = frozenset({"campaign.touch", "marketing.spend", "crm.user_activity"})
# The family agent that folds each event type (its topic is `<app id>-<family>-events`).
FAMILY_OF_TYPE = (
    dict.fromkeys(LEAD_TYPES, "lead") | dict.fromkeys(CUSTOMER_TYPES, "customer") | dict.fromkeys(SIGNAL_TYPES, "signal")
)
OVERALL = "all"
