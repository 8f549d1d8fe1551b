"""Every family's fold in one process, without Faust or a broker: events through the same lead, customer and
actor functions and into the same sums, histograms and churn spells as the agents (`crm-pulse report`)."""

from __future__ import annotations

from collections import defaultdict
from datetime import tzinfo

from crm_pulse.streams.catalogue import apply_sums, split_facts
from crm_pulse.streams.deals import DealPolicy, apply_deal_event
from crm_pulse.streams.entities import apply_actor_activity, apply_customer_event
from crm_pulse.streams.families import FAMILY_OF_TYPE, OVERALL
from crm_pulse.streams.forecast import apply_outcome, closed_outcome, outcome_deltas
from crm_pulse.streams.kpis import apply_dwell, apply_spell, day_of
from crm_pulse.streams.leads import StallPolicy, apply_lead_event, new_lead


class Fold:
    """The aggregates of a whole event history. Unlike the worker's, nothing is pruned: the daily buckets
    reach back to the first event and the churn spells stay exact for every period."""

    def __init__(self, policy: StallPolicy, zone: tzinfo | None = None, baseline: tuple[int, int] | None = None,
                 deal_policy: DealPolicy | None = None):  # fmt: skip
        self.policy, self.zone, self.baseline = policy, zone, baseline
        self.deal_policy = deal_policy or DealPolicy()
        # Closed deals' outcomes per pipeline (streams/forecast.py), as the deals agent keeps them.
        self.outcomes: defaultdict[str, dict] = defaultdict(dict)
        self.entities: dict[tuple[str, str], dict] = {}
        self.seen: set[tuple[str, str, str]] = set()
        self.kpi_sums: defaultdict[str, dict] = defaultdict(dict)
        self.histograms: defaultdict[str, dict] = defaultdict(dict)
        self.customer_base = {OVERALL: {}}
        self.earliest_ms: int | None = None
        self.latest_ms: int | None = None

    def threshold(self, stage: str) -> tuple[int, str]:
        # Stall alerts are not reported: the configured thresholds do for the checks the fold runs.
        return self.policy.threshold(stage, None, 0)

    def apply(self, key: str, event: dict) -> bool:
        """Fold one validated event, keyed by its entity as the ingest agent re-keys it; False for an event id
        the entity has seen (the worker drops it as a duplicate)."""
        family = FAMILY_OF_TYPE[event["type"]]
        if (family, key, event["event_id"]) in self.seen:
            return False
        self.seen.add((family, key, event["event_id"]))
        at = event["occurred_at"]
        self.earliest_ms = at if self.earliest_ms is None else min(self.earliest_ms, at)
        self.latest_ms = at if self.latest_ms is None else max(self.latest_ms, at)
        entity = self.entities.setdefault((family, key), new_lead() if family == "lead" else {})
        fact_deltas = []
        if family == "lead":
            before = closed_outcome(entity, self.deal_policy, self.zone)
            fact_deltas, _alerts = apply_lead_event(entity, event, key, self.policy, self.threshold)
            apply_deal_event(entity, event)
            for pipeline, delta in outcome_deltas(before, closed_outcome(entity, self.deal_policy, self.zone)):
                apply_outcome(self.outcomes[pipeline], delta)
            if event["type"] == "lead.activity" and event.get("rep_id"):
                rep = self.entities.setdefault(("rep", event["rep_id"]), {})
                self.facts(apply_actor_activity(rep, at, "active_reps"))
        elif family == "customer":
            spell_deltas, fact_deltas = apply_customer_event(entity, event, self.zone)
            for start, end, sign in spell_deltas:
                apply_spell(self.customer_base[OVERALL], start, end, sign)
        elif event["type"] == "crm.user_activity":
            fact_deltas = apply_actor_activity(entity, at, "active_users")
        self.facts(fact_deltas, event)
        return True

    def facts(self, fact_deltas, event: dict | None = None) -> None:
        histograms, sums = split_facts(fact_deltas, event, self.zone)
        for scope, at, ms, sign in histograms:
            apply_dwell(self.histograms[scope], day_of(at, self.zone), ms, sign, self.baseline)
        for (scope, day, sign), values in sums.items():
            apply_sums(self.kpi_sums[scope], day, values, sign, self.baseline)
