"""Deal health, 0-100, of every open lead or deal (docs/deals.md#deal-health): five components in [0, 1], weighted.

| component | weight | 1 when | 0 when |
| recency | 30 | activity (or the stage entry) no older than the stage's norm | 2 × the norm or older |
| dwell | 25 | in the stage no longer than its p50 | 2 × its p90 or longer (0.5 at p90) |
| pushes | 20 | close date never pushed | pushed 3 times or more |
| regressions | 10 | never moved backwards | moved backwards 2 times or more |
| amount | 15 | amount at its highest (or never given) | amount 0 (latest / highest) |
"""

from __future__ import annotations

import uuid
from typing import Callable

from crm_pulse.streams.catalogue import stage_history
from crm_pulse.streams.deals import HEALTH_DROPPED, DealPolicy, deal_alert, updates
from crm_pulse.streams.leads import ALERT_NAMESPACE

WEIGHTS = {"recency": 30, "dwell": 25, "pushes": 20, "regressions": 10, "amount": 15}
MAX_PUSHES, MAX_REGRESSIONS = 3, 2
# Lower bounds of the bands, best first.
BANDS = (("healthy", 70.0), ("at_risk", 40.0), ("critical", 0.0))
# A stage's norms: (the stall threshold ms as its activity norm, learned p50 s or None, learned p90 s or None).
Norms = Callable[[str], tuple[int, float | None, float | None]]


def health_inputs(lead: dict, policy: DealPolicy) -> dict | None:
    """What the score reads from an open lead's history (None once closed). Without amount snapshots it has
    no pushes and a full amount component: nothing says it shrank."""
    history = stage_history(lead)
    snapshots = updates(lead)
    if not history or history[-1][2] in policy.closed_stages:
        return None
    order = {stage: rank for rank, stage in enumerate(policy.order(lead["pipeline"]))}
    regressions = sum(1 for a, b in zip(history, history[1:]) if a[2] in order and b[2] in order and order[b[2]] < order[a[2]])
    pushes = sum(1 for a, b in zip(snapshots, snapshots[1:]) if b[3] > a[3])
    return {"stage": history[-1][2], "entered": history[-1][0], "last_activity": lead["last_activity"],
            "pushes": pushes, "regressions": regressions, "amount": snapshots[-1][2] if snapshots else None,
            "highest": max((s[2] for s in snapshots), default=None)}  # fmt: skip


def _clamp(x: float) -> float:
    return min(1.0, max(0.0, x))


def components(inputs: dict, now_ms: int, norms: Norms) -> dict[str, float]:
    norm_ms, p50_s, p90_s = norms(inputs["stage"])
    idle = now_ms - max(inputs["entered"], inputs["last_activity"] or 0)
    # Norms of at least 1 ms: a stage configured at 0 days is overdue at once, with no division by 0.
    recency = _clamp(2 - idle / max(norm_ms, 1))
    # Without enough learned dwell, the norm stands for p90 and half of it for p50.
    p90 = max(p90_s * 1000 if p90_s else norm_ms, 1)
    p50 = min(p50_s * 1000 if p50_s else p90 / 2, p90)
    dwell_ms = now_ms - inputs["entered"]
    if dwell_ms <= p50:
        dwell = 1.0
    elif dwell_ms <= p90:
        dwell = 1 - 0.5 * (dwell_ms - p50) / (p90 - p50)
    else:
        dwell = _clamp(0.5 - 0.5 * (dwell_ms - p90) / p90)
    return {
        "recency": recency,
        "dwell": dwell,
        "pushes": 1 - min(inputs["pushes"], MAX_PUSHES) / MAX_PUSHES,
        "regressions": 1 - min(inputs["regressions"], MAX_REGRESSIONS) / MAX_REGRESSIONS,
        "amount": inputs["amount"] / inputs["highest"] if inputs["highest"] else 1.0,
    }


def health(inputs: dict, now_ms: int, norms: Norms) -> float:
    parts = components(inputs, now_ms, norms)
    return round(sum(WEIGHTS[name] * value for name, value in parts.items()), 1)


def band(score: float) -> str:
    return next(name for name, lower in BANDS if score >= lower)


def health_alerts(lead: dict, lead_id: str, policy: DealPolicy, now_ms: int, norms: Norms, cause: str) -> list[dict]:
    """`deal.health_dropped` when the deal's band at `now_ms` is worse than the one last recorded on it; the band
    is recorded either way. `cause` (the event id that revealed the drop) names the occurrence."""
    inputs = health_inputs(lead, policy)
    if inputs is None:
        lead.pop("health_band", None)
        return []
    score = health(inputs, now_ms, norms)
    now_band, before = band(score), lead.get("health_band")
    lead["health_band"] = now_band
    names = [name for name, _ in BANDS]
    if before is None or names.index(now_band) <= names.index(before):
        return []
    alert_id = str(uuid.uuid5(ALERT_NAMESPACE, f"{HEALTH_DROPPED}|{lead_id}|{cause}"))
    details = {"health": score, "health_band": now_band, "previous_health_band": before}
    return [deal_alert(HEALTH_DROPPED, alert_id, lead, lead_id, now_ms, details)]
