"""KPI math: pure functions over plain, JSON-serialisable state (no Faust, no I/O).

Every windowed KPI is kept as per-day (UTC, event time) buckets so that windows of 7 and 30 days are
sums of buckets, late events land in the bucket of their own time, and partial states merge by adding.
Per-entity facts (a lead's stage history, a customer's subscription history) are kept as sorted
timelines; every change to a timeline is turned into *deltas* (+1 / -1 observations) so that an
out-of-order event retracts what an earlier, incomplete view of the timeline contributed.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from datetime import datetime, tzinfo
from typing import Iterable, Iterator

from crm_pulse.streams.periods import EPOCH, stored_cells, stored_keys

DAY_MS = 86_400_000
WINDOWS_DAYS = {"7d": 7, "30d": 30}
CHURN_WINDOW_DAYS = 30

# Upper bounds of the stage-dwell histogram, in seconds; a final +Inf bucket is implied.
HOUR = 3600
DAY = 24 * HOUR
DWELL_BUCKETS_SECONDS = (
    HOUR, 6 * HOUR, 12 * HOUR, DAY, 2 * DAY, 3 * DAY, 5 * DAY, 7 * DAY, 10 * DAY,
    14 * DAY, 21 * DAY, 30 * DAY, 45 * DAY, 60 * DAY, 90 * DAY, 180 * DAY, 365 * DAY,
)  # fmt: skip


def day_of(ms: int, zone: tzinfo | None = None) -> int:
    """The day number (days since 1970-01-01) of the calendar day `ms` falls on in `zone`; None is UTC."""
    if zone is None:
        return ms // DAY_MS
    return (datetime.fromtimestamp(ms // 1000, zone).date() - EPOCH).days


def window_day_range(now_ms: int, days: int, zone: tzinfo | None = None) -> range:
    """The `days` days ending with (and including) the day of `now_ms`."""
    today = day_of(now_ms, zone)
    return range(today - days + 1, today + 1)


# --- stage dwell -------------------------------------------------------------------------------


def bucket_index(dwell_ms: int) -> int:
    seconds = dwell_ms / 1000
    for i, bound in enumerate(DWELL_BUCKETS_SECONDS):
        if seconds <= bound:
            return i
    return len(DWELL_BUCKETS_SECONDS)


def _empty_cell() -> list[int]:
    return [0, 0] + [0] * (len(DWELL_BUCKETS_SECONDS) + 1)


def apply_dwell(state: dict, day: int, dwell_ms: int, sign: int, baseline: tuple[int, int] | None = None) -> None:
    """Add (sign=+1) or retract (sign=-1) one duration observed on `day` (a stage dwell, a sales cycle, a
    ticket's time to resolution): to the day's cell, its week's and month's cells, the all-time cell and,
    inside the baseline period, the baseline cell. A cell is [count, sum_ms, bucket_0, ..., bucket_inf]
    (non-cumulative buckets).
    """
    days = state.setdefault("days", {})
    periods = state.setdefault("periods", {})
    cells = [days.setdefault(str(day), _empty_cell()), state.setdefault("total", _empty_cell())]
    cells += [periods.setdefault(kind, {}).setdefault(label, _empty_cell()) for kind, label in stored_keys(day)]
    if baseline and baseline[0] <= day <= baseline[1]:
        cells.append(state.setdefault("baseline", _empty_cell()))
    for cell in cells:
        cell[0] += sign
        cell[1] += sign * dwell_ms
        cell[2 + bucket_index(dwell_ms)] += sign
    if days[str(day)][0] == 0:
        del days[str(day)]
    for kind, label in stored_keys(day):
        if periods[kind][label][0] == 0:
            del periods[kind][label]


@dataclass(frozen=True)
class DwellStats:
    count: int
    sum_seconds: float
    buckets: tuple[int, ...]  # non-cumulative, one per DWELL_BUCKETS_SECONDS bound plus +Inf

    @property
    def mean_seconds(self) -> float | None:
        return self.sum_seconds / self.count if self.count else None

    def quantile_seconds(self, q: float) -> float | None:
        return histogram_quantile(q, self.buckets)


def dwell_stats(state: dict, now_ms: int, days: int | None, zone: tzinfo | None = None) -> DwellStats:
    """Statistics of the `days` days ending today, or of all time when `days` is None."""
    if days is None:
        return _stats(state.get("total", _empty_cell()))
    cells = state.get("days", {})
    return _sum_cells(cells.get(str(day), ()) for day in window_day_range(now_ms, days, zone))


def period_dwell_stats(state: dict, kind: str, label: str) -> DwellStats:
    """Statistics of one calendar period (`streams.periods`)."""
    periods = state.get("periods", {})
    return _sum_cells(periods.get(stored, {}).get(cell, ()) for stored, cell in stored_cells(kind, label))


def _sum_cells(cells: Iterable) -> DwellStats:
    total = _empty_cell()
    for cell in cells:
        for i, n in enumerate(cell):
            total[i] += n
    return _stats(total)


def _stats(cell: list[int]) -> DwellStats:
    return DwellStats(cell[0], cell[1] / 1000, tuple(cell[2:]))


def histogram_quantile(q: float, buckets: Iterable[int]) -> float | None:
    """Quantile from non-cumulative buckets, interpolated linearly inside a bucket like PromQL's
    histogram_quantile; a rank in the +Inf bucket returns the highest finite bound."""
    buckets = list(buckets)
    total = sum(buckets)
    if total == 0:
        return None
    rank = q * total
    cumulative = 0
    for i, n in enumerate(buckets):
        if n and cumulative + n >= rank:
            if i == len(DWELL_BUCKETS_SECONDS):
                return float(DWELL_BUCKETS_SECONDS[-1])
            lower = DWELL_BUCKETS_SECONDS[i - 1] if i else 0.0
            upper = DWELL_BUCKETS_SECONDS[i]
            return lower + (upper - lower) * (rank - cumulative) / n
        cumulative += n
    return float(DWELL_BUCKETS_SECONDS[-1])


def insert_sorted(timeline: list, entry: list) -> None:
    """Insert [time_ms, event_id, ...] keeping (time, event_id) order, so ties resolve the same in any replay."""
    i = len(timeline)
    while i and timeline[i - 1][:2] > entry[:2]:
        i -= 1
    timeline.insert(i, entry)


def dwell_observations(stage_timeline: list) -> Counter:
    """[(stage, left_at_ms, dwell_ms)] for every stage a lead has left, from [[entered_ms, event_id, stage], ...]."""
    return Counter(
        (entered[2], left[0], left[0] - entered[0]) for entered, left in zip(stage_timeline, stage_timeline[1:])
    )


def counter_deltas(before: Counter, after: Counter) -> Iterator[tuple[tuple, int]]:
    """(item, +1/-1) pairs that turn multiset `before` into `after`."""
    for item, n in (after - before).items():
        for _ in range(n):
            yield item, 1
    for item, n in (before - after).items():
        for _ in range(n):
            yield item, -1


def prune_days(state: dict, oldest_day: int) -> None:
    days = state.get("days", {})
    for key in [k for k in days if int(k) < oldest_day]:
        del days[key]


# --- churn -------------------------------------------------------------------------------------


def subscription_intervals(status_timeline: list, zone: tzinfo | None = None) -> Counter:
    """Active spells (start_day, end_day or None) from sorted [[ms, event_id, kind], ...].

    A customer becomes active on `subscribed` or `renewed` and stops on `cancelled`.
    """
    spells: Counter = Counter()
    started: int | None = None
    for ms, _event_id, kind in status_timeline:
        if kind == "cancelled":
            if started is not None:
                spells[(day_of(started, zone), day_of(ms, zone))] += 1
                started = None
        elif started is None:
            started = ms
    if started is not None:
        spells[(day_of(started, zone), None)] += 1
    return spells


def _spell_key(start_day: int, end_day: int | None) -> str:
    return f"{start_day}|{'' if end_day is None else end_day}"


def apply_spell(state: dict, start_day: int, end_day: int | None, sign: int) -> None:
    """Count (sign=+1) or retract (sign=-1) one active spell in `state["spells"]`, compacted at `state["horizon"]`."""
    horizon = state.get("horizon")
    key = _compact(start_day, end_day, horizon)
    if key is None:
        return
    spells = state.setdefault("spells", {})
    spells[key] = spells.get(key, 0) + sign
    if spells[key] == 0:
        del spells[key]


def _compact(start_day: int, end_day: int | None, horizon: int | None) -> str | None:
    """Spells that ended before the horizon can no longer be active at any window start; older starts
    are indistinguishable for every window starting at or after the horizon."""
    if horizon is None:
        return _spell_key(start_day, end_day)
    if end_day is not None and end_day < horizon:
        return None
    return _spell_key(max(start_day, horizon - 1), end_day)


def advance_churn_horizon(state: dict, horizon: int) -> None:
    if state.get("horizon") is not None and horizon <= state["horizon"]:
        return
    old = state.get("spells", {})
    state["horizon"] = horizon
    state["spells"] = {}
    for key, n in old.items():
        start, end = key.split("|")
        apply_spell(state, int(start), int(end) if end else None, n)


@dataclass(frozen=True)
class Churn:
    active_at_start: int
    churned: int
    active_now: int

    @property
    def churn_ratio(self) -> float | None:
        return self.churned / self.active_at_start if self.active_at_start else None

    @property
    def retention_ratio(self) -> float | None:
        churn = self.churn_ratio
        return None if churn is None else 1 - churn


def _spells(state: dict) -> Iterator[tuple[int, int | None, int]]:
    for key, n in state.get("spells", {}).items():
        start_s, end_s = key.split("|")
        yield int(start_s), (int(end_s) if end_s else None), n


def churn(state: dict, now_ms: int, days: int = CHURN_WINDOW_DAYS, zone: tzinfo | None = None) -> Churn:
    """Churn over the `days` ending today (`churn_between` those days)."""
    window = window_day_range(now_ms, days, zone)
    return churn_between(state, window.start, window.stop - 1)


def churn_between(state: dict, first: int, last: int) -> Churn:
    """Churn from day `first` to day `last`: customers active when the window opened (started before its
    first day, not cancelled before it) who cancelled inside the window, over those active at its start; and
    those active at its end (`active_now`). Exact for windows starting at or after the state's horizon."""
    active_at_start = churned = active_now = 0
    for start, end, n in _spells(state):
        if start < first and (end is None or end >= first):
            active_at_start += n
            if end is not None and end <= last:
                churned += n
        if start <= last and (end is None or end > last):
            active_now += n
    return Churn(active_at_start, churned, active_now)



def customers_started(state: dict, first: int, last: int) -> int:
    """Active spells that began from day `first` to day `last`: customers who subscribed, or came back after a
    cancellation. Exact for windows starting after the state's horizon (older starts sit at horizon − 1)."""
    return sum(n for start, _end, n in _spells(state) if first <= start <= last)
