"""What stalled, lost and won leads have in common (docs/deals.md#commonalities): the rate of each outcome per
segment (source, campaign, score band, stage, rep), ranked by the Wilson score interval's lower bound, so a
segment of 1 out of 1 does not top one of 80 out of 100."""

from __future__ import annotations

import math
from collections import defaultdict
from typing import Iterable

from crm_pulse.streams.catalogue import score_band, stage_history
from crm_pulse.streams.leads import UNASSIGNED, StallPolicy

Z_95 = 1.959963984540054  # the standard normal's 97.5th percentile: a two-sided 95 % interval
OUTCOMES = ("stalled", "lost", "won")


def wilson_lower_bound(k: int, n: int, z: float = Z_95) -> float:
    """The lower end of the Wilson score interval of k successes in n trials."""
    if n == 0:
        return 0.0
    p = k / n
    centre = p + z * z / (2 * n)
    spread = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return (centre - spread) / (1 + z * z / n)


def segments(lead: dict, stage: str) -> list[tuple[str, str]]:
    found = [("source", lead.get("source")), ("campaign", lead.get("campaign")),
             ("score_band", score_band(lead["score"]) if lead.get("score") is not None else None),
             ("stage", stage), ("rep", lead["rep"] or UNASSIGNED)]  # fmt: skip
    return [(dimension, value) for dimension, value in found if value is not None]


def commonalities(leads: Iterable[dict], policy: StallPolicy, min_count: int = 1) -> dict[str, list[dict]]:
    """Per outcome, the segments ranked by the Wilson lower bound of their rate (ties: more cases first):
    `stalled` among open leads (stage: the current one), `lost` and `won` among closed leads (stage: the last
    one before closing). Segments with fewer than `min_count` cases of the outcome are left out."""
    tallies: dict[str, defaultdict] = {outcome: defaultdict(lambda: [0, 0]) for outcome in OUTCOMES}
    for lead in leads:
        history = stage_history(lead)
        if not history:
            continue
        stage = history[-1][2]
        if stage not in policy.closed_stages:
            for segment in segments(lead, stage):
                cell = tallies["stalled"][segment]
                cell[0] += lead["stall_level"] > 0
                cell[1] += 1
            continue
        before = history[-2][2] if len(history) > 1 else stage
        for outcome in ("lost", "won"):
            hit = stage == "won" if outcome == "won" else stage != "won"
            for segment in segments(lead, before):
                cell = tallies[outcome][segment]
                cell[0] += hit
                cell[1] += 1
    ranked = {}
    for outcome, cells in tallies.items():
        rows = [{"dimension": dimension, "value": value, "count": k, "of": n, "rate": k / n,
                 "wilson_lower_bound": wilson_lower_bound(k, n)}
                for (dimension, value), (k, n) in cells.items() if k >= min_count]  # fmt: skip
        rows.sort(key=lambda row: (-row["wilson_lower_bound"], -row["count"], row["dimension"], row["value"]))
        ranked[outcome] = rows
    return ranked
