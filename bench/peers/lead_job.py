"""The peer's job as pure functions, shared by the Quix Streams app (bench/peers/quix_job.py) and its test:
per lead, stage dwell by event time, won and lost deals, and stall alerts keyed by rep.

The stall rule is crm-pulse's stage threshold (the worker's default days per stage; its learned p90 rule is
left out): a lead is idle since the later of entering its stage and its latest activity, stalled once idle
longer than its stage's threshold, escalated at twice that, cleared when it moves or gets activity. Quix
Streams has no per-key timers, so a stall is found when the lead's next event arrives (crm-pulse's worker
also finds it with a timer while the lead is silent).
"""

from __future__ import annotations

from collections import defaultdict
from typing import Iterable

from crm_pulse.config import Settings
from crm_pulse.streams.kpis import DAY_MS

STAGE_DAYS: dict[str, float] = Settings.model_fields["stall_stage_days"].default
DEFAULT_DAYS: float = Settings.model_fields["stall_default_days"].default
CLOSED = ("won", "lost")
STALLED, ESCALATED, CLEARED = "lead.stalled", "lead.stall_escalated", "lead.stall_cleared"


def threshold_ms(stage: str) -> int:
    return int(STAGE_DAYS.get(stage, DEFAULT_DAYS) * DAY_MS)


def stage_entered(event: dict) -> str | None:
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


def new_lead() -> dict:
    return {"stage": None, "entered": None, "last_activity": None, "rep": None, "level": 0, "threshold": None}


def idle_since(lead: dict) -> int | None:
    if lead["stage"] is None:
        return lead["last_activity"]
    return max(lead["entered"], lead["last_activity"] or 0)


def is_open(lead: dict) -> bool:
    return lead["stage"] is not None and lead["stage"] not in CLOSED


def _alert(kind: str, lead: dict, lead_id: str, since: int, detected_at: int) -> dict:
    return {"type": kind, "lead_id": lead_id, "rep_id": lead["rep"] or "unassigned", "stage": lead["stage"],
            "idle_since": since, "detected_at": detected_at, "threshold_ms": lead["threshold"]}  # fmt: skip


def fold(lead: dict, event: dict) -> list[dict]:
    """Apply one lead event to `lead` (in place); return what it emits: KPI records {"kpi", "value"}
    ("dwell:<stage>" with the dwell in ms, "won" or "lost" with 1) and alerts {"type": "lead.…", …}."""
    at, lead_id = event["occurred_at"], event["lead_id"]
    out: list[dict] = []
    since = idle_since(lead)
    if is_open(lead) and since is not None and at > since and lead["level"] < 2:
        # The stall this event reveals, as the worker's catch-up check raises it.
        limit = lead["threshold"] if lead["level"] else threshold_ms(lead["stage"])
        level = 2 if at - since > 2 * limit else 1 if at - since > limit else 0
        while lead["level"] < level:
            lead["level"] += 1
            lead["threshold"] = limit
            out.append(_alert(STALLED if lead["level"] == 1 else ESCALATED, lead, lead_id, since,
                              since + lead["level"] * limit))  # fmt: skip
    before_stage = lead["stage"]
    if (stage := stage_entered(event)) is not None:
        if is_open(lead):
            out.append({"kpi": f"dwell:{lead['stage']}", "value": at - lead["entered"]})
        if stage in CLOSED:
            out.append({"kpi": stage, "value": 1})
        lead["stage"], lead["entered"] = stage, at
    elif event["type"] == "lead.activity":
        lead["last_activity"] = max(lead["last_activity"] or at, at)
    if event.get("rep_id") is not None:
        lead["rep"] = event["rep_id"]
    if lead["level"] and (idle_since(lead) != since or not is_open(lead)):
        out.append({**_alert(CLEARED, lead, lead_id, since, at), "stage": before_stage})
        lead["level"], lead["threshold"] = 0, None
    return out


def is_lead_event(event: dict) -> bool:
    return event.get("lead_id") is not None


def add(totals: dict, record: dict) -> None:
    """Fold one KPI record into {kpi: [count, sum]}, as the Quix app's aggregate step does per key."""
    count_sum = totals.setdefault(record["kpi"], [0, 0])
    count_sum[0] += 1
    count_sum[1] += record["value"]


def streamed(events: Iterable[dict]) -> dict:
    """The KPI totals `fold` gives over `events`, lead by lead, in their order."""
    leads: dict[str, dict] = defaultdict(new_lead)
    totals: dict = {}
    for event in filter(is_lead_event, events):
        for record in fold(leads[event["lead_id"]], event):
            if "kpi" in record:
                add(totals, record)
    return totals


def batch(events: Iterable[dict]) -> dict:
    """The same totals computed another way, from each lead's whole history: its stage entries in event
    time, each stage's dwell up to the next entry; wins and losses counted."""
    entries: dict[str, list] = defaultdict(list)
    for event in filter(is_lead_event, events):
        if (stage := stage_entered(event)) is not None:
            entries[event["lead_id"]].append((event["occurred_at"], stage))
    totals: dict = {}
    for history in entries.values():
        history.sort(key=lambda entry: entry[0])  # stable: same-time entries keep their order
        for (entered, stage), (left, _) in zip(history, history[1:]):
            if stage not in CLOSED:
                add(totals, {"kpi": f"dwell:{stage}", "value": left - entered})
        for _, stage in history:
            if stage in CLOSED:
                add(totals, {"kpi": stage, "value": 1})
    return totals


def win_rate(totals: dict) -> float | None:
    won, lost = (totals.get(k, [0, 0])[0] for k in CLOSED)
    return won / (won + lost) if won + lost else None
