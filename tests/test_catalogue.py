"""Every KPI of the catalogue (docs/kpis.md), checked against numbers worked out by hand.

Events pass the contract (`parse_event`, then `model_dump(by_alias=True)`, as the agents receive them) and are
folded with the project's pure functions the way the agents do (`Fold`). Times are UTC: day d is 2026-01-01 + d
days (D0 = 20454), events happen at 10:00 unless an hour is given. "Now" is day 40 12:00, so the windows are
7d = days 34..40, 30d = days 11..40, all = all time; the windows before them (for growth) are days 27..33 and -19..10.
Expected values are written (7d, 30d, all); None means undefined, i.e. not exported.
"""

import itertools
from collections import defaultdict

import orjson
import pytest

from crm_pulse.schemas.validate import parse_event
from crm_pulse.streams.catalogue import (
    KPIS,
    WINDOWS,
    apply_sums,
    baseline_comparison,
    customer_base_kpis,
    event_sums,
    group_sums,
    prune_sums,
    window_sums,
)
from crm_pulse.streams.kpis import DAY_MS, advance_churn_horizon, apply_dwell, apply_spell, churn, day_of, dwell_stats, prune_days
from crm_pulse.streams.leads import StallPolicy, apply_lead_event, new_lead
from crm_pulse.streams.dedupe import first_seen
from crm_pulse.streams.entities import apply_actor_activity, apply_customer_event
from crm_pulse.streams.families import CUSTOMER_TYPES, LEAD_TYPES

D0 = 20454  # 2026-01-01
H = 3_600_000
TODAY = D0 + 40
NOW = TODAY * DAY_MS + 12 * H
RETENTION_DAYS = 60 + 2 + 2  # agents/app.py with the default 2-day grace
HORIZON_SLACK_DAYS = 30 + 2 + 2  # agents/customers.py
POLICY = StallPolicy()  # deal stages: proposal, negotiation
_ids = itertools.count()


def at(day: int, hour: int = 10) -> int:
    return (D0 + day) * DAY_MS + hour * H


def ev(kind: str, occurred_at: int, payload: dict | None = None, **envelope) -> dict:
    doc = {"event_id": f"e{next(_ids):05d}", "type": kind, "occurred_at": occurred_at, "payload": payload or {},
           **{k: v for k, v in envelope.items() if v is not None}}  # fmt: skip
    return parse_event(orjson.dumps(doc)).model_dump(by_alias=True)


def lead(lead_id, kind, day, payload=None, rep=None, hour=10):
    return ev(kind, at(day, hour), payload, lead_id=lead_id, rep_id=rep)


def created(lead_id, day, rep=None, hour=10, **payload):
    return lead(lead_id, "lead.created", day, payload, rep, hour)


def moved(lead_id, day, to, rep=None, hour=10):
    return lead(lead_id, "lead.stage_changed", day, {"from": "?", "to": to}, rep, hour)


def customer(customer_id, kind, day, payload=None, hour=10):
    return ev(kind, at(day, hour), payload, customer_id=customer_id)


def configured_threshold(stage: str) -> tuple[int, str]:
    return POLICY.threshold(stage, None, 0)


class Fold:
    """agents/leads.py, customers.py, signals.py and aggregates.py without Faust: entity state → fact deltas and
    event sums → per-scope KPI sums, duration histograms and the customer base."""

    def __init__(self, *events, baseline: tuple[int, int] | None = None):
        self.baseline = baseline
        self.leads, self.customers = {}, defaultdict(dict)
        self.signal_sources, self.actors = defaultdict(dict), defaultdict(dict)
        self.sums, self.histograms, self.customer_base = defaultdict(dict), defaultdict(dict), {}
        self.offsets = itertools.count()  # the events' positions in one input partition
        # Per scope, the newest day its deltas reached in this call: the aggregates prune once per batch.
        self.newest_sums_day, self.newest_histogram_day = {}, {}
        self(*events)

    def __call__(self, *events):
        """One batch of events."""
        for event in events:
            kind, at_ms = event["type"], event["occurred_at"]
            if kind in LEAD_TYPES:  # track_leads, then track_active_reps
                entity = self.leads.setdefault(event["lead_id"], new_lead())
                if first_seen(entity, event, 0, next(self.offsets), None):
                    facts, _ = apply_lead_event(entity, event, event["lead_id"], POLICY, configured_threshold)
                    self.publish(facts, event)
                    if kind == "lead.activity" and event["rep_id"]:
                        self.publish(apply_actor_activity(self.actors[f"rep:{event['rep_id']}"], at_ms, "active_reps"))
            elif kind in CUSTOMER_TYPES:  # track_customers, aggregate_churn
                entity = self.customers[event["customer_id"]]
                if first_seen(entity, event, 0, next(self.offsets), None):
                    spells, facts = apply_customer_event(entity, event)
                    for start, end, sign in spells:
                        advance_churn_horizon(self.customer_base, day_of(at_ms) - HORIZON_SLACK_DAYS)
                        apply_spell(self.customer_base, start, end, sign)
                    self.publish(facts, event)
            else:  # track_signals
                key = event["user_id"] if kind == "crm.user_activity" else event["payload"]["campaign"]
                if first_seen(self.signal_sources[key], event, 0, next(self.offsets), None):
                    facts = apply_actor_activity(self.signal_sources[key], at_ms, "active_users") \
                        if kind == "crm.user_activity" else []  # fmt: skip
                    self.publish(facts, event)
        for scope, day in self.newest_histogram_day.items():
            prune_days(self.histograms[scope], day - RETENTION_DAYS)
        for scope, day in self.newest_sums_day.items():
            prune_sums(self.sums[scope], day - RETENTION_DAYS)
        self.newest_sums_day, self.newest_histogram_day = {}, {}
        return self

    def publish(self, fact_deltas, event=None):  # publish_deltas → aggregate_histograms / aggregate_sums
        contributions = [(scope, event["occurred_at"], values, 1) for scope, values in event_sums(event)] \
            if event else []  # fmt: skip
        for fact, sign in fact_deltas:
            if fact[0] == "hist":
                _, scope, at_ms, ms = fact
                apply_dwell(self.histograms[scope], day_of(at_ms), ms, sign, self.baseline)
                self.newest_histogram_day[scope] = max(day_of(at_ms), self.newest_histogram_day.get(scope, 0))
            else:
                _, scope, at_ms, field, value = fact
                contributions.append((scope, at_ms, {field: value}, sign))
        for (scope, day, sign), values in group_sums(contributions).items():
            apply_sums(self.sums[scope], day, values, sign, self.baseline)
            self.newest_sums_day[scope] = max(day, self.newest_sums_day.get(scope, 0))

    def kpi(self, kpi, scope: str) -> tuple:
        """(7d, 30d, all) as collect_kpis computes them."""
        state = self.sums[scope]
        return tuple(
            kpi.formula(window_sums(state, TODAY, days), {} if days is None else
                        window_sums(state, TODAY, days, offset_days=days), days)  # fmt: skip
            for days in WINDOWS.values()
        )

    def hist(self, scope: str) -> list[tuple]:
        """[(observations, mean s, p50 s, p90 s)] for 7d, 30d, all, as collect_histograms computes them."""
        stats = [dwell_stats(self.histograms[scope], NOW, days) for days in WINDOWS.values()]
        return [(s.count, s.mean_seconds, s.quantile_seconds(0.5), s.quantile_seconds(0.9)) for s in stats]

    def customer_kpis(self) -> dict:  # agents/customers.py collect
        return customer_base_kpis(churn(self.customer_base, NOW), window_sums(self.sums["all"], TODAY, 30))


def approx(expected):
    """pytest.approx element-wise, through tuples, lists and dicts, letting None (undefined) compare equal to None."""
    if isinstance(expected, dict):
        return {key: approx(value) for key, value in expected.items()}
    if isinstance(expected, (list, tuple)):
        return type(expected)(approx(value) for value in expected)
    return expected if expected is None else pytest.approx(expected, rel=1e-9, abs=1e-9)


# --- one history feeding every KPI --------------------------------------------------------------------------------

# Leads: id rep source campaign score | created | became a deal        | closed
#        L1 r1  web    spring   85    | day 5   | proposal day 12      | won 1000 day 20
#        L2 r1  web    -        65    | day 36  | (won) day 40         | won 2500 day 40
#        L3 r2  ads    spring   30    | day 20  | negotiation day 36   | won 500 day 40
#        L4 r2  ads    -        -     | day 40  | -                    | lost day 40
#        L5 r1  web    spring   85    | day 20  | -                    | lost day 20
#        L6 r1  web    -        10    | day 5   | (won) day 5          | won 4000 day 5
#        L7 r2  web    -        -     | day 30  | -                    | open
SALES = [
    created("L1", 5, "r1", source="web", campaign="spring", score=85),
    lead("L1", "lead.activity", 12, {"kind": "call", "direction": "outbound"}, "r1"),
    moved("L1", 12, "proposal", "r1"),
    lead("L1", "quote.sent", 12, {"quote_id": "q1", "amount": 1000}, "r1"),
    lead("L1", "quote.accepted", 20, {"quote_id": "q1"}, "r1"),
    lead("L1", "deal.won", 20, {"amount": 1000}, "r1"),
    created("L2", 36, "r1", source="web", score=65),
    lead("L2", "lead.activity", 36, {"kind": "call", "direction": "inbound"}, "r1"),
    lead("L2", "quote.sent", 36, {"quote_id": "q2", "amount": 2500}, "r1"),
    lead("L2", "quote.accepted", 40, {"quote_id": "q2"}, "r1"),
    lead("L2", "deal.won", 40, {"amount": 2500}, "r1"),
    created("L3", 20, "r2", source="ads", campaign="spring", score=30),
    moved("L3", 36, "negotiation", "r2"),
    lead("L3", "quote.sent", 36, {"quote_id": "q3", "amount": 600}, "r2"),
    lead("L3", "lead.activity", 40, {"kind": "call", "direction": "outbound"}, "r2"),
    lead("L3", "lead.activity", 40, {"kind": "email", "direction": "outbound"}, "r2"),
    lead("L3", "deal.won", 40, {"amount": 500}, "r2"),
    created("L4", 40, "r2", hour=8, source="ads"),
    lead("L4", "lead.activity", 40, {"kind": "call", "direction": "outbound"}, "r2", hour=9),
    lead("L4", "deal.lost", 40, {"reason": "price"}, "r2"),
    created("L5", 20, "r1", source="web", campaign="spring", score=85),
    lead("L5", "quote.sent", 20, {"quote_id": "q5", "amount": 800}, "r1"),
    lead("L5", "deal.lost", 20, {"reason": "timing"}, "r1", hour=11),
    created("L6", 5, "r1", hour=8, source="web", score=10),
    lead("L6", "lead.activity", 5, {"kind": "call", "direction": "inbound"}, "r1", hour=9),
    lead("L6", "quote.sent", 5, {"quote_id": "q6", "amount": 4000}, "r1", hour=9),
    lead("L6", "quote.accepted", 5, {"quote_id": "q6"}, "r1"),
    lead("L6", "deal.won", 5, {"amount": 4000}, "r1", hour=11),
    created("L7", 30, "r2", source="web"),
    lead("L7", "lead.activity", 31, {"kind": "note", "direction": "outbound"}, "r3"),
]
MARKETING = [
    *(ev("campaign.touch", at(day), {"campaign": "spring", "kind": "touch"}) for day in (40, 36, 20, 5)),
    ev("campaign.touch", at(38), {"campaign": "autumn", "kind": "touch"}),
    *(ev("campaign.touch", at(day), {"campaign": "spring", "kind": "click"}) for day in (40, 20)),
    ev("campaign.touch", at(36), {"campaign": "spring", "kind": "response"}),
    ev("marketing.spend", at(40), {"campaign": "spring", "amount": 300, "purpose": "acquisition"}),
    ev("marketing.spend", at(20), {"campaign": "spring", "amount": 700, "purpose": "acquisition"}),
    ev("marketing.spend", at(5), {"campaign": "spring", "amount": 1000, "purpose": "acquisition"}),
    ev("marketing.spend", at(36), {"campaign": "autumn", "amount": 200, "purpose": "retention"}),
    ev("marketing.spend", at(5), {"campaign": "autumn", "amount": 100, "purpose": "retention"}),
]
# Subscriptions: C1 day -10 → cancelled 36; C2 day 0, renewed 30; C3 day 5 → cancelled 8, again day 38;
# C4 day 20; C5 day 2, renewed 37; C6 day 1 → cancelled 40; C7 day 39; C8 day 11; C9 day 3 → cancelled 11.
CUSTOMERS = [
    customer("C1", "customer.subscribed", -10), customer("C1", "customer.cancelled", 36),
    customer("C2", "customer.subscribed", 0), customer("C2", "customer.renewed", 30),
    customer("C3", "customer.subscribed", 5), customer("C3", "customer.cancelled", 8),
    customer("C3", "customer.subscribed", 38),
    customer("C4", "customer.subscribed", 20),
    customer("C5", "customer.subscribed", 2), customer("C5", "customer.renewed", 37),
    customer("C6", "customer.subscribed", 1), customer("C6", "customer.cancelled", 40),
    customer("C7", "customer.subscribed", 39),
    customer("C8", "customer.subscribed", 11),
    customer("C9", "customer.subscribed", 3), customer("C9", "customer.cancelled", 11),
    customer("C2", "customer.purchase", 5, {"amount": 100}),
    customer("C2", "customer.purchase", 36, {"amount": 300}),
    customer("C2", "customer.purchase", 40, {"amount": 200}),
    customer("C4", "customer.purchase", 20, {"amount": 400}),
    customer("C5", "customer.purchase", 38, {"amount": 600}),
    customer("C2", "survey.response", 40, {"nps": 10, "effort": 2}),
    customer("C4", "survey.response", 36, {"nps": 9}),
    customer("C5", "survey.response", 38, {"nps": 6, "effort": 6}),
    customer("C1", "survey.response", 20, {"nps": 8, "effort": 3}),
    customer("C2", "survey.response", 5, {"nps": 0}),
    customer("C4", "survey.response", 38, {"effort": 4}),
    # T1: one contact, resolved in 6 h; T2: two contacts, 10 days; T3: no contact, 2 days;
    # T4: resolved in 1 h, contacted only afterwards; T5: still open.
    customer("C2", "ticket.opened", 36, {"ticket_id": "T1"}, hour=0),
    customer("C2", "ticket.contacted", 36, {"ticket_id": "T1"}, hour=2),
    customer("C2", "ticket.resolved", 36, {"ticket_id": "T1"}, hour=6),
    customer("C2", "ticket.opened", 20, {"ticket_id": "T2"}),
    customer("C2", "ticket.contacted", 20, {"ticket_id": "T2"}, hour=11),
    customer("C2", "ticket.contacted", 21, {"ticket_id": "T2"}),
    customer("C2", "ticket.resolved", 30, {"ticket_id": "T2"}),
    customer("C4", "ticket.opened", 38, {"ticket_id": "T3"}),
    customer("C4", "ticket.resolved", 40, {"ticket_id": "T3"}),
    customer("C5", "ticket.opened", 5, {"ticket_id": "T4"}, hour=9),
    customer("C5", "ticket.resolved", 5, {"ticket_id": "T4"}),
    customer("C5", "ticket.contacted", 6, {"ticket_id": "T4"}),
    customer("C5", "ticket.opened", 39, {"ticket_id": "T5"}),
    customer("C2", "complaint.filed", 36), customer("C4", "complaint.filed", 20), customer("C1", "complaint.filed", 5),
]
ADOPTION = [
    ev("crm.user_activity", at(day, hour), {"action": "open_lead"}, user_id=user)
    for user, day, hour in (("u1", 40, 10), ("u1", 5, 10), ("u2", 36, 10), ("u3", 20, 10), ("u3", 20, 11))
]
HISTORY = SALES + MARKETING + CUSTOMERS + ADOPTION


def series(kpi, dimension: str | None) -> str:
    """The exported series: metric name plus constant labels (the window and dimension labels left out)."""
    labels = ",".join(f"{k}={v}" for k, v in kpi.labels)
    return kpi.metric(dimension) + (f"{{{labels}}}" if labels else "")


# (series, scope, (7d, 30d, all)), hand-computed from HISTORY.
CASES = [
    # Sales. Won: L6 4000 (day 5), L1 1000 (20), L2 2500 + L3 500 (40); lost: L5 (20), L4 (40).
    ("crm_deals_won", "all", (2, 3, 4)),
    ("crm_rep_deals_won", "rep:r1", (1, 2, 3)),  # L2; + L1; + L6
    ("crm_deals_lost", "all", (1, 2, 2)),
    ("crm_rep_deals_lost", "rep:r1", (0, 1, 1)),  # L5
    ("crm_win_rate_ratio", "all", (2 / 3, 3 / 5, 4 / 6)),
    ("crm_rep_win_rate_ratio", "rep:r1", (1 / 1, 2 / 3, 3 / 4)),
    ("crm_won_revenue", "all", (3000, 4000, 8000)),
    ("crm_rep_won_revenue", "rep:r1", (2500, 3500, 7500)),
    ("crm_campaign_won_revenue", "campaign:spring", (500, 1500, 1500)),  # L3 (day 40); + L1 (day 20)
    ("crm_average_deal_size", "all", (3000 / 2, 4000 / 3, 8000 / 4)),
    ("crm_rep_average_deal_size", "rep:r1", (2500, 3500 / 2, 7500 / 3)),
    # Leads created: L1, L6 (day 5), L3, L5 (20), L7 (30), L2 (36), L4 (40).
    ("crm_new_leads", "all", (2, 5, 7)),
    ("crm_rep_new_leads", "rep:r1", (1, 2, 4)),  # L2; + L5; + L1, L6
    ("crm_source_new_leads", "source:web", (1, 3, 5)),  # L2; + L5, L7; + L1, L6
    ("crm_campaign_new_leads", "campaign:spring", (0, 2, 3)),  # -; L3, L5; + L1
    ("crm_score_band_new_leads", "score_band:80-100", (0, 1, 2)),  # -; L5; + L1
    # New deals: L6 (day 5, won), L1 (12, proposal), L3 (36, negotiation), L2 (40, won).
    ("crm_new_deals", "all", (2, 3, 4)),
    ("crm_rep_new_deals", "rep:r1", (1, 2, 3)),  # L2; + L1; + L6
    ("crm_source_new_deals", "source:ads", (1, 1, 1)),  # L3
    ("crm_deals_per_100_leads", "all", (100 * 2 / 2, 100 * 3 / 5, 100 * 4 / 7)),
    ("crm_source_deals_per_100_leads", "source:web", (100 * 1 / 1, 100 * 2 / 3, 100 * 3 / 5)),
    ("crm_conversion_ratio", "all", (2 / 2, 3 / 5, 4 / 7)),
    ("crm_source_conversion_ratio", "source:web", (1 / 1, 2 / 3, 3 / 5)),  # wins L2; + L1; + L6
    ("crm_score_band_conversion_ratio", "score_band:80-100", (None, 1 / 1, 1 / 2)),  # 0/0; L1 won / L5; / L1, L5
    # Leads before: days 27..33: L7 → (2 − 1) / 1; days -19..10: L1, L6 → (5 − 2) / 2; all time: undefined.
    ("crm_lead_velocity_ratio", "all", (1.0, 1.5, None)),
    # Quotes sent: q6 (5), q1 (12), q5 (20), q2, q3 (36); accepted: q6 (5), q1 (20), q2 (40).
    ("crm_quote_success_ratio", "all", (1 / 2, 2 / 4, 3 / 5)),
    ("crm_rep_quote_success_ratio", "rep:r1", (1 / 1, 2 / 3, 3 / 4)),  # q3 is r2's
    # Calls: in L6 (5, r1), L2 (36, r1); out L1 (12, r1), L3 + L4 (40, r2). L3's e-mail is not a call.
    ("crm_calls{direction=inbound}", "all", (1, 1, 2)),
    ("crm_calls{direction=outbound}", "all", (2, 3, 3)),
    ("crm_rep_calls{direction=inbound}", "rep:r1", (1, 1, 2)),
    ("crm_rep_calls{direction=outbound}", "rep:r1", (0, 1, 1)),
    ("crm_sales_per_call_ratio", "all", (2 / 3, 3 / 4, 4 / 5)),
    ("crm_rep_sales_per_call_ratio", "rep:r2", (1 / 2, 1 / 2, 1 / 2)),  # L3 won / L3, L4 calls
    # Marketing. Spring touches 5, 20, 36, 40, autumn 38; clicks 20, 40; response 36.
    ("crm_touches", "all", (3, 4, 5)),
    ("crm_campaign_touches", "campaign:spring", (2, 3, 4)),
    ("crm_clicks", "all", (1, 2, 2)),
    ("crm_campaign_clicks", "campaign:spring", (1, 2, 2)),
    ("crm_responses", "all", (1, 1, 1)),
    ("crm_campaign_responses", "campaign:spring", (1, 1, 1)),
    # Spend: spring acquisition 1000 (5), 700 (20), 300 (40); autumn retention 100 (5), 200 (36).
    ("crm_spend", "all", (500, 1200, 2300)),
    ("crm_campaign_spend", "campaign:spring", (300, 1000, 2000)),
    ("crm_acquisition_spend", "all", (300, 1000, 2000)),
    ("crm_retention_spend", "all", (200, 200, 300)),
    ("crm_customer_acquisition_cost", "all", (300 / 2, 1000 / 3, 2000 / 4)),  # / deals won
    # Customers. Renewals C2 (30), C5 (37); cancellations C3 (8), C9 (11), C1 (36), C6 (40).
    ("crm_renewals", "all", (1, 2, 2)),
    ("crm_cancellations", "all", (2, 3, 4)),
    ("crm_renewal_ratio", "all", (1 / 3, 2 / 5, 2 / 6)),
    # Purchases: C2 100 (5), 300 (36), 200 (40); C4 400 (20); C5 600 (38).
    ("crm_purchases", "all", (3, 4, 5)),
    ("crm_purchase_revenue", "all", (1100, 1500, 1600)),
    ("crm_average_purchase_value", "all", (1100 / 3, 1500 / 4, 1600 / 5)),
    ("crm_purchase_frequency", "all", (3 / 2, 4 / 3, 5 / 3)),  # purchasers: C2, C5; + C4; same
    # NPS: 10 (40), 9 (36), 6 (38) | 8 (20) | 0 (5). Effort: 2, 6, 4 | 3.
    ("crm_nps_score", "all", (100 * (2 - 1) / 3, 100 * (2 - 1) / 4, 100 * (2 - 2) / 5)),
    ("crm_nps_responses", "all", (3, 4, 5)),
    ("crm_customer_effort_score", "all", (12 / 3, 15 / 4, 15 / 4)),
    # Tickets opened: T4 (5), T2 (20), T1 (36), T3 (38), T5 (39); resolved: T4 (5), T2 (30), T1 (36), T3 (40).
    ("crm_tickets_opened", "all", (3, 4, 5)),
    ("crm_tickets_resolved", "all", (2, 3, 4)),
    ("crm_first_contact_resolution_ratio", "all", (2 / 2, 2 / 3, 3 / 4)),  # all but T2
    ("crm_complaints", "all", (1, 2, 3)),
    # Adoption. Users' latest activity: u1 40, u2 36, u3 20 (twice). Reps': r1 36, r2 40, r3 31.
    ("crm_active_users", "all", (2, 3, 3)),
    ("crm_user_actions", "all", (2, 4, 5)),
    ("crm_active_reps", "all", (2, 3, 3)),
    # Lead activities: L6 (5), L1 (12), L7 (31), L2 (36), L3 × 2 + L4 (40).
    ("crm_activities", "all", (4, 6, 7)),
    ("crm_rep_activities", "rep:r1", (1, 2, 3)),
    ("crm_activities_per_rep_per_day", "all", (4 / (2 * 7), 6 / (3 * 30), None)),
]
SERIES = {series(kpi, dimension): kpi for kpi in KPIS for dimension in (None, *kpi.dimensions)}


def test_every_kpi_series_of_the_catalogue_has_a_case():
    cased = {name for name, _, _ in CASES}
    assert [series(k, d) for k in KPIS for d in (None, *k.dimensions) if series(k, d) not in cased] == []
    assert len(cased) == len(CASES)


@pytest.fixture(scope="module")
def history():
    return Fold(*HISTORY)


@pytest.mark.parametrize("name, scope, expected", CASES, ids=[f"{n}@{s}" for n, s, _ in CASES])
def test_kpi(history, name, scope, expected):
    kpi = SERIES[name]
    assert series(kpi, None if scope == "all" else scope.partition(":")[0]) == name
    assert history.kpi(kpi, scope) == approx(expected)


def test_customer_base_kpis(history):
    # Spells: C1 (-10, 36), C2 (0, -), C3 (5, 8) and (38, -), C4 (20, -), C5 (2, -), C6 (1, 40), C7 (39, -),
    # C8 (11, -), C9 (3, 11). Active at the start of days 11..40 (started before day 11, not ended before it):
    # C1, C2, C5, C6, C9 = 5; of them churned (ended by day 40): C1, C6, C9 = 3; active now (started by day 40,
    # not ended by it): C2, C3, C4, C5, C7, C8 = 6.
    assert history.customer_kpis() == approx({
        "churn_ratio": 3 / 5,
        "retention_ratio": 1 - 3 / 5,
        "customers_active_at_window_start": 5,
        "customers_churned": 3,
        "customer_base_growth_ratio": (6 - 5) / 5,
        # 30d: average purchase 1500 / 4 = 375 × frequency 4 / 3 purchasers × lifespan 1 / 0.6 periods of 30 days
        "customer_lifetime_value": 375 * 4 / 3 / 0.6,
        "retention_cost_per_retained_customer": 200 / (5 - 3),  # 30d retention spend / retained
        "complaint_ratio": 2 / 6,  # 30d complaints / active now
    })  # fmt: skip


def test_customer_base_kpis_without_churn_or_base():
    # C1 active throughout and buying; nobody cancels: churn 0 → lifespan and LTV undefined.
    fold = Fold(customer("C1", "customer.subscribed", 1), customer("C1", "customer.purchase", 39, {"amount": 50}))
    assert fold.customer_kpis() == approx({
        "churn_ratio": 0.0, "retention_ratio": 1.0, "customers_active_at_window_start": 1, "customers_churned": 0,
        "customer_base_growth_ratio": 0.0, "customer_lifetime_value": None,
        "retention_cost_per_retained_customer": 0.0, "complaint_ratio": 0.0,
    })  # fmt: skip
    # C2 subscribes inside the window and cancels today: nobody was active at the start, nobody is now.
    fold = Fold(customer("C2", "customer.subscribed", 20), customer("C2", "customer.cancelled", 40))
    assert fold.customer_kpis() == {
        "churn_ratio": None, "retention_ratio": None, "customers_active_at_window_start": 0, "customers_churned": 0,
        "customer_base_growth_ratio": None, "customer_lifetime_value": None,
        "retention_cost_per_retained_customer": None, "complaint_ratio": None,
    }  # fmt: skip


# --- duration histograms ------------------------------------------------------------------------------------------


def test_stage_dwell_histogram_with_a_late_stage_change():
    # A: new (day 30 00:00) → qualified (30 06:00) → proposal (36 06:00) → won (40 06:00), the move to qualified
    # delivered last; B: new (38 00:00) → qualified (40 00:00); C: new (1 00:00) → qualified (2 00:00).
    a_qualified = moved("A", 30, "qualified", hour=6)
    fold = Fold(created("A", 30, hour=0, source="web"), moved("A", 36, "proposal", hour=6),
                lead("A", "deal.won", 40, {"amount": 1}, hour=6),
                created("B", 38, hour=0, source="web"), moved("B", 40, "qualified", hour=0),
                created("C", 1, hour=0, source="web"), moved("C", 2, "qualified", hour=0))  # fmt: skip
    assert fold.hist("dwell:new")[1][:2] == (2, (6 * 86400 + 6 * 3600 + 2 * 86400) / 2)  # A's 6 d 6 h, for now
    fold(a_qualified)
    # Left "new": A after 6 h (day 30), B after 2 d (day 40), C after 1 d (day 2). Buckets (1 h, 6 h], (12 h, 1 d],
    # (1 d, 2 d]. 7d: B only, p50 = 1 d + 0.5 × 1 d, p90 = 1 d + 0.9 × 1 d. 30d: A, B: p50 = rank 1 → top of
    # (1 h, 6 h] = 6 h, p90 = rank 1.8 → 1 d + 0.8 × 1 d. All: p50 = rank 1.5 → 12 h + 0.5 × 12 h,
    # p90 = rank 2.7 → 1 d + 0.7 × 1 d.
    assert fold.hist("dwell:new") == approx([
        (1, 2 * 86400, 1.5 * 86400, 1.9 * 86400),
        (2, (6 * 3600 + 2 * 86400) / 2, 6 * 3600, 1.8 * 86400),
        (3, (6 * 3600 + 2 * 86400 + 86400) / 3, 18 * 3600, 1.7 * 86400),
    ])  # fmt: skip
    assert [n for n, *_ in fold.hist("dwell:qualified")] == [1, 1, 1]  # A: 6 d, left day 36 (B, C are still there)
    assert fold.hist("dwell:proposal")[0] == approx((1, 4 * 86400, 3 * 86400 + 0.5 * 2 * 86400, 4.8 * 86400))


def test_sales_cycle_when_the_win_arrives_before_the_lead():
    # W1: won day 40 12:00, delivered before its lead.created (day 30 12:00): 10 days, counted on day 40.
    # W2: created day 5 00:00, won day 20 00:00: 15 days.
    fold = Fold(lead("W1", "deal.won", 40, {"amount": 1000}, hour=12))
    assert fold.hist("cycle:all")[2][0] == 0  # no creation time yet: no cycle
    fold(created("W1", 30, hour=12, source="web"), created("W2", 5, hour=0, source="web"),
         lead("W2", "deal.won", 20, {"amount": 1}, hour=0))  # fmt: skip
    # 10 d is in (7 d, 10 d], 15 d in (14 d, 21 d]. 30d p50 = rank 1 → top of (7 d, 10 d] = 10 d;
    # p90 = rank 1.8 → 14 d + 0.8 × 7 d.
    assert fold.hist("cycle:all") == approx([
        (1, 10 * 86400, 8.5 * 86400, 9.7 * 86400),
        (2, 12.5 * 86400, 10 * 86400, 19.6 * 86400),
        (2, 12.5 * 86400, 10 * 86400, 19.6 * 86400),
    ])  # fmt: skip


def test_ticket_resolution_histogram(history):
    # Resolved: T4 after 1 h (day 5), T2 after 10 d (day 30), T1 after 6 h (day 36), T3 after 2 d (day 40).
    # 7d: 6 h, 2 d: p50 = top of (1 h, 6 h], p90 = rank 1.8 → 1 d + 0.8 × 1 d. 30d: + 10 d: p50 = rank 1.5 →
    # 1 d + 0.5 × 1 d, p90 = rank 2.7 → 7 d + 0.7 × 3 d. All: + 1 h: p50 = rank 2 → top of (1 h, 6 h],
    # p90 = rank 3.6 → 7 d + 0.6 × 3 d.
    assert history.hist("resolution:all") == approx([
        (2, (6 * 3600 + 2 * 86400) / 2, 6 * 3600, 1.8 * 86400),
        (3, (6 * 3600 + 12 * 86400) / 3, 1.5 * 86400, 9.1 * 86400),
        (4, (3600 + 6 * 3600 + 12 * 86400) / 4, 6 * 3600, 8.8 * 86400),
    ])  # fmt: skip


# --- out-of-order lead and customer facts -------------------------------------------------------------------------

CONVERSION = SERIES["crm_score_band_conversion_ratio"]
NEW_DEALS = SERIES["crm_source_new_deals"]


def test_late_lead_created_credits_the_win_to_its_score_band_and_source():
    fold = Fold(lead("W", "deal.won", 40, {"amount": 900}, "r1"))
    assert [scope for scope in fold.sums if fold.sums[scope].get("total")] == ["all", "rep:r1"]
    fold(created("W", 30, "r1", source="web", campaign="spring", score=72))
    # The win stays on day 40, now in band 60-79; the lead counts on day 30: 7d 1 win / 0 leads, 30d 1 / 1.
    assert fold.kpi(CONVERSION, "score_band:60-79") == (None, 1.0, 1.0)
    assert [s for s in fold.sums if s.startswith("score_band:") and fold.sums[s].get("total")] == ["score_band:60-79"]
    assert fold.kpi(SERIES["crm_source_conversion_ratio"], "source:web") == (None, 1.0, 1.0)
    assert fold.kpi(NEW_DEALS, "source:web") == (1, 1, 1)  # became a deal when won, on day 40
    assert fold.kpi(SERIES["crm_campaign_won_revenue"], "campaign:spring") == (900, 900, 900)


def test_late_deal_stage_moves_the_new_deal_to_its_day():
    fold = Fold(created("D", 20, source="ads"), moved("D", 36, "proposal"))
    assert fold.kpi(NEW_DEALS, "source:ads") == (1, 1, 1)
    fold(moved("D", 30, "negotiation"))  # delivered late: D became a deal on day 30, not 36
    assert fold.kpi(NEW_DEALS, "source:ads") == (0, 1, 1)
    assert fold.sums["source:ads"]["days"] == {str(D0 + 20): {"leads": 1}, str(D0 + 30): {"new_deals": 1}}


def test_late_contact_and_purchase():
    fcr = SERIES["crm_first_contact_resolution_ratio"]
    fold = Fold(*(customer("C", f"ticket.{kind}", day, {"ticket_id": "T"})
                  for kind, day in (("opened", 36), ("resolved", 38), ("contacted", 37))))  # fmt: skip
    assert fold.kpi(fcr, "all") == (1.0, 1.0, 1.0)  # one contact before resolution
    fold(customer("C", "ticket.contacted", 36, {"ticket_id": "T"}, hour=12))  # a second, delivered late
    assert fold.kpi(fcr, "all") == (0.0, 0.0, 0.0)
    fold(customer("C", "customer.purchase", 40, {"amount": 10}), customer("C", "customer.purchase", 20, {"amount": 30}))
    assert fold.kpi(SERIES["crm_purchase_frequency"], "all") == (1.0, 2.0, 2.0)  # one purchaser, latest day 40


# --- baseline vs current ------------------------------------------------------------------------------------------

BASELINE = (D0 - 100, D0 - 71)  # CRM_PULSE_BASELINE_START/END: 30 days, both included


def fold_baseline(fold: Fold) -> tuple[dict, dict]:
    return baseline_comparison(fold.sums["all"], TODAY)


def test_baseline_comparison():
    fold = Fold(
        created("B0", -101, source="web"),  # the day before the baseline
        *(created(f"B{n}", day, source="web") for n, day in ((1, -100), (2, -95), (3, -90), (4, -71))),
        lead("B1", "deal.won", -90, {"amount": 1000}), lead("B2", "deal.won", -80, {"amount": 3000}),
        lead("B3", "deal.lost", -85, {"reason": "price"}), lead("B4", "deal.lost", -75, {"reason": "price"}),
        lead("B4", "lead.activity", -75, {"kind": "call", "direction": "inbound"}),
        lead("B0", "deal.won", -70, {"amount": 500}),  # the day after
        created("N1", 38, source="web"), lead("N1", "deal.won", 40, {"amount": 2500}),
        lead("N2", "deal.lost", 36, {"reason": "price"}),
        baseline=BASELINE,
    )
    assert fold.sums["all"]["baseline"] == {"leads": 4, "won": 2, "won_amount": 4000, "lost": 2, "activities": 1,
                                            "calls_inbound": 1, "new_deals": 2}  # fmt: skip
    then, ratios = fold_baseline(fold)
    assert then["crm_win_rate_ratio"] == 0.5 and then["crm_average_deal_size"] == 2000
    assert then["crm_deals_lost"] == 2 and then["crm_touches"] == 0
    assert "crm_calls" not in then and "crm_lead_velocity_ratio" not in then  # labelled; undefined over a period
    # 7d: 1 won 2500, 1 lost; all time: won 1000, 3000, 500, 2500; lost 3.
    assert ratios[("crm_win_rate_ratio", "7d")] == approx(0.5 / 0.5)
    assert ratios[("crm_average_deal_size", "7d")] == approx(2500 / 2000)
    assert ratios[("crm_average_deal_size", "all")] == approx(7000 / 4 / 2000)
    assert ratios[("crm_win_rate_ratio", "all")] == approx((4 / 7) / 0.5)
    assert ratios[("crm_conversion_ratio", "30d")] == approx((1 / 1) / (2 / 4))
    assert ("crm_touches", "7d") not in ratios  # a zero baseline has no ratio


def test_distinct_counts_have_no_baseline():
    # Distinct counts credit an actor's latest active day only: u1 and C1 are active in the baseline
    # period and again today, so a baseline distinct count would miss them. They are not compared.
    fold = Fold(
        ev("crm.user_activity", at(-90), {"action": "login"}, user_id="u1"),
        ev("crm.user_activity", at(-80), {"action": "login"}, user_id="u2"),
        ev("crm.user_activity", at(40), {"action": "login"}, user_id="u1"),
        *(customer("C1", "customer.purchase", day, {"amount": 10}) for day in (-90, -80, 40)),
        baseline=BASELINE,
    )
    then, ratios = fold_baseline(fold)
    assert not {"crm_active_users", "crm_purchase_frequency"} & set(then)
    # Plain counts are compared: 2 logins and 2 purchases (of 10) in the baseline period.
    assert (then["crm_user_actions"], then["crm_purchases"], then["crm_purchase_revenue"]) == (2, 2, 20)
    assert ratios[("crm_purchases", "all")] == 3 / 2
