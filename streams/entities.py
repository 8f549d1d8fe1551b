"""How customer and CRM-user events fold into their entity's state, and the deltas they contribute to the
keyed aggregates (leads have their own module, streams.leads)."""

from __future__ import annotations

from datetime import tzinfo

from crm_pulse.streams.catalogue import actor_facts, customer_facts
from crm_pulse.streams.families import STATUS_TYPES
from crm_pulse.streams.kpis import counter_deltas, insert_sorted, subscription_intervals


def apply_customer_event(customer: dict, event: dict, zone: tzinfo | None = None):
    """Fold a customer event into its state; return (spell deltas [(start_day, end_day, ±1)] in `zone`'s days,
    fact deltas [(fact, ±1)] from `customer_facts`)."""
    kind, at = event["type"], event["occurred_at"]
    timeline = customer.setdefault("timeline", [])
    spells_before, facts_before = subscription_intervals(timeline, zone), customer_facts(customer)
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
    spell_deltas = [(start, end, sign) for (start, end), sign in counter_deltas(spells_before, subscription_intervals(timeline, zone))]
    return spell_deltas, list(counter_deltas(facts_before, customer_facts(customer)))


def apply_actor_activity(actor: dict, at: int, field: str) -> list:
    """A user's or rep's activity at `at`: fact deltas [(fact, ±1)] for the distinct-active counts."""
    before = actor_facts(actor, field)
    actor["last_active"] = max(actor.get("last_active") or at, at)
    return list(counter_deltas(before, actor_facts(actor, field)))
