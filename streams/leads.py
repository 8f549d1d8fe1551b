"""Per-lead state and stalled-lead detection: pure functions over a plain dict per lead.

A lead is idle since the later of entering its current stage and its latest activity. It is stalled
once idle longer than its stage's threshold, escalated at twice that, and cleared when it moves or gets
activity. Stall times are event times (idle_since + threshold), so the same events give the same alerts
whether they are checked by the live timer or replayed in a burst.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from typing import Callable

from crm_pulse.schemas.events import ms_to_iso
from crm_pulse.streams.catalogue import lead_facts, stage_history
from crm_pulse.streams.kpis import DAY_MS, counter_deltas, insert_sorted

ALERT_SCHEMA_VERSION = 1
ALERT_NAMESPACE = uuid.UUID("5b0c1f3e-6d2a-4f57-9a43-2f1d3c8e7a10")
STALLED, ESCALATED, CLEARED = "lead.stalled", "lead.stall_escalated", "lead.stall_cleared"
ALERT_TYPES = (STALLED, ESCALATED, CLEARED)
RULE_STAGE_THRESHOLD, RULE_P90 = "stage_threshold", "p90_dwell"
UNASSIGNED = "unassigned"


@dataclass(frozen=True)
class StallPolicy:
    stage_days: dict[str, float] = field(default_factory=dict)
    default_days: float = 7.0
    p90_factor: float = 2.0
    p90_min_samples: int = 20
    closed_stages: frozenset[str] = frozenset({"won", "lost"})
    # A lead becomes a deal on first entering one of these stages (or on being won).
    deal_stages: frozenset[str] = frozenset({"proposal", "negotiation"})

    def threshold(self, stage: str, p90_seconds: float | None, samples: int) -> tuple[int, str]:
        """(threshold_ms, rule): the configured days for the stage, or k × the stage's observed p90
        dwell when that is shorter and rests on enough history."""
        configured = int(self.stage_days.get(stage, self.default_days) * DAY_MS)
        if p90_seconds is not None and samples >= self.p90_min_samples:
            learned = int(self.p90_factor * p90_seconds * 1000)
            if 0 < learned < configured:
                return learned, RULE_P90
        return configured, RULE_STAGE_THRESHOLD


ThresholdFn = Callable[[str], tuple[int, str]]


def new_lead() -> dict:
    return {"timeline": [], "last_activity": None, "rep": None, "team": None, "pipeline": None, "created": None,
            "created_id": None, "stall_level": 0, "stall_threshold": None, "stall_rule": None}  # fmt: skip


def current_stage(lead: dict) -> str | None:
    return stage_history(lead)[-1][2] if lead["timeline"] else None


def idle_since(lead: dict) -> int | None:
    if not lead["timeline"]:
        return lead["last_activity"]
    return max(stage_history(lead)[-1][0], lead["last_activity"] or 0)


def is_open(lead: dict, policy: StallPolicy) -> bool:
    stage = current_stage(lead)
    return stage is not None and stage not in policy.closed_stages


def _stage_entered(event: dict) -> str | None:
    kind = event["type"]
    if kind == "lead.created":
        return event["payload"]["stage"]
    if kind == "lead.stage_changed":
        return event["payload"]["to"]
    if kind == "deal.won":
        return "won"
    if kind == "deal.lost":
        return "lost"
    return None


def _changes_facts(lead: dict, event: dict, stage: str | None) -> bool:
    """Whether the event changes what `lead_facts` reads: the stage history (its entries and the creation),
    the source, campaign and score, the won amount, or the rep (the latest event in event time owns the lead,
    as `apply_lead_event` applies it)."""
    if stage is not None or event["type"] == "lead.created":  # a stage entered (deal.won with its amount too)
        return True
    rep = event.get("rep_id")
    return rep is not None and rep != lead["rep"] and event["occurred_at"] >= (lead.get("owner_at") or 0)


def apply_lead_event(lead: dict, event: dict, lead_id: str, policy: StallPolicy, threshold: ThresholdFn):
    """Fold one validated event into `lead`; return (fact deltas [(fact, ±1)] from `lead_facts`, alerts).
    The facts are derived only around an event that changes what they read (a lead's stage changes, creation,
    win and loss, a new rep): most events (activities, quotes, deal updates) leave them as they were."""
    at = event["occurred_at"]
    alerts: list[dict] = []
    before_idle = idle_since(lead)
    if before_idle is not None and at > before_idle and is_open(lead, policy):
        # Catch up on a stall the timer may not have seen before this event ended it.
        alerts += check_stall(lead, lead_id, at, policy, threshold)

    before_stage = current_stage(lead)
    stage = _stage_entered(event)
    before = lead_facts(lead, policy.deal_stages) if _changes_facts(lead, event, stage) else None
    if stage is not None:
        insert_sorted(lead["timeline"], [at, event["event_id"], stage])
    payload = event["payload"]
    if event["type"] == "lead.activity":
        lead["last_activity"] = max(lead["last_activity"] or at, at)
    elif event["type"] == "lead.created":
        lead.update(created=at, created_id=event["event_id"], source=payload["source"],
                    campaign=payload.get("campaign"), score=payload.get("score"))
    elif event["type"] == "deal.won":
        lead["won_amount"] = payload["amount"]
    elif event["type"] == "quote.sent":
        lead["quote_amount"] = payload["amount"]
    if event.get("account_id") is not None:
        lead["account"] = event["account_id"]
    if at >= (lead.get("owner_at") or 0):  # the latest event in event time says who owns the lead
        for field_name, attr in (("rep", "rep_id"), ("team", "team_id"), ("pipeline", "pipeline")):
            if event.get(attr) is not None:
                lead[field_name] = event[attr]
                lead["owner_at"] = at
    deltas = [] if before is None else list(counter_deltas(before, lead_facts(lead, policy.deal_stages)))

    if lead["stall_level"] and (idle_since(lead) != before_idle or not is_open(lead, policy)):
        alerts.append(
            _alert(CLEARED, lead, lead_id, before_stage, before_idle, at, lead["stall_threshold"], lead["stall_rule"])
        )
        lead["stall_level"], lead["stall_threshold"], lead["stall_rule"] = 0, None, None
    return deltas, alerts


def check_stall(lead: dict, lead_id: str, now_ms: int, policy: StallPolicy, threshold: ThresholdFn) -> list[dict]:
    """Raise the lead's stall level to what `now_ms` warrants; one alert per level crossed, never repeated."""
    since = idle_since(lead)
    if since is None or not is_open(lead, policy) or lead["stall_level"] >= 2:
        return []
    limit, rule = (lead["stall_threshold"], lead["stall_rule"]) if lead["stall_level"] else threshold(current_stage(lead))
    level = 2 if now_ms - since > 2 * limit else 1 if now_ms - since > limit else 0
    alerts = []
    while lead["stall_level"] < level:
        lead["stall_level"] += 1
        lead["stall_threshold"], lead["stall_rule"] = limit, rule
        kind = STALLED if lead["stall_level"] == 1 else ESCALATED
        detected_at = since + lead["stall_level"] * limit
        alerts.append(_alert(kind, lead, lead_id, current_stage(lead), since, detected_at, limit, rule))
    return alerts


def _alert(kind: str, lead: dict, lead_id: str, stage: str, since: int, detected_at: int, limit: int, rule: str) -> dict:
    return {
        "schema_version": ALERT_SCHEMA_VERSION,
        "alert_id": str(uuid.uuid5(ALERT_NAMESPACE, f"{kind}|{lead_id}|{since}")),
        "type": kind,
        "lead_id": lead_id,
        "rep_id": lead["rep"] or UNASSIGNED,
        "team_id": lead["team"],
        "pipeline": lead["pipeline"],
        "stage": stage,
        "idle_since": ms_to_iso(since),
        "idle_seconds": (detected_at - since) / 1000,
        "threshold_seconds": limit / 1000,
        "rule": rule,
        "detected_at": ms_to_iso(detected_at),
        # Additive v1 fields, for a message a rep can act on; .get: leads stored before them lack the keys.
        "account_id": lead.get("account"),
        "deal_value": lead.get("quote_amount"),
    }



def stall_record(lead: dict) -> dict:
    """What the stall timer raised, to be folded into the lead's state by the agent that owns it."""
    return {"idle_since": idle_since(lead), "stage": current_stage(lead), "level": lead["stall_level"],
            "threshold": lead["stall_threshold"], "rule": lead["stall_rule"]}  # fmt: skip


def apply_stall_record(lead: dict, record: dict) -> bool:
    """Raise the lead's stall level as recorded by the timer, unless the lead has moved on since; True if
    the lead changed. Applying a record twice changes nothing."""
    if (idle_since(lead), current_stage(lead)) != (record["idle_since"], record["stage"]):
        return False
    if lead["stall_level"] >= record["level"]:
        return False
    lead.update(stall_level=record["level"], stall_threshold=record["threshold"], stall_rule=record["rule"])
    return True
