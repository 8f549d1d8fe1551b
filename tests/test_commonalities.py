"""Commonalities (streams/commonalities.py): the Wilson lower bound against published values, and segments ranked
by it with their counts."""

from __future__ import annotations

import pytest

from crm_pulse.streams.commonalities import commonalities, wilson_lower_bound
from crm_pulse.streams.leads import StallPolicy, new_lead

POLICY = StallPolicy()


def test_wilson_lower_bound_matches_the_published_95_percent_intervals():
    # Wilson (1927) 95 % intervals: 8/10 → [0.4902, 0.9433]; 1/1 → [0.2065, 1]; 0/10 → [0, 0.2775].
    assert wilson_lower_bound(8, 10) == pytest.approx(0.4902, abs=1e-4)
    assert wilson_lower_bound(1, 1) == pytest.approx(0.2065, abs=1e-4)
    assert wilson_lower_bound(0, 10) == 0.0 and wilson_lower_bound(0, 0) == 0.0


def lead(source, stages, rep="r1", stalled=False, score=None, campaign=None):
    state = new_lead()
    state.update(timeline=[[i, f"e{i}", stage] for i, stage in enumerate(stages)], rep=rep, source=source,
                 score=score, campaign=campaign, stall_level=int(stalled))  # fmt: skip
    return state


def test_a_big_segment_outranks_a_tiny_one_with_a_higher_rate():
    leads = [lead("event", ["new"], stalled=True)]  # 1 of 1 stalled
    leads += [lead("web", ["new", "qualified"], rep="r2", stalled=i < 8) for i in range(10)]  # 8 of 10 stalled
    leads += [lead("web", ["new", "proposal", "lost"], rep="r2", score=15), lead("web", ["new", "won"], rep="r2")]
    ranked = commonalities(leads, POLICY)
    top = [(r["dimension"], r["value"], r["count"], r["of"]) for r in ranked["stalled"]]
    # web 8/10 (0.490), stage qualified 8/10, rep r2 8/10: above event 1/1 (0.207), rep r1 1/1, stage new 1/1.
    assert top == [("rep", "r2", 8, 10), ("source", "web", 8, 10), ("stage", "qualified", 8, 10),
                   ("rep", "r1", 1, 1), ("source", "event", 1, 1), ("stage", "new", 1, 1)]  # fmt: skip
    assert ranked["stalled"][0]["rate"] == 0.8
    # Closed: web lost 1 of 2; the loss counts for the stage it left (proposal), the win for "new".
    # 1/1 (0.207) ranks above 1/2 (0.095); equal bounds and counts go by dimension name.
    assert [(r["dimension"], r["value"], r["count"], r["of"]) for r in ranked["lost"]] == [
        ("score_band", "0-19", 1, 1), ("stage", "proposal", 1, 1), ("rep", "r2", 1, 2), ("source", "web", 1, 2)]
    assert [(r["dimension"], r["value"], r["count"], r["of"]) for r in ranked["won"]] == [
        ("stage", "new", 1, 1), ("rep", "r2", 1, 2), ("source", "web", 1, 2)]
    assert ranked["won"][1]["wilson_lower_bound"] == pytest.approx(0.0945, abs=1e-4)  # Wilson 1/2: [0.0945, 0.9055]
    assert commonalities(leads, POLICY, min_count=2)["stalled"] == ranked["stalled"][:3]
