"""Deal health, 0-100, of every open lead or deal (docs/deals.md#deal-health): five components in [0, 1], weighted.

| component | weight | 1 when | 0 when |
| recency | 30 | activity (or the stage entry) no older than the stage's norm | 2 × the norm or older |
| dwell | 25 | in the stage no longer than its p50 | 2 × its p90 or longer (0.5 at p90) |
| pushes | 20 | close date never pushed | pushed 3 times or more |
| regressions | 10 | never moved backwards | moved backwards 2 times or more |
| amount | 15 | amount at its highest (or never given) | amount 0 (latest / highest) |
"""

from __future__ import annotations

import math
import uuid
from typing import Callable

from crm_pulse.streams.catalogue import stage_history
from crm_pulse.streams.deals import HEALTH_DROPPED, DealPolicy, deal_alert, quiet_occurrence, updates
from crm_pulse.streams.leads import ALERT_NAMESPACE

WEIGHTS = {"recency": 30, "dwell": 25, "pushes": 20, "regressions": 10, "amount": 15}
MAX_PUSHES, MAX_REGRESSIONS = 3, 2
# Lower bounds of the bands, best first.
BANDS = (("healthy", 70.0), ("at_risk", 40.0), ("critical", 0.0))
LOWER = dict(BANDS)
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


class _Quiet:
    """A deal's health as a function of time alone, its history and norms fixed: what a quiet deal's score
    does. Only recency and dwell move with time, each piecewise linear and non-increasing."""

    def __init__(self, inputs: dict, norms: Norms):
        norm_ms, p50_s, p90_s = norms(inputs["stage"])
        # Norms of at least 1 ms: a stage configured at 0 days is overdue at once, with no division by 0.
        self.norm = max(norm_ms, 1)
        # Without enough learned dwell, the norm stands for p90 and half of it for p50.
        self.p90 = max(p90_s * 1000 if p90_s else norm_ms, 1)
        self.p50 = min(p50_s * 1000 if p50_s else self.p90 / 2, self.p90)
        self.idle_from, self.entered = max(inputs["entered"], inputs["last_activity"] or 0), inputs["entered"]
        self.fixed = {
            "pushes": 1 - min(inputs["pushes"], MAX_PUSHES) / MAX_PUSHES,
            "regressions": 1 - min(inputs["regressions"], MAX_REGRESSIONS) / MAX_REGRESSIONS,
            "amount": inputs["amount"] / inputs["highest"] if inputs["highest"] else 1.0,
        }
        self.fixed_points = [WEIGHTS[name] * value for name, value in self.fixed.items()]

    def moving(self, now_ms: int) -> tuple[float, float]:
        """(recency, dwell) at `now_ms`."""
        recency = _clamp(2 - (now_ms - self.idle_from) / self.norm)
        dwell_ms = now_ms - self.entered
        if dwell_ms <= self.p50:
            dwell = 1.0
        elif dwell_ms <= self.p90:
            dwell = 1 - 0.5 * (dwell_ms - self.p50) / (self.p90 - self.p50)
        else:
            dwell = _clamp(0.5 - 0.5 * (dwell_ms - self.p90) / self.p90)
        return recency, dwell

    def score(self, now_ms: int) -> float:
        """Unrounded."""
        recency, dwell = self.moving(now_ms)
        return sum((WEIGHTS["recency"] * recency, WEIGHTS["dwell"] * dwell, *self.fixed_points))

    def health(self, now_ms: int) -> float:
        return round(self.score(now_ms), 1)

    def breaks(self, after_ms: int) -> list[int]:
        """`after_ms` and the ms after it at which recency or dwell change slope; flat after the last."""
        moves = (self.idle_from + self.norm, self.idle_from + 2 * self.norm, self.entered + self.p50,
                 self.entered + self.p90, self.entered + 2 * self.p90)  # fmt: skip
        return sorted({after_ms, *(math.ceil(t) for t in moves if t > after_ms)})

    def crossings(self, now_ms: int) -> list[list]:
        """[[at, band, score], ...] of each band it falls to after `now_ms`: found on the linear piece where the
        score passes the band's bound, then made exact against the rounded score (a ms either side) or, should
        the rounding make that miss, by bisection."""
        breaks = self.breaks(now_ms)
        scores = [self.score(t) for t in breaks]
        found, current = [], band(round(scores[0], 1))
        for i in range(1, len(breaks)):
            while current != BANDS[-1][0] and round(scores[i], 1) < (lower := LOWER[current]):
                t0, t1, s0, s1 = breaks[i - 1], breaks[i], scores[i - 1], scores[i]
                after = found[-1][0] if found else now_ms
                # Rounded to 0.1: below `lower` from the unrounded lower − 0.05, linear in between.
                guess = t0 + math.ceil((s0 - (lower - 0.05)) * (t1 - t0) / (s0 - s1)) if s0 > s1 else t1
                at = self._exact(max(guess, after + 1), after, t1, lower)
                current = band(score := self.health(at))
                found.append([at, current, score])
        return found

    def _exact(self, guess: int, after_ms: int, until_ms: int, lower: float) -> int:
        """The first ms in (after_ms, until_ms] with health below `lower` (below it at until_ms)."""
        for at in (guess, guess + 1, guess - 1):
            first = at == after_ms + 1 or self.health(at - 1) >= lower
            if after_ms < at <= until_ms and self.health(at) < lower and first:
                return at
        lo, hi = after_ms, until_ms
        while hi - lo > 1:
            mid = (lo + hi) // 2
            lo, hi = (lo, mid) if self.health(mid) < lower else (mid, hi)
        return hi


def components(inputs: dict, now_ms: int, norms: Norms) -> dict[str, float]:
    quiet = _Quiet(inputs, norms)
    recency, dwell = quiet.moving(now_ms)
    return {"recency": recency, "dwell": dwell, **quiet.fixed}


def health(inputs: dict, now_ms: int, norms: Norms) -> float:
    return _Quiet(inputs, norms).health(now_ms)


def band(score: float) -> str:
    return next(name for name, lower in BANDS if score >= lower)


def quiet_crossings(inputs: dict, now_ms: int, norms: Norms) -> list[list]:
    """[[at, band, score], ...]: each band a deal falls to after `now_ms` if it gets no event, at the first ms
    it is in it, with the score there (by the norms of `now_ms`: they are fixed when the deal is written)."""
    return _Quiet(inputs, norms).crossings(now_ms)


def quiet_drops(lead: dict, lead_id: str, until_ms: int) -> list[dict]:
    """`deal.health_dropped` for each band the quiet deal fell to by `until_ms`, as foreseen when it was last
    written, not raised before. The timer calls it at its "now"; the lead agent before it applies the deal's
    next event, at that event's time: both raise the same records (same ids, scores and fields)."""
    raised = list(lead.get("deal_alerted") or ())  # a new list: the timer works on shallow copies
    alerts = []
    for at, now_band, score in lead.get("health_quiet") or ():
        if at > until_ms:
            break
        before, lead["health_band"] = lead.get("health_band"), now_band
        if (occurrence := quiet_occurrence(now_band, at)) not in raised:
            raised.append(occurrence)
            # "<type>|<lead>|<key>", as every deal alert's id (streams/deals.py: deal_alerts).
            kind, key = occurrence.split("|", 1)
            alert_id = str(uuid.uuid5(ALERT_NAMESPACE, f"{kind}|{lead_id}|{key}"))
            details = {"health": score, "health_band": now_band, "previous_health_band": before}
            alerts.append(deal_alert(HEALTH_DROPPED, alert_id, lead, lead_id, at, details))
    lead["deal_alerted"] = raised
    return alerts


def health_alerts(lead: dict, lead_id: str, policy: DealPolicy, now_ms: int, norms: Norms, cause: str) -> list[dict]:
    """`deal.health_dropped` when the deal's band at `now_ms` is worse than the one last recorded on it; the band
    is recorded either way, with the drops it will see if it goes quiet now (`quiet_drops`). `cause` (the event
    id that revealed the drop) names the occurrence. Nothing for an open lead that is no deal yet."""
    # Only deals (leads given an amount and close date) are alerted on: a plain lead's idleness is its stall
    # alerts' to announce.
    inputs = health_inputs(lead, policy) if updates(lead) else None
    if inputs is None:
        lead.pop("health_band", None)
        lead.pop("health_quiet", None)
        return []
    score = health(inputs, now_ms, norms)
    now_band, before = band(score), lead.get("health_band")
    lead["health_band"] = now_band
    lead["health_quiet"] = quiet_crossings(inputs, now_ms, norms)
    names = [name for name, _ in BANDS]
    if before is None or names.index(now_band) <= names.index(before):
        return []
    alert_id = str(uuid.uuid5(ALERT_NAMESPACE, f"{HEALTH_DROPPED}|{lead_id}|{cause}"))
    details = {"health": score, "health_band": now_band, "previous_health_band": before}
    return [deal_alert(HEALTH_DROPPED, alert_id, lead, lead_id, now_ms, details)]
