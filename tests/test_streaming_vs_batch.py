"""Property: folding events the way the agents do, delivered out of order (inside the grace period) and
with duplicates, gives the same KPIs as a simple batch computation over the de-duplicated, sorted events."""

from bisect import bisect_left
from collections import Counter, defaultdict

import orjson
from hypothesis import given, settings
from hypothesis import strategies as st

from crm_pulse.schemas.validate import parse_event
from crm_pulse.streams.catalogue import apply_sums, event_sums, group_sums, prune_sums, window_sums
from crm_pulse.streams.clock import Clock
from crm_pulse.streams.kpis import (
    DAY_MS,
    DWELL_BUCKETS_SECONDS,
    advance_churn_horizon,
    apply_dwell,
    apply_spell,
    churn,
    day_of,
    dwell_stats,
    prune_days,
)
from crm_pulse.streams.leads import StallPolicy, apply_lead_event, new_lead
from crm_pulse.streams.dedupe import first_seen
from crm_pulse.streams.entities import apply_customer_event
from crm_pulse.streams.families import LEAD_TYPES, OVERALL

GRACE_MS = 2 * DAY_MS  # the default CRM_PULSE_GRACE_SECONDS
DEDUPE_HORIZON_MS = GRACE_MS  # the shortest horizon Settings accept: ids are forgotten as early as allowed
RETENTION_DAYS = 60 + 2 + 2  # agents/app.py: longest window (and the one before it) + grace days + 2
HORIZON_SLACK_DAYS = 30 + 2 + 2  # agents/customers.py: churn window + grace days + 2
POLICY = StallPolicy()
T0 = 1_767_225_600_000  # 2026-01-01T00:00Z
H = 3_600_000
STAGES = ("new", "qualified", "proposal", "negotiation")
REPS = ("r1", "r2")
WINDOWS = (7, 30)
CUSTOMER_KINDS = ("subscribed", "renewed", "cancelled")
LEAD_PAYLOADS = {
    "lead.stage_changed": st.builds(lambda to: {"from": "new", "to": to}, st.sampled_from(STAGES)),
    "lead.activity": st.just({"kind": "call", "direction": "outbound"}),
    "deal.won": st.builds(lambda amount: {"amount": amount}, st.integers(0, 1000)),
    "deal.lost": st.just({"reason": "price"}),
}

gaps = st.one_of(st.just(0), st.integers(0, 8 * H), st.integers(0, 6 * DAY_MS))  # since the entity's last event


def valid(doc: dict) -> dict:
    """The event as the agents receive it from its family's topic."""
    return parse_event(orjson.dumps(doc)).model_dump(by_alias=True)


@st.composite
def histories(draw):
    """Events of a few leads and customers over ~60 days, ids in random order (they break time ties)."""
    docs = []
    for n in range(draw(st.integers(1, 5))):
        t = T0 + draw(st.integers(0, 50 * DAY_MS))
        created = {"source": "web", "stage": draw(st.sampled_from(STAGES))}
        docs.append({"type": "lead.created", "occurred_at": t, "lead_id": f"L{n}", "rep_id": "r1", "payload": created})
        for kind in draw(st.lists(st.sampled_from(sorted(LEAD_PAYLOADS)), max_size=6)):
            t += draw(gaps)
            rep, payload = draw(st.sampled_from((*REPS, None))), draw(LEAD_PAYLOADS[kind])
            docs.append({"type": kind, "occurred_at": t, "lead_id": f"L{n}", "rep_id": rep, "payload": payload})
    for n in range(draw(st.integers(0, 5))):
        t = T0 + draw(st.integers(0, 50 * DAY_MS))
        for kind in ["subscribed", *draw(st.lists(st.sampled_from(CUSTOMER_KINDS), max_size=5))]:
            t += draw(gaps)
            docs.append({"type": f"customer.{kind}", "occurred_at": t, "customer_id": f"C{n}"})
    for doc, i in zip(docs, draw(st.permutations(range(len(docs))))):
        doc["event_id"] = f"e{i:03d}"
    return [valid(doc) for doc in docs]


@st.composite
def deliveries(draw):
    """Events shuffled within each UTC day, so none arrives a day or more after a later one (grace: 2 days);
    some are delivered a second time within their day."""
    rnd = draw(st.randoms(use_true_random=False))
    by_day = defaultdict(list)
    for event in draw(histories()):
        by_day[day_of(event["occurred_at"])] += [event] * draw(st.sampled_from([1, 1, 1, 2]))
    order = []
    for day in sorted(by_day):
        rnd.shuffle(by_day[day])
        order += by_day[day]
    return order


def stream(order, crash_at: int, resume_at: int):
    """The agents' fold: ingest's lateness check; per entity first_seen, then apply_lead_event or
    apply_customer_event; their deltas into the histogram, KPI-sum and churn aggregates. After reading
    `crash_at` messages the worker crashes and re-reads from offset `resume_at` (its last commit) with a
    new process's clock; the tables keep what was applied."""
    entities: dict = {}
    histograms, sums, customer_base = defaultdict(dict), defaultdict(dict), {}
    duplicates = 0
    reads = [*enumerate(order)][:crash_at] + [*enumerate(order)][resume_at:]
    for read, (offset, event) in enumerate(reads):
        if read in (0, crash_at):
            clock = Clock("event", GRACE_MS)
        at = event["occurred_at"]
        assert not clock.is_late(0, at)
        clock.observe(0, at)
        is_lead = event["type"] in LEAD_TYPES
        key = event["lead_id"] if is_lead else event["customer_id"]
        entity = entities.setdefault(key, new_lead() if is_lead else {})
        # agents/batches.py unseen_events: one input partition, so its watermark is the upstream one.
        forget_before = clock.partition_watermark(0) - (DEDUPE_HORIZON_MS - GRACE_MS)
        if not first_seen(entity, event, 0, offset, forget_before):
            duplicates += 1
            continue
        if is_lead:  # alerts are not compared here: a fixed threshold will do
            fact_deltas, _ = apply_lead_event(entity, event, key, POLICY, lambda stage: (7 * DAY_MS, "stage_threshold"))
        else:
            spell_deltas, fact_deltas = apply_customer_event(entity, event)
            for start, end, sign in spell_deltas:  # agents/customers.py aggregate_churn
                advance_churn_horizon(customer_base, day_of(at) - HORIZON_SLACK_DAYS)
                apply_spell(customer_base, start, end, sign)
        # agents/aggregates.py: DeltaSender.facts, then aggregate_histograms and aggregate_sums
        contributions = [(scope, at, values, 1) for scope, values in event_sums(event)]
        for fact, sign in fact_deltas:
            if fact[0] == "hist":
                _, scope, fact_at, ms = fact
                apply_dwell(histograms[scope], day_of(fact_at), ms, sign)
                prune_days(histograms[scope], day_of(fact_at) - RETENTION_DAYS)
            else:
                _, scope, fact_at, field, value = fact
                contributions.append((scope, fact_at, {field: value}, sign))
        for (scope, day, sign), values in group_sums(contributions).items():
            apply_sums(sums[scope], day, values, sign)
            prune_sums(sums[scope], day - RETENTION_DAYS)
    return histograms, sums, customer_base, duplicates


# --- the batch oracle --------------------------------------------------------------------------


def entered_stage(event):
    return {"lead.created": event["payload"].get("stage"), "lead.stage_changed": event["payload"].get("to"),
            "deal.won": "won", "deal.lost": "lost"}.get(event["type"])  # fmt: skip


def in_window(ms, now, days):
    return day_of(now) - days < day_of(ms) <= day_of(now)


def batch_dwell(events, now, days):
    """{stage: (count, sum_ms, Counter(bucket))} of stays that ended in the window. A lead's history starts
    with its creation: of entries at the same time, the creation comes first (nothing here is dated before it)."""
    entries = defaultdict(list)
    for e in events:
        if entered_stage(e):
            entries[e["lead_id"]].append((e["occurred_at"], e["type"] != "lead.created", e["event_id"], entered_stage(e)))
    result = defaultdict(lambda: (0, 0, Counter()))
    for stays in entries.values():
        stays.sort()
        for (entered, _, _, stage), (left, *_) in zip(stays, stays[1:]):
            if in_window(left, now, days):
                count, total, buckets = result[stage]
                buckets[bisect_left(DWELL_BUCKETS_SECONDS, (left - entered) / 1000)] += 1
                result[stage] = (count + 1, total + left - entered, buckets)
    return result


def batch_win_rate(events, now, days, rep=None):
    """(won, lost) deals closed in the window, by any rep or by `rep`."""
    decided = [e["type"] for e in events if e["type"] in ("deal.won", "deal.lost")
               and in_window(e["occurred_at"], now, days) and rep in (None, e["rep_id"])]  # fmt: skip
    return decided.count("deal.won"), decided.count("deal.lost")


def batch_churn(events, now, days):
    """(active at start, churned, active now): a customer is active after subscribing or renewing, until cancelling."""
    first, last = day_of(now) - days + 1, day_of(now)
    timelines = defaultdict(list)
    for e in sorted(events, key=lambda e: (e["occurred_at"], e["event_id"])):
        if e["type"].startswith("customer."):
            timelines[e["customer_id"]].append((day_of(e["occurred_at"]), e["type"]))

    def active_after(timeline, day):
        kinds = [kind for d, kind in timeline if d <= day]
        return bool(kinds) and kinds[-1] != "customer.cancelled"

    at_start = churned = active_now = 0
    for timeline in timelines.values():
        was_active = active_after(timeline, first - 1)
        at_start += was_active
        churned += was_active and any(first <= d <= last and k == "customer.cancelled" for d, k in timeline)
        active_now += active_after(timeline, last)
    return at_start, churned, active_now


@settings(max_examples=500, deadline=None)
@given(deliveries(), st.data())
def test_streaming_fold_matches_batch(order, data):
    crash_at = data.draw(st.integers(0, len(order)), label="crash after reading")
    resume_at = data.draw(st.integers(0, crash_at), label="re-read from offset")
    histograms, sums, customer_base, duplicates = stream(order, crash_at, resume_at)
    unique = {e["event_id"]: e for e in order}.values()
    now = max(e["occurred_at"] for e in unique)

    assert duplicates == len(order) - len(unique) + crash_at - resume_at
    for days in WINDOWS:
        expected = batch_dwell(unique, now, days)
        stages = {scope.removeprefix("dwell:") for scope in histograms if scope.startswith("dwell:")}
        for stage in stages | set(expected):
            stats = dwell_stats(histograms[f"dwell:{stage}"], now, days)
            count, total_ms, buckets = expected[stage]
            assert (stats.count, stats.sum_seconds) == (count, total_ms / 1000), (stage, days)
            assert stats.buckets == tuple(buckets[i] for i in range(len(DWELL_BUCKETS_SECONDS) + 1)), (stage, days)

        for scope, rep in [(OVERALL, None)] + [(f"rep:{rep}", rep) for rep in REPS]:
            window = window_sums(sums[scope], day_of(now), days)
            won_lost = window.get("won", 0), window.get("lost", 0)
            assert won_lost == batch_win_rate(unique, now, days, rep), (scope, days)

        result = churn(customer_base, now, days)
        assert (result.active_at_start, result.churned, result.active_now) == batch_churn(unique, now, days), days
