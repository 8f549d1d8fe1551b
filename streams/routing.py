"""Where each validated event goes, and the deltas it contributes to keyed aggregates."""

from __future__ import annotations

from streams.catalogue import actor_facts, customer_facts
from streams.kpis import counter_deltas, insert_sorted, subscription_intervals

LEAD_TYPES = frozenset(
    {"lead.created", "lead.stage_changed", "lead.activity", "deal.won", "deal.lost", "quote.sent", "quote.accepted"}
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


def first_seen(entity: dict, event: dict, source: int, offset: int, forget_before_ms: int | None) -> bool:
    """Record in the entity's state that it applied the event read at `offset` of input partition `source`;
    False if it did already.

    Two ways an event comes back. After a crash or a hand-over, ingest re-reads its input from the last
    commit: the same input message, at a position the entity has passed on that partition (an exact test,
    since one partition's events reach an entity in order). A producer that sends an event twice makes a
    new message with the same event_id: ids are kept until they are older than `forget_before_ms` (None:
    keep all). The caller passes the slowest input partition's latest event time less the dedupe horizon
    (at least the grace period): by then a duplicate is dead-lettered as late by whichever partition it
    comes through, as every one has read that far.
    """
    read = entity.setdefault("read", {})
    if offset <= read.get(str(source), -1):
        return False
    seen = entity.setdefault("seen", {})
    if event["event_id"] in seen:
        return False
    read[str(source)] = offset
    at = event["occurred_at"]
    if forget_before_ms is None or at >= forget_before_ms:
        seen[event["event_id"]] = at
    if forget_before_ms is None:
        return True
    # Ids are kept in arrival order, nearly event-time order: forget from the oldest on, stopping at the
    # first id still inside the horizon (an out-of-order id behind it is kept a little longer, never less).
    forgotten = []
    for event_id, seen_at in seen.items():
        if seen_at >= forget_before_ms:
            break
        forgotten.append(event_id)
    for event_id in forgotten:
        del seen[event_id]
    return True


def already_applied(state: dict, origin: str, offset: int, seq: int) -> bool:
    """Idempotence for re-sent deltas: each names its origin (an entity agent and its input partition), the
    input offset that caused it and its sequence number among that input's deltas. An aggregate records,
    atomically with its value, the highest (offset, seq) applied per origin; a replay after a crash re-sends
    the same ids, in the same order."""
    marks = state.setdefault("applied", {})
    position = [offset, seq]
    if origin in marks and position <= marks[origin]:
        return True
    marks[origin] = position
    return False


def apply_customer_event(customer: dict, event: dict):
    """Fold a customer event into its state; return (spell deltas [(start_day, end_day, ±1)],
    fact deltas [(fact, ±1)] from `customer_facts`)."""
    kind, at = event["type"], event["occurred_at"]
    timeline = customer.setdefault("timeline", [])
    spells_before, facts_before = subscription_intervals(timeline), customer_facts(customer)
    if kind in STATUS_TYPES:
        insert_sorted(timeline, [at, event["event_id"], kind.removeprefix("customer.")])
    elif kind == "customer.purchase":
        customer["last_purchase"] = max(customer.get("last_purchase") or at, at)
    elif kind.startswith("ticket."):
        ticket = customer.setdefault("tickets", {}).setdefault(event["payload"]["ticket_id"], {})
        if kind == "ticket.opened":
            ticket["opened"] = at
        elif kind == "ticket.contacted":
            ticket.setdefault("contacts", []).append(at)
        else:
            ticket["resolved"] = at
    spell_deltas = [(start, end, sign) for (start, end), sign in counter_deltas(spells_before, subscription_intervals(timeline))]
    return spell_deltas, list(counter_deltas(facts_before, customer_facts(customer)))


def apply_actor_activity(actor: dict, at: int, field: str) -> list:
    """A user's or rep's activity at `at`: fact deltas [(fact, ±1)] for the distinct-active counts."""
    before = actor_facts(actor, field)
    actor["last_active"] = max(actor.get("last_active") or at, at)
    return list(counter_deltas(before, actor_facts(actor, field)))
