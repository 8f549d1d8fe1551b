"""Calendar periods (ISO week, month, quarter) over the daily buckets' day numbers.

A day number counts calendar days of the business time zone since 1970-01-01 (`kpis.day_of`), so a period
is a plain range of day numbers and the day a bucket belongs to decides its period in any zone. Labels:
"2018-W05" (ISO week, Monday first), "2018-01", "2018-Q1".
"""

from __future__ import annotations

import re
from datetime import date, timedelta

EPOCH = date(1970, 1, 1)
PERIODS = ("week", "month", "quarter")
# The oldest day a current or previous period reaches back to: the previous quarter opens at most 183 days
# before today (1 July, read on 31 December).
LONGEST_LOOKBACK_DAYS = 184
# Kept as cells of their own, beside the daily buckets: a quarter is the sum of its three months.
STORED_PERIODS = ("week", "month")
LABEL_PATTERNS = {
    "week": (re.compile(r"(\d{4})-W(\d{2})"), "YYYY-Www, e.g. 2018-W05"),
    "month": (re.compile(r"(\d{4})-(\d{2})"), "YYYY-MM, e.g. 2018-01"),
    "quarter": (re.compile(r"(\d{4})-Q(\d)"), "YYYY-Qn, e.g. 2018-Q1"),
}


def date_of_day(day: int) -> date:
    return EPOCH + timedelta(days=day)


def day_number(when: date) -> int:
    return (when - EPOCH).days


def period_of(kind: str, day: int) -> str:
    """The label of the `kind` period holding day number `day`."""
    when = date_of_day(day)
    if kind == "week":
        year, week, _ = when.isocalendar()
        return f"{year}-W{week:02d}"
    if kind == "month":
        return f"{when.year}-{when.month:02d}"
    return f"{when.year}-Q{(when.month - 1) // 3 + 1}"


def _first_date(kind: str, label: str) -> date:
    year, number = (int(part) for part in LABEL_PATTERNS[kind][0].fullmatch(label).groups())
    if kind == "week":
        return date.fromisocalendar(year, number, 1)
    return date(year, number if kind == "month" else 3 * number - 2, 1)


def period_days(kind: str, label: str) -> tuple[int, int]:
    """(first, last) day numbers of a period, both included."""
    first = _first_date(kind, label)
    after = first + timedelta(days=7) if kind == "week" else _add_months(first, 1 if kind == "month" else 3)
    return day_number(first), day_number(after) - 1


def _add_months(first: date, months: int) -> date:
    index = first.year * 12 + first.month - 1 + months
    return date(index // 12, index % 12 + 1, 1)


def previous_period(kind: str, label: str) -> str:
    return period_of(kind, period_days(kind, label)[0] - 1)


def current_periods(today: int) -> list[tuple[str, str, str]]:
    """[(window label, kind, period label)] of the current and previous week, month and quarter."""
    found = []
    for kind in PERIODS:
        current = period_of(kind, today)
        found += [(f"{kind}_current", kind, current), (f"{kind}_previous", kind, previous_period(kind, current))]
    return found


def periods_since(kind: str, first_label: str, today: int) -> list[str]:
    """Every `kind` period from the one labelled `first_label` to the one holding `today`, oldest first."""
    labels, day = [], period_days(kind, first_label)[0]
    while day <= today:
        labels.append(period_of(kind, day))
        day = period_days(kind, labels[-1])[1] + 1
    return labels


def parse_period(kind: str, label: str) -> str:
    """`label` checked as a `kind` period; ValueError says what is wrong and what is expected."""
    if kind not in PERIODS:
        raise ValueError(f"period {kind!r} is not one of {', '.join(PERIODS)}")
    pattern, shape = LABEL_PATTERNS[kind]
    try:
        if pattern.fullmatch(label):
            _first_date(kind, label)
            return label
    except ValueError:
        pass
    raise ValueError(f"{label!r} is not a {kind}: expected {shape}")


def stored_keys(day: int) -> list[tuple[str, str]]:
    """[(kind, label)] of the period cells a day's values are added to."""
    return [(kind, period_of(kind, day)) for kind in STORED_PERIODS]


def stored_cells(kind: str, label: str) -> list[tuple[str, str]]:
    """The stored cells whose sum is the period: itself, or a quarter's three months."""
    if kind != "quarter":
        return [(kind, label)]
    first = _first_date(kind, label)
    return [("month", f"{first.year}-{first.month + i:02d}") for i in range(3)]
