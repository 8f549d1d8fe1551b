"""Where each validated event goes, and the deltas it contributes to keyed aggregates."""

from __future__ import annotations

from streams.kpis import counter_deltas, day_of, insert_sorted, subscription_intervals

LEAD_TYPES = frozenset({"lead.created", "lead.stage_changed", "lead.activity", "deal.won", "deal.lost"})
CUSTOMER_TYPES = frozenset({"customer.subscribed", "customer.renewed", "customer.cancelled"})
OVERALL = "all"


def first_seen(entity: dict, event: dict, watermark_ms: int | None, horizon_ms: int) -> bool:
    """Record the event_id in the entity's state; False if it was already applied.

    Ids older than the horizon behind the watermark are forgotten: an event that old is dead-lettered as
    late before it gets here (the horizon is at least the grace period).
    """
    seen = entity.setdefault("seen", {})
    if event["event_id"] in seen:
        return False
    seen[event["event_id"]] = event["occurred_at"]
    if watermark_ms is not None:
        oldest = watermark_ms - horizon_ms
        for event_id in [e for e, at in seen.items() if at < oldest]:
            del seen[event_id]
    return True


def outcome_deltas(event: dict) -> list[tuple[str, dict]]:
    """A won or lost deal counts once overall and once for its rep: [(scope, delta)]."""
    won = int(event["type"] == "deal.won")
    delta = {"day": day_of(event["occurred_at"]), "won": won, "lost": 1 - won}
    scopes = [OVERALL]
    if event.get("rep_id"):
        scopes.append(f"rep:{event['rep_id']}")
    return [(scope, delta) for scope in scopes]


def apply_customer_event(customer: dict, event: dict) -> list[tuple[int, int | None, int]]:
    """Fold a customer status event into its timeline; return spell deltas [(start_day, end_day, ±1)]."""
    timeline = customer.setdefault("timeline", [])
    before = subscription_intervals(timeline)
    insert_sorted(timeline, [event["occurred_at"], event["event_id"], event["type"].removeprefix("customer.")])
    return [(start, end, sign) for (start, end), sign in counter_deltas(before, subscription_intervals(timeline))]
