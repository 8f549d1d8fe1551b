"""Property: folding events the way the agents do, delivered out of order (inside the grace period) and
with duplicates, gives the same KPIs as a simple batch computation over the de-duplicated, sorted events."""

from bisect import bisect_left
from collections import Counter, defaultdict
from datetime import date, datetime, timezone
from zoneinfo import ZoneInfo

import orjson
from hypothesis import given, settings
from hypothesis import strategies as st

from crm_pulse.schemas.validate import parse_event
from crm_pulse.streams.catalogue import apply_sums, event_sums, group_sums, period_sums, prune_sums, window_sums
from crm_pulse.streams.clock import Clock
from crm_pulse.streams.kpis import (
    DAY_MS,
    DWELL_BUCKETS_SECONDS,
    advance_churn_horizon,
    apply_dwell,
    apply_spell,
    churn,
    churn_between,
    customers_started,
    day_of,
    dwell_stats,
    period_dwell_stats,
    prune_days,
)
from crm_pulse.streams.leads import StallPolicy, apply_lead_event, new_lead
from crm_pulse.streams.dedupe import first_seen
from crm_pulse.streams.entities import apply_customer_event
from crm_pulse.streams.families import LEAD_TYPES, OVERALL
from crm_pulse.streams.fold import Fold

GRACE_MS = 2 * DAY_MS  # the default CRM_PULSE_GRACE_SECONDS
DEDUPE_HORIZON_MS = GRACE_MS  # the shortest horizon Settings accept: ids are forgotten as early as allowed
RETENTION_DAYS = 60 + 2 + 2  # agents/app.py: longest window (and the one before it) + grace days + 2
HORIZON_SLACK_DAYS = 184 + 2 + 2  # agents/customers.py: the previous quarter's reach + grace days + 2
AGGREGATE_BATCH = 7  # messages per aggregate batch, which prunes each scope once (agents/batches.Batch)
POLICY = StallPolicy()
T0 = 1_767_225_600_000  # 2026-01-01T00:00Z
H = 3_600_000
STAGES = ("new", "qualified", "proposal", "negotiation")
REPS = ("r1", "r2")
WINDOWS = (7, 30)
# Business time zones: around 2026-01-01 (T0) New York's days start 5 h after UTC's, Kolkata's 5.5 h before,
# Lord Howe's (half-hour summer time) 11 h before.
ZONES = (None, ZoneInfo("America/New_York"), ZoneInfo("Asia/Kolkata"), ZoneInfo("Australia/Lord_Howe"))
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


def stream(order, crash_at: int, resume_at: int, zone=None):
    """The agents' fold: ingest's lateness check; per entity first_seen, then apply_lead_event or
    apply_customer_event; their deltas into the histogram, KPI-sum and churn aggregates. After reading
    `crash_at` messages the worker crashes and re-reads from offset `resume_at` (its last commit) with a
    new process's clock; the tables keep what was applied. Days are `zone`'s calendar days."""
    entities: dict = {}
    histograms, sums, customer_base = defaultdict(dict), defaultdict(dict), {}
    # Per scope, the newest day its deltas reached in the aggregate's current batch.
    newest_histogram_day, newest_sums_day = {}, {}

    def end_aggregate_batch():
        for scope, day in newest_histogram_day.items():
            prune_days(histograms[scope], day - RETENTION_DAYS)
        for scope, day in newest_sums_day.items():
            prune_sums(sums[scope], day - RETENTION_DAYS)
        newest_histogram_day.clear()
        newest_sums_day.clear()

    duplicates = 0
    reads = [*enumerate(order)][:crash_at] + [*enumerate(order)][resume_at:]
    for read, (offset, event) in enumerate(reads):
        if read % AGGREGATE_BATCH == 0:
            end_aggregate_batch()
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
            spell_deltas, fact_deltas = apply_customer_event(entity, event, zone)
            for start, end, sign in spell_deltas:  # agents/customers.py aggregate_churn
                advance_churn_horizon(customer_base, day_of(at, zone) - HORIZON_SLACK_DAYS)
                apply_spell(customer_base, start, end, sign)
        # agents/aggregates.py: DeltaSender.facts, then aggregate_histograms and aggregate_sums
        contributions = [(scope, at, values, 1) for scope, values in event_sums(event)]
        for fact, sign in fact_deltas:
            if fact[0] == "hist":
                _, scope, fact_at, ms = fact
                apply_dwell(histograms[scope], day_of(fact_at, zone), ms, sign)
                newest_histogram_day[scope] = max(day_of(fact_at, zone), newest_histogram_day.get(scope, 0))
            else:
                _, scope, fact_at, field, value = fact
                contributions.append((scope, fact_at, {field: value}, sign))
        for (scope, day, sign), values in group_sums(contributions, zone).items():
            apply_sums(sums[scope], day, values, sign)
            newest_sums_day[scope] = max(day, newest_sums_day.get(scope, 0))
    end_aggregate_batch()
    return histograms, sums, customer_base, duplicates


# --- the batch oracle --------------------------------------------------------------------------


def entered_stage(event):
    return {"lead.created": event["payload"].get("stage"), "lead.stage_changed": event["payload"].get("to"),
            "deal.won": "won", "deal.lost": "lost"}.get(event["type"])  # fmt: skip


def local_date(ms, zone) -> date:
    return datetime.fromtimestamp(ms / 1000, timezone.utc).astimezone(zone or timezone.utc).date()


def local_day(ms, zone) -> int:
    return (local_date(ms, zone) - date(1970, 1, 1)).days


def calendar_periods(zone):
    """{kind: function of an event time → (its period's label, first day, last day)}, from the calendar alone."""
    def span(first: date, last: date) -> tuple[int, int]:
        return (first - date(1970, 1, 1)).days, (last - date(1970, 1, 1)).days

    def week(ms):
        d = local_date(ms, zone)
        year, number, weekday = d.isocalendar()
        return (f"{year}-W{number:02d}", *span(date.fromordinal(d.toordinal() - weekday + 1),
                                                date.fromordinal(d.toordinal() - weekday + 7)))  # fmt: skip

    def month(ms):
        d = local_date(ms, zone)
        following = date(d.year + d.month // 12, d.month % 12 + 1, 1)
        return (f"{d.year}-{d.month:02d}", *span(d.replace(day=1), date.fromordinal(following.toordinal() - 1)))

    def quarter(ms):
        d = local_date(ms, zone)
        q = (d.month - 1) // 3
        following = date(d.year + (q == 3), (3 * q + 3) % 12 + 1, 1)
        return (f"{d.year}-Q{q + 1}", *span(date(d.year, 3 * q + 1, 1), date.fromordinal(following.toordinal() - 1)))

    return {"week": week, "month": month, "quarter": quarter}


def rolling(now, days, zone):
    """Whether an event time falls in the `days` calendar days of `zone` ending with the day of `now`."""
    return lambda ms: local_day(now, zone) - days < local_day(ms, zone) <= local_day(now, zone)


def batch_dwell(events, inside):
    """{stage: (count, sum_ms, Counter(bucket))} of stays that ended when `inside` holds. A lead's history starts
    with its creation: of entries at the same time, the creation comes first (nothing here is dated before it)."""
    entries = defaultdict(list)
    for e in events:
        if entered_stage(e):
            entries[e["lead_id"]].append((e["occurred_at"], e["type"] != "lead.created", e["event_id"], entered_stage(e)))
    result = defaultdict(lambda: (0, 0, Counter()))
    for stays in entries.values():
        stays.sort()
        for (entered, _, _, stage), (left, *_) in zip(stays, stays[1:]):
            if inside(left):
                count, total, buckets = result[stage]
                buckets[bisect_left(DWELL_BUCKETS_SECONDS, (left - entered) / 1000)] += 1
                result[stage] = (count + 1, total + left - entered, buckets)
    return result


def batch_win_rate(events, inside, rep=None):
    """(won, lost) deals closed when `inside` holds, by any rep or by `rep`."""
    decided = [e["type"] for e in events if e["type"] in ("deal.won", "deal.lost")
               and inside(e["occurred_at"]) and rep in (None, e["rep_id"])]  # fmt: skip
    return decided.count("deal.won"), decided.count("deal.lost")


def batch_new_leads(events, inside):
    return sum(1 for e in events if e["type"] == "lead.created" and inside(e["occurred_at"]))


def batch_churn(events, first, last, zone):
    """(active at start, churned, active at the end, spells begun) from day `first` to day `last` of `zone`: a
    customer is active after subscribing or renewing, until cancelling."""
    timelines = defaultdict(list)
    for e in sorted(events, key=lambda e: (e["occurred_at"], e["event_id"])):
        if e["type"].startswith("customer."):
            timelines[e["customer_id"]].append((local_day(e["occurred_at"], zone), e["type"]))

    def active_after(timeline, day):
        kinds = [kind for d, kind in timeline if d <= day]
        return bool(kinds) and kinds[-1] != "customer.cancelled"

    def began(timeline):
        """Days the customer went from inactive to active (on the event, not at the day's end)."""
        active, days = False, []
        for d, kind in timeline:
            if kind == "customer.cancelled":
                active = False
            elif not active:
                active = True
                days.append(d)
        return days

    at_start = churned = active_now = started = 0
    for timeline in timelines.values():
        was_active = active_after(timeline, first - 1)
        at_start += was_active
        churned += was_active and any(first <= d <= last and k == "customer.cancelled" for d, k in timeline)
        active_now += active_after(timeline, last)
        started += sum(1 for d in began(timeline) if first <= d <= last)
    return at_start, churned, active_now, started


def assert_dwell(histograms, expected, stats_of, where):
    stages = {scope.removeprefix("dwell:") for scope in histograms if scope.startswith("dwell:")}
    for stage in stages | set(expected):
        stats = stats_of(histograms[f"dwell:{stage}"])
        count, total_ms, buckets = expected[stage]
        assert (stats.count, stats.sum_seconds) == (count, total_ms / 1000), (stage, where)
        assert stats.buckets == tuple(buckets[i] for i in range(len(DWELL_BUCKETS_SECONDS) + 1)), (stage, where)


@settings(max_examples=500, deadline=None)
@given(deliveries(), st.sampled_from(ZONES), st.data())
def test_streaming_fold_matches_batch(order, zone, data):
    crash_at = data.draw(st.integers(0, len(order)), label="crash after reading")
    resume_at = data.draw(st.integers(0, crash_at), label="re-read from offset")
    histograms, sums, customer_base, duplicates = stream(order, crash_at, resume_at, zone)
    unique = {e["event_id"]: e for e in order}.values()
    now = max(e["occurred_at"] for e in unique)
    today = local_day(now, zone)

    assert duplicates == len(order) - len(unique) + crash_at - resume_at
    for days in WINDOWS:
        inside = rolling(now, days, zone)
        assert_dwell(histograms, batch_dwell(unique, inside), lambda state: dwell_stats(state, now, days, zone), days)
        for scope, rep in [(OVERALL, None)] + [(f"rep:{rep}", rep) for rep in REPS]:
            window = window_sums(sums[scope], today, days)
            won_lost = window.get("won", 0), window.get("lost", 0)
            assert won_lost == batch_win_rate(unique, inside, rep), (scope, days)

        result = churn(customer_base, now, days, zone)
        expected = batch_churn(unique, today - days + 1, today, zone)
        assert (result.active_at_start, result.churned, result.active_now) == expected[:3], days

    # Calendar periods: every week, month and quarter an event falls in, though the days are pruned by now.
    assert_periods(histograms, sums, customer_base, unique, zone)


@settings(max_examples=200, deadline=None)
@given(deliveries(), st.sampled_from(ZONES))
def test_the_report_fold_matches_batch(order, zone):
    """`crm-pulse report`'s fold of the same deliveries, duplicates and disorder included."""
    fold = Fold(POLICY, zone)
    applied = [fold.apply(e["lead_id"] if e["type"] in LEAD_TYPES else e["customer_id"], e) for e in order]
    unique = {e["event_id"]: e for e in order}.values()
    assert applied.count(True) == len(unique)
    assert_periods(fold.histograms, fold.kpi_sums, fold.customer_base[OVERALL], unique, zone)


def assert_periods(histograms, sums, customer_base, unique, zone):
    for kind, period_of in calendar_periods(zone).items():
        for label, first, last in {period_of(e["occurred_at"]) for e in unique}:
            def inside(ms):
                return period_of(ms)[0] == label

            assert_dwell(histograms, batch_dwell(unique, inside), lambda state: period_dwell_stats(state, kind, label), label)
            for scope, rep in [(OVERALL, None)] + [(f"rep:{rep}", rep) for rep in REPS]:
                period = period_sums(sums[scope], kind, label)
                assert (period.get("won", 0), period.get("lost", 0)) == batch_win_rate(unique, inside, rep), (scope, label)
            assert period_sums(sums[OVERALL], kind, label).get("leads", 0) == batch_new_leads(unique, inside), label
            result = churn_between(customer_base, first, last)
            found = result.active_at_start, result.churned, result.active_now, customers_started(customer_base, first, last)
            assert found == batch_churn(unique, first, last, zone), label
