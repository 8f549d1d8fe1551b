"""The KPI catalogue: which sums every event contributes, and every KPI as a formula over windowed sums.

Sums are kept per *scope* — "all", or one dimension value such as "rep:r7", "source:web",
"campaign:spring", "score_band:60-79" — as per-day dicts {field: value} plus all-time and baseline
totals. A KPI is a formula over the sums of one window (and, for growth rates, of the window before it).
Facts that depend on an entity's whole history (a lead's sales cycle, a customer's latest purchase) are
derived from its state and diffed like stage dwell, so out-of-order events retract what they replace.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from datetime import tzinfo
from typing import Callable, Mapping

from crm_pulse.streams.kpis import churn_between, customers_started, day_of, dwell_observations
from crm_pulse.streams.periods import period_days, previous_period, stored_cells, stored_keys

WINDOWS: dict[str, int | None] = {"7d": 7, "30d": 30, "all": None}
SCORE_BANDS = ((0, 19), (20, 39), (40, 59), (60, 79), (80, 100))
ZERO = 1e-9
TOUCH_FIELDS = {"touch": "touches", "click": "clicks", "response": "responses"}


def score_band(score: int) -> str:
    return next(f"{low}-{high}" for low, high in SCORE_BANDS if low <= score <= high)


# --- sums ----------------------------------------------------------------------------------------


def _add(cell: dict, values: Mapping[str, float], sign: int) -> None:
    for field, value in values.items():
        total = cell.get(field, 0) + sign * value
        if abs(total) < ZERO:
            cell.pop(field, None)
        else:
            cell[field] = total


def apply_sums(state: dict, day: int, values: Mapping[str, float], sign: int = 1,
               baseline: tuple[int, int] | None = None) -> None:  # fmt: skip
    """Add (or retract) `values` on `day`, to the day's bucket, its week's and month's cells (kept for good,
    unlike the days), the all-time total and, when the day falls inside the configured baseline period
    (first day, last day), to the baseline total."""
    days = state.setdefault("days", {})
    _add(days.setdefault(str(day), {}), values, sign)
    if not days[str(day)]:
        del days[str(day)]
    periods = state.setdefault("periods", {})
    for kind, label in stored_keys(day):
        cells = periods.setdefault(kind, {})
        _add(cells.setdefault(label, {}), values, sign)
        if not cells[label]:
            del cells[label]
    _add(state.setdefault("total", {}), values, sign)
    if baseline and baseline[0] <= day <= baseline[1]:
        _add(state.setdefault("baseline", {}), values, sign)


def window_sums(state: dict, today: int, days: int | None, offset_days: int = 0) -> dict[str, float]:
    """Sums over the `days` days ending `offset_days` before `today` (all time when `days` is None)."""
    if days is None:
        return dict(state.get("total", {}))
    sums: dict[str, float] = {}
    cells = state.get("days", {})
    last = today - offset_days
    for day in range(last - days + 1, last + 1):
        for field, value in cells.get(str(day), {}).items():
            sums[field] = sums.get(field, 0) + value
    return sums


def period_sums(state: dict, kind: str, label: str) -> dict[str, float]:
    """Sums over one calendar period (`streams.periods`)."""
    sums: dict[str, float] = {}
    for stored, cell in stored_cells(kind, label):
        for field, value in state.get("periods", {}).get(stored, {}).get(cell, {}).items():
            sums[field] = sums.get(field, 0) + value
    return sums


def prune_sums(state: dict, oldest_day: int) -> None:
    days = state.get("days", {})
    for key in [k for k in days if int(k) < oldest_day]:
        del days[key]


# --- KPI formulas ----------------------------------------------------------------------------------


def ratio(numerator: float, denominator: float, scale: float = 1.0) -> float | None:
    return scale * numerator / denominator if denominator else None


Formula = Callable[[Mapping[str, float], Mapping[str, float], "int | None"], "float | None"]


def count(field: str) -> Formula:
    return lambda sums, previous, days: sums.get(field, 0)


def per(numerator: str, *denominators: str, scale: float = 1.0) -> Formula:
    return lambda s, previous, days: ratio(s.get(numerator, 0), sum(s.get(d, 0) for d in denominators), scale)


def growth(field: str) -> Formula:
    """(this window − the window before) / the window before; undefined over all time."""
    return lambda s, previous, days: None if days is None else ratio(
        s.get(field, 0) - previous.get(field, 0), previous.get(field, 0)
    )


def nps(s, previous, days):
    return ratio(s.get("promoters", 0) - s.get("detractors", 0), s.get("nps_responses", 0), 100)


def activities_per_rep_per_day(s, previous, days):
    return None if days is None else ratio(s.get("activities", 0), s.get("active_reps", 0) * days)


@dataclass(frozen=True)
class Kpi:
    """A gauge `crm_<name>` for scope "all", and `crm_<dimension>_<name>{<dimension>=…}` per dimension."""

    name: str
    help: str
    formula: Formula
    dimensions: tuple[str, ...] = ()
    labels: tuple[tuple[str, str], ...] = ()  # constant labels, e.g. a call's direction
    # Distinct counts (purchasers, active users/reps) count an actor on its latest active day only,
    # which is right for windows ending today but not for a baseline period in the past.
    has_baseline: bool = True
    # Also per calendar period (`period_kpis`): the KPIs sales reporting reads by week, month and quarter.
    in_periods: bool = False

    def metric(self, dimension: str | None) -> str:
        return f"crm_{dimension}_{self.name}" if dimension else f"crm_{self.name}"


KPIS = (
    # Sales
    Kpi("deals_won", "Deals won in the window.", count("won"), ("rep",), in_periods=True),
    Kpi("deals_lost", "Deals lost in the window.", count("lost"), ("rep",), in_periods=True),
    Kpi("win_rate_ratio", "Won / (won + lost) deals closed in the window.", per("won", "won", "lost"), ("rep",),
        in_periods=True),  # fmt: skip
    Kpi("won_revenue", "Amount of deals won in the window.", count("won_amount"), ("rep", "campaign"),
        in_periods=True),  # fmt: skip
    Kpi("average_deal_size", "Won revenue / deals won (the average check).", per("won_amount", "won"), ("rep",),
        in_periods=True),  # fmt: skip
    Kpi("new_leads", "Leads created in the window.", count("leads"), ("rep", "source", "campaign", "score_band"),
        in_periods=True),  # fmt: skip
    Kpi("new_deals", "Leads that became deals (entered a deal stage or were won) in the window.",
        count("new_deals"), ("rep", "source"), in_periods=True),  # fmt: skip
    Kpi("deals_per_100_leads", "New deals per 100 new leads in the window.",
        per("new_deals", "leads", scale=100), ("source",)),  # fmt: skip
    Kpi("conversion_ratio", "Deals won / leads created in the window.", per("won", "leads"), ("score_band", "source"),
        in_periods=True),  # fmt: skip
    Kpi("lead_velocity_ratio", "(New leads in the window − in the window before) / in the window before.",
        growth("leads"), in_periods=True),  # fmt: skip
    Kpi("quote_success_ratio", "Quotes accepted / quotes sent in the window.", per("quotes_accepted", "quotes_sent"),
        ("rep",)),  # fmt: skip
    Kpi("calls", "Calls logged in the window, by direction.", count("calls_inbound"), ("rep",),
        (("direction", "inbound"),)),  # fmt: skip
    Kpi("calls", "Calls logged in the window, by direction.", count("calls_outbound"), ("rep",),
        (("direction", "outbound"),)),  # fmt: skip
    Kpi("sales_per_call_ratio", "Deals won / calls in the window.", per("won", "calls_inbound", "calls_outbound"),
        ("rep",)),  # fmt: skip
    # Marketing
    Kpi("touches", "Campaign touches in the window.", count("touches"), ("campaign",)),
    Kpi("clicks", "Campaign clicks in the window.", count("clicks"), ("campaign",)),
    Kpi("responses", "Campaign responses in the window.", count("responses"), ("campaign",)),
    Kpi("spend", "Marketing spend in the window.", count("spend"), ("campaign",)),
    Kpi("acquisition_spend", "Marketing spend with purpose acquisition in the window.", count("acquisition_spend")),
    Kpi("retention_spend", "Marketing spend with purpose retention in the window.", count("retention_spend")),
    Kpi("customer_acquisition_cost", "CAC: acquisition spend / deals won in the window.",
        per("acquisition_spend", "won")),  # fmt: skip
    # Customers
    Kpi("renewals", "Subscription renewals in the window.", count("renewals")),
    Kpi("cancellations", "Subscription cancellations in the window.", count("cancellations")),
    Kpi("renewal_ratio", "Renewals / (renewals + cancellations) in the window.",
        per("renewals", "renewals", "cancellations")),  # fmt: skip
    Kpi("purchases", "Purchases in the window.", count("purchases")),
    Kpi("purchase_revenue", "Purchase amounts in the window.", count("purchase_amount")),
    Kpi("average_purchase_value", "Purchase revenue / purchases in the window.", per("purchase_amount", "purchases")),
    Kpi("purchase_frequency", "Purchases / distinct purchasing customers in the window.",
        per("purchases", "purchasers"), has_baseline=False),  # fmt: skip
    Kpi("nps_score", "Net Promoter Score: % promoters (9-10) − % detractors (0-6) of responses in the window.", nps),
    Kpi("nps_responses", "Survey responses with an NPS answer in the window.", count("nps_responses")),
    Kpi("customer_effort_score", "Mean customer effort answer (1 easy - 7 hard) in the window.",
        per("effort_sum", "effort_responses")),  # fmt: skip
    Kpi("tickets_opened", "Support tickets opened in the window.", count("tickets_opened")),
    Kpi("tickets_resolved", "Support tickets resolved in the window.", count("tickets_resolved")),
    Kpi("first_contact_resolution_ratio", "Tickets resolved with at most one contact / tickets resolved.",
        per("first_contact_resolutions", "tickets_resolved")),  # fmt: skip
    Kpi("complaints", "Complaints filed in the window.", count("complaints")),
    # Adoption of the CRM itself
    Kpi("active_users", "Distinct CRM users with activity in the window.", count("active_users"), has_baseline=False),
    Kpi("active_reps", "Distinct reps who logged a lead activity in the window.", count("active_reps"), has_baseline=False),
    Kpi("user_actions", "CRM user actions in the window.", count("user_actions")),
    Kpi("activities", "Lead activities (calls, e-mails, meetings, notes) logged in the window.", count("activities"),
        ("rep",)),  # fmt: skip
    Kpi("activities_per_rep_per_day", "Lead activities / active reps / days in the window.",
        activities_per_rep_per_day, has_baseline=False),  # fmt: skip
)


PERIOD_KPIS = tuple(kpi for kpi in KPIS if kpi.in_periods)


def period_kpis(state: dict, kind: str, label: str) -> list[tuple[Kpi, float]]:
    """(kpi, value) of every period KPI defined over one calendar period; growth compares it with the period
    before it."""
    first, last = period_days(kind, label)
    sums, previous = period_sums(state, kind, label), period_sums(state, kind, previous_period(kind, label))
    values = ((kpi, kpi.formula(sums, previous, last - first + 1)) for kpi in PERIOD_KPIS)
    return [(kpi, value) for kpi, value in values if value is not None]


def baseline_comparison(state: dict, today: int) -> tuple[dict[str, float], dict[tuple[str, str], float]]:
    """For the "all" sums: ({metric: value over the baseline period}, {(metric, window): now / baseline})."""
    baseline_values: dict[str, float] = {}
    ratios: dict[tuple[str, str], float] = {}
    for kpi in KPIS:
        then = kpi.formula(state.get("baseline", {}), {}, None) if kpi.has_baseline and not kpi.labels else None
        if then is None:
            continue
        baseline_values[kpi.metric(None)] = then
        for window, days in WINDOWS.items():
            now = kpi.formula(window_sums(state, today, days), {}, days)
            if now is not None and then:
                ratios[(kpi.metric(None), window)] = now / then
    return baseline_values, ratios


def customer_base_kpis(base, sums: Mapping[str, float]) -> dict[str, float | None]:
    """KPIs over one window that combine the customer base (a `streams.kpis.Churn`) with its KPI sums."""
    churn_ratio = base.churn_ratio
    retained = base.active_at_start - base.churned
    purchase_value = ratio(sums.get("purchase_amount", 0), sums.get("purchases", 0))
    frequency = ratio(sums.get("purchases", 0), sums.get("purchasers", 0))
    lifespan_windows = ratio(1, churn_ratio) if churn_ratio else None
    return {
        "churn_ratio": churn_ratio,
        "retention_ratio": base.retention_ratio,
        "customers_active_at_window_start": base.active_at_start,
        "customers_churned": base.churned,
        "customer_base_growth_ratio": ratio(base.active_now - base.active_at_start, base.active_at_start),
        "customer_lifetime_value": None if None in (purchase_value, frequency, lifespan_windows)
        else purchase_value * frequency * lifespan_windows,
        "retention_cost_per_retained_customer": ratio(sums.get("retention_spend", 0), retained),
        "complaint_ratio": ratio(sums.get("complaints", 0), base.active_now),
    }


# Of `customer_base_kpis`, those that need no distinct counts (see Kpi.has_baseline): exact for a past period.
PERIOD_CUSTOMER_BASE = ("churn_ratio", "retention_ratio", "customers_active_at_window_start", "customers_churned",
                        "customer_base_growth_ratio")  # fmt: skip


def period_customer_base(state: dict, kind: str, label: str) -> dict[str, float | None]:
    """The customer base over one calendar period, from the churn spells, and the customers new in it."""
    first, last = period_days(kind, label)
    values = customer_base_kpis(churn_between(state, first, last), {})
    return {**{name: values[name] for name in PERIOD_CUSTOMER_BASE}, "customers_new": customers_started(state, first, last)}


# --- what each event contributes ------------------------------------------------------------------


def event_sums(event: dict) -> list[tuple[str, dict[str, float]]]:
    """[(scope, {field: value})] that the event adds on its own day, whatever else is known."""
    kind, payload, rep = event["type"], event["payload"], event.get("rep_id")
    values: dict[str, float] = {}
    extra_scopes: list[str] = []
    if kind == "lead.created":
        values["leads"] = 1
        extra_scopes.append(f"source:{payload['source']}")
        if payload.get("campaign"):
            extra_scopes.append(f"campaign:{payload['campaign']}")
        if payload.get("score") is not None:
            extra_scopes.append(f"score_band:{score_band(payload['score'])}")
    elif kind == "deal.won":
        values.update(won=1, won_amount=payload["amount"])
    elif kind == "deal.lost":
        values["lost"] = 1
    elif kind == "lead.activity":
        values["activities"] = 1
        if payload["kind"] == "call":
            values[f"calls_{payload['direction']}"] = 1
    elif kind == "quote.sent":
        values["quotes_sent"] = 1
    elif kind == "quote.accepted":
        values["quotes_accepted"] = 1
    elif kind == "customer.renewed":
        values["renewals"] = 1
    elif kind == "customer.cancelled":
        values["cancellations"] = 1
    elif kind == "customer.purchase":
        values.update(purchases=1, purchase_amount=payload["amount"])
    elif kind == "survey.response":
        if payload.get("nps") is not None:
            score = payload["nps"]
            values.update(nps_responses=1, **{"promoters" if score >= 9 else "passives" if score >= 7 else "detractors": 1})
        if payload.get("effort") is not None:
            values.update(effort_responses=1, effort_sum=payload["effort"])
    elif kind == "ticket.opened":
        values["tickets_opened"] = 1
    elif kind == "ticket.resolved":
        values["tickets_resolved"] = 1
    elif kind == "complaint.filed":
        values["complaints"] = 1
    elif kind == "campaign.touch":
        return [(scope, {TOUCH_FIELDS[payload["kind"]]: 1}) for scope in ("all", f"campaign:{payload['campaign']}")]
    elif kind == "marketing.spend":
        amount = payload["amount"]
        return [("all", {"spend": amount, f"{payload['purpose']}_spend": amount}),
                (f"campaign:{payload['campaign']}", {"spend": amount})]  # fmt: skip
    elif kind == "crm.user_activity":
        values["user_actions"] = 1
    if not values:
        return []
    scopes = ["all", *extra_scopes]
    if rep and kind.startswith(("lead.", "deal.", "quote.")):
        scopes.append(f"rep:{rep}")
    return [(scope, values) for scope in scopes]


# Facts: hashable tuples ("sums", scope, at_ms, field, value) or ("hist", scope, at_ms, value_ms).


def stage_history(lead: dict) -> list:
    """The lead's stage entries [[at_ms, event_id, stage], ...] as they count. Its history starts with its
    creation: an entry dated at or before the `lead.created` time (an export that dates a deal's close before its
    creation, say) counts as entered at that time, after the creation, the entries keeping their own order."""
    timeline, created = lead["timeline"], lead["created"]
    if created is None:
        return timeline
    # .get: a lead stored before creation ids were kept has none; its creation then sorts among the earlier ones.
    creation_id = lead.get("created_id")
    creation = [entry for entry in timeline if entry[1] == creation_id]
    earlier = [[created, event_id, stage] for at, event_id, stage in timeline
               if at <= created and event_id != creation_id]
    return creation + earlier + [entry for entry in timeline if entry[0] > created]


def lead_facts(lead: dict, deal_stages: frozenset[str]) -> Counter:
    """Everything a lead's history contributes beyond its single events: stage dwell, sales cycle,
    its becoming a deal (by rep and source), and its win credited to its score band and campaign."""
    facts: Counter = Counter()
    history = stage_history(lead)
    for (stage, left_at, dwell_ms), n in dwell_observations(history).items():
        facts[("hist", f"dwell:{stage}", left_at, dwell_ms)] += n
    won_at = next((at for at, _, stage in history if stage == "won"), None)
    became_deal_at = next((at for at, _, stage in history if stage in deal_stages or stage == "won"), None)
    if became_deal_at is not None:
        for scope in ("all", f"rep:{lead['rep']}" if lead["rep"] else None, f"source:{lead.get('source')}"
                      if lead.get("source") else None):  # fmt: skip
            if scope:
                facts[("sums", scope, became_deal_at, "new_deals", 1)] += 1
    if won_at is not None:
        if lead["created"] is not None:
            facts[("hist", "cycle:all", won_at, won_at - lead["created"])] += 1
        if lead.get("score") is not None:
            facts[("sums", f"score_band:{score_band(lead['score'])}", won_at, "won", 1)] += 1
        if lead.get("source"):
            facts[("sums", f"source:{lead['source']}", won_at, "won", 1)] += 1
        if lead.get("campaign"):
            facts[("sums", f"campaign:{lead['campaign']}", won_at, "won_amount", lead.get("won_amount") or 0)] += 1
    return facts


def customer_facts(customer: dict) -> Counter:
    """A customer's latest purchase (so a window counts distinct purchasers: those whose latest purchase
    falls in it), and per resolved ticket its resolution time and whether one contact resolved it."""
    facts: Counter = Counter()
    if customer.get("last_purchase") is not None:
        facts[("sums", "all", customer["last_purchase"], "purchasers", 1)] += 1
    for ticket in customer.get("tickets", {}).values():
        resolved, opened = ticket.get("resolved"), ticket.get("opened")
        if resolved is None:
            continue
        contacts = sum(1 for at in ticket.get("contacts", []) if at <= resolved)
        if contacts <= 1:
            facts[("sums", "all", resolved, "first_contact_resolutions", 1)] += 1
        if opened is not None:
            facts[("hist", "resolution:all", resolved, resolved - opened)] += 1
    return facts


def actor_facts(actor: dict, field: str) -> Counter:
    """A user's or rep's latest activity, so a window counts distinct active users or reps."""
    if actor.get("last_active") is None:
        return Counter()
    return Counter({("sums", "all", actor["last_active"], field, 1): 1})


def split_facts(fact_deltas, event: dict | None, zone: tzinfo | None = None):
    """What one message changes in the keyed aggregates: ([(histogram scope, at_ms, duration_ms, ±1)],
    {(sums scope, day, ±1): {field: value}}) from fact deltas ((fact, ±1)) and the event's own sums."""
    histograms = []
    contributions = [(scope, event["occurred_at"], values, 1) for scope, values in event_sums(event)] if event else []
    for fact, sign in fact_deltas:
        if fact[0] == "hist":
            _, scope, at, ms = fact
            histograms.append((scope, at, ms, sign))
        else:
            _, scope, at, field, value = fact
            contributions.append((scope, at, {field: value}, sign))
    return histograms, group_sums(contributions, zone)


def group_sums(contributions, zone: tzinfo | None = None) -> dict[tuple[str, int, int], dict[str, float]]:
    """Merge [(scope, at_ms, {field: value}, sign)] into one dict per (scope, day in `zone`, sign): one message each."""
    merged: dict[tuple[str, int, int], dict[str, float]] = {}
    for scope, at, values, sign in contributions:
        cell = merged.setdefault((scope, day_of(at, zone), sign), {})
        for field, value in values.items():
            cell[field] = cell.get(field, 0) + value
    return merged
