"""Deal inspection: a deal's amount and close-date history, and the alerts read from it (close date slipped,
past due, stage regressed, amount decreased). Pure functions over the lead's plain dict (docs/deals.md).

Every alert is an occurrence found in the lead's event-time history, not in the order events arrived: a late
event that completes the history raises what it reveals, and an alert's id names its occurrence, so it is
raised once (the ids raised are kept on the lead) and a replay raises the same ids.
"""

from __future__ import annotations

import heapq
import uuid
from dataclasses import dataclass, field

from crm_pulse.schemas.events import ms_to_iso
from crm_pulse.streams.catalogue import stage_history
from crm_pulse.streams.kpis import insert_sorted
from crm_pulse.streams.leads import ALERT_NAMESPACE, UNASSIGNED

DEAL_ALERT_SCHEMA_VERSION = 2
SLIPPED, PAST_DUE, REGRESSED, DECREASED = (
    "deal.close_date_slipped", "deal.past_due", "deal.stage_regressed", "deal.amount_decreased"
)  # fmt: skip
HEALTH_DROPPED = "deal.health_dropped"
DEAL_ALERT_TYPES = (SLIPPED, PAST_DUE, REGRESSED, DECREASED, HEALTH_DROPPED)
DEFAULT_PIPELINE = "default"
# Fields only some deal alert types fill; null on the others, so every record has every field.
DETAIL_FIELDS = ("previous_close_date", "push_count", "previous_amount", "decrease_ratio", "from_stage", "to_stage",
                 "health", "health_band", "previous_health_band")  # fmt: skip


@dataclass(frozen=True)
class DealPolicy:
    # Each pipeline's open stages, first to last; a lead without a configured pipeline uses "default".
    stage_order: dict[str, tuple[str, ...]] = field(
        default_factory=lambda: {DEFAULT_PIPELINE: ("new", "qualified", "proposal", "negotiation")}
    )
    # An amount update is a decrease worth an alert when it cuts the amount by at least this share.
    decrease_share: float = 0.2
    # A deal is past due this long after its close date: 1 day, so a date is due by the end of that day.
    past_due_grace_ms: int = 86_400_000
    closed_stages: frozenset[str] = frozenset({"won", "lost"})

    def order(self, pipeline: str | None) -> tuple[str, ...]:
        return self.stage_order.get(pipeline or DEFAULT_PIPELINE) or self.stage_order.get(DEFAULT_PIPELINE, ())


def updates(lead: dict) -> list:
    """[[at, event_id, amount, close_ms, forecast_category], ...] in event time (.get: leads stored before)."""
    return lead.get("deal_updates") or []


def apply_deal_event(lead: dict, event: dict) -> None:
    """Keep the amount and close date snapshots of `deal.updated` (and of a `lead.created` that has both)."""
    payload = event["payload"]
    if event["type"] == "deal.updated":
        entry = [event["occurred_at"], event["event_id"], payload["amount"], payload["close_date"],
                 payload.get("forecast_category")]  # fmt: skip
    elif event["type"] == "lead.created" and payload.get("amount") is not None and payload.get("close_date") is not None:
        entry = [event["occurred_at"], event["event_id"], payload["amount"], payload["close_date"], None]
    else:
        return
    insert_sorted(lead.setdefault("deal_updates", []), entry)


def lead_time(lead: dict, at: int) -> int:
    """The latest event time seen on the lead, `at` included: how far its history is known (.get: leads
    stored before)."""
    lead["seen_until"] = max(lead.get("seen_until") or at, at)
    return lead["seen_until"]


def fold_deal_alerted(lead: dict, occurrences_raised: list[str]) -> bool:
    """Record the occurrences ("<type>|<key>") whose alerts the timer raised; True if any was new to the lead.
    A new list, not an append: the timer folds into shallow copies of the saved leads, which the lead agent
    alone writes."""
    raised = lead.get("deal_alerted") or []
    new = [occurrence for occurrence in occurrences_raised if occurrence not in raised]
    lead["deal_alerted"] = raised + new
    return bool(new)


def current_deal(lead: dict) -> tuple[float, int] | None:
    """(amount, close_ms) of the latest snapshot in event time, or None."""
    history = updates(lead)
    return (history[-1][2], history[-1][3]) if history else None


def stage_at(lead: dict, at: int) -> str | None:
    stage = None
    for entered, _, name in stage_history(lead):
        if entered > at:
            break
        stage = name
    return stage


def occurrences(lead: dict, policy: DealPolicy, now_ms: int) -> list[dict]:
    """Every deal alert the lead's history holds as of `now_ms`, as (type, id key, detected_at, details)."""
    found = []
    history = updates(lead)
    pushes = 0
    for previous, current in zip(history, history[1:]):
        at, event_id, amount, close_ms = current[:4]
        if close_ms > previous[3]:
            pushes += 1
            found.append((SLIPPED, event_id, at, {"previous_close_date": ms_to_iso(previous[3]), "push_count": pushes,
                                                  "close_date": ms_to_iso(close_ms), "amount": amount}))  # fmt: skip
        if previous[2] > 0 and previous[2] - amount >= policy.decrease_share * previous[2] - 1e-9:
            found.append((DECREASED, event_id, at, {"previous_amount": previous[2], "amount": amount,
                                                    "decrease_ratio": (previous[2] - amount) / previous[2]}))  # fmt: skip
    # Past due: a close date passed (by the grace: a close date given as a day is due by its end) while it
    # was in force and the deal open. Keyed by the date, so setting the same date again raises nothing new.
    for i, (set_at, _, amount, close_ms, _) in enumerate(history):
        in_force_until = history[i + 1][0] if i + 1 < len(history) else now_ms + 1
        due_at = max(close_ms + policy.past_due_grace_ms, set_at)
        if close_ms + policy.past_due_grace_ms < now_ms and due_at < in_force_until:
            stage = stage_at(lead, due_at)
            if stage is not None and stage not in policy.closed_stages:
                found.append((PAST_DUE, str(close_ms), due_at, {"close_date": ms_to_iso(close_ms), "amount": amount}))
    order = {stage: rank for rank, stage in enumerate(policy.order(lead["pipeline"]))}
    timeline = stage_history(lead)
    for previous, current in zip(timeline, timeline[1:]):
        if current[2] in order and previous[2] in order and order[current[2]] < order[previous[2]]:
            found.append((REGRESSED, current[1], current[0], {"from_stage": previous[2], "to_stage": current[2]}))
    return found


def deal_alerts(lead: dict, lead_id: str, policy: DealPolicy, now_ms: int) -> list[dict]:
    """The deal alerts of occurrences not raised before, in event time; marks them raised on the lead."""
    # The occurrences raised, as "<type>|<key>" (the alert id is derived from it only for a new one).
    raised = list(lead.get("deal_alerted") or ())  # a new list: `lead` may be a shallow copy (as above)
    alerts = []
    for kind, key, detected_at, details in sorted(occurrences(lead, policy, now_ms), key=lambda o: (o[2], o[0])):
        if (occurrence := f"{kind}|{key}") not in raised:
            raised.append(occurrence)
            alert_id = str(uuid.uuid5(ALERT_NAMESPACE, f"{kind}|{lead_id}|{key}"))
            alerts.append(deal_alert(kind, alert_id, lead, lead_id, detected_at, details))
    lead["deal_alerted"] = raised
    return alerts


def deal_alert(kind: str, alert_id: str, lead: dict, lead_id: str, detected_at: int, details: dict) -> dict:
    deal = current_deal(lead)
    return {
        "schema_version": DEAL_ALERT_SCHEMA_VERSION,
        "alert_id": alert_id,
        "type": kind,
        "lead_id": lead_id,
        "rep_id": lead["rep"] or UNASSIGNED,
        "team_id": lead["team"],
        "pipeline": lead["pipeline"],
        "account_id": lead.get("account"),
        # At the occurrence, not when raised: the timer and an event of the deal raise the same record.
        "stage": stage_at(lead, detected_at),
        "detected_at": ms_to_iso(detected_at),
        "amount": deal[0] if deal else None,
        "close_date": ms_to_iso(deal[1]) if deal else None,
        **dict.fromkeys(DETAIL_FIELDS),
        **details,
    }


def quiet_occurrence(band: str, at: int) -> str:
    """What names a quiet deal's drop to `band` at `at` among the occurrences raised (streams/health.py:
    `quiet_drops`)."""
    return f"{HEALTH_DROPPED}|quiet:{band}@{at}"


def next_quiet_drop(lead: dict) -> int | None:
    """When the quiet deal falls to a worse band next, as foreseen at its last write, unless raised already."""
    raised = lead.get("deal_alerted") or ()
    return next((at for at, band, _ in lead.get("health_quiet") or () if quiet_occurrence(band, at) not in raised),
                None)  # fmt: skip


def past_due_at(lead: dict, policy: DealPolicy) -> int | None:
    """When the open deal's close date in force falls due, or None: what the timer waits for."""
    deal = current_deal(lead)
    stage = stage_history(lead)[-1][2] if lead["timeline"] else None
    if deal is None or stage is None or stage in policy.closed_stages:
        return None
    return max(deal[1] + policy.past_due_grace_ms, updates(lead)[-1][0])


class DueIndex:
    """Open deals by when they fall past due or to a worse health band, for the timer: only those due by now
    are looked at."""

    def __init__(self, policy: DealPolicy):
        self.policy = policy
        self.due_at: dict[str, int] = {}
        self._heap: list[tuple[int, str]] = []

    def rebuild(self, leads) -> None:
        self.__init__(self.policy)
        for lead_id, lead in leads:
            self.update(lead_id, lead)

    def update(self, lead_id: str, lead: dict) -> None:
        past_due = past_due_at(lead, self.policy)
        if past_due is not None and f"{PAST_DUE}|{current_deal(lead)[1]}" in (lead.get("deal_alerted") or ()):
            past_due = None
        at = min((t for t in (past_due, next_quiet_drop(lead)) if t is not None), default=None)
        if at is None:
            self.due_at.pop(lead_id, None)
            return
        if self.due_at.get(lead_id) != at:
            self.due_at[lead_id] = at
            heapq.heappush(self._heap, (at, lead_id))
            if len(self._heap) > 2 * len(self.due_at) + 1024:  # drop the entries lazy deletion left behind
                self._heap = [(due, lead) for lead, due in self.due_at.items()]
                heapq.heapify(self._heap)

    def discard(self, lead_id: str) -> None:
        self.due_at.pop(lead_id, None)

    def due(self, now_ms: int) -> list[str]:
        found = []
        while self._heap and self._heap[0][0] < now_ms:
            at, lead_id = heapq.heappop(self._heap)
            if self.due_at.get(lead_id) == at:
                del self.due_at[lead_id]
                found.append(lead_id)
        return found
