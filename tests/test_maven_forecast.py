"""The Maven export replayed through the importer and the streaming fold, against a batch computation of P(win |
stage) and of each month's forecast written here straight from the CSV (csv + datetime, no crm-pulse code)."""

from __future__ import annotations

import csv
import io
from collections import Counter
from datetime import datetime, timezone
from pathlib import Path

import pytest

from crm_pulse.importer import FileReport, Reject, convert, load_mapping
from crm_pulse.schemas.validate import parse_event
from crm_pulse.streams.deals import DealPolicy
from crm_pulse.streams.fold import Fold
from crm_pulse.streams.forecast import month_forecast, stage_counts, win_probabilities
from crm_pulse.streams.leads import StallPolicy

ROOT = Path(__file__).resolve().parents[1]
MAVEN_MAPPING = ROOT / "mappings" / "maven-crm.toml"
MAVEN_CSV = ROOT.parent / "shared" / "datasets" / "maven-crm" / "sales_pipeline.csv"
# The export has one open stage: every deal is created in "engaging" (CRM_PULSE_DEAL_STAGE_ORDER='{"default": ["engaging"]}').
POLICY = DealPolicy(stage_order={"default": ("engaging",)})
WINDOW_DAYS = 180
DAY_S = 86400

pytestmark = pytest.mark.skipif(not MAVEN_CSV.exists(), reason=f"the Maven export is not at {MAVEN_CSV}")


def utc(text: str) -> datetime:
    return datetime.strptime(text, "%d-%m-%y").replace(tzinfo=timezone.utc)


@pytest.fixture(scope="module")
def replayed() -> tuple[Fold, list[dict]]:
    """The fold of every event the importer makes of the export, in the import's order (time, then id)."""
    text = MAVEN_CSV.read_text()
    items = list(convert(io.StringIO(text), load_mapping(MAVEN_MAPPING), FileReport(MAVEN_CSV, Path("rejects.csv"))))
    fold = Fold(StallPolicy(), deal_policy=POLICY)
    for event in sorted(item for item in items if not isinstance(item, Reject)):
        fold.apply(event.key, parse_event(event.value.encode()).model_dump(by_alias=True))
    with open(MAVEN_CSV, newline="") as f:
        rows = [row for row in csv.DictReader(f) if row["deal_stage"] in ("Won", "Lost")]
    return fold, rows


def closed_at(row: dict) -> datetime:
    # A close dated before the deal was engaged counts at the engagement (docs/kpis.md: a lead's history starts
    # with its creation).
    return max(utc(row["engage_date"]), utc(row["close_date"]))


def batch_p_win(rows: list[dict], last_day: datetime) -> tuple[int, int]:
    """(won, closed) among deals closed in the WINDOW_DAYS days up to and including `last_day`."""
    closed = [row for row in rows if 0 <= (last_day - closed_at(row)).days < WINDOW_DAYS]
    return sum(row["deal_stage"] == "Won" for row in closed), len(closed)


def months() -> list[tuple[int, int]]:
    """The export's deals close from March to December 2017."""
    return [(2017, m) for m in range(3, 13)]


def test_p_win_of_engaging_equals_the_batch_count_every_month(replayed):
    fold, rows = replayed
    everything = stage_counts(fold.outcomes["default"], 10**6, 10**6)
    stages = Counter(row["deal_stage"] for row in rows)
    assert everything == {"engaging": [stages["Won"] + stages["Lost"], stages["Won"], stages["Won"]]}
    for year, month in months():
        last_day = datetime(year, month, 1, tzinfo=timezone.utc).timestamp() // DAY_S - 1
        won, closed = batch_p_win(rows, datetime.fromtimestamp(last_day * DAY_S, timezone.utc))
        streamed = win_probabilities(stage_counts(fold.outcomes["default"], int(last_day), WINDOW_DAYS))
        assert streamed == ({"engaging": won / closed} if closed else {}), (year, month)


def test_each_months_forecast_equals_the_batch_forecast(replayed):
    fold, rows = replayed
    leads = [lead for (family, _), lead in fold.entities.items() if family == "lead"]

    def probabilities_at(start_ms):
        last_day = start_ms // 1000 // DAY_S - 1
        p = win_probabilities(stage_counts(fold.outcomes["default"], last_day, WINDOW_DAYS))
        return lambda pipeline, stage: p.get(stage)

    forecasts = 0
    for year, month in months():
        start = datetime(year, month, 1, tzinfo=timezone.utc)
        won, closed = batch_p_win(rows, datetime.fromtimestamp(start.timestamp() - DAY_S, timezone.utc))
        # Open at the month's first instant: engaged before it and closed at or after it; expected (the export's
        # close date) in the month; worth the close value, 0 for a lost deal.
        due = [row for row in rows if utc(row["engage_date"]) < start <= closed_at(row)
               and (utc(row["close_date"]).year, utc(row["close_date"]).month) == (year, month)]  # fmt: skip
        expected_forecast = sum(float(row["close_value"]) for row in due) * won / closed if closed else 0.0
        expected_won = sum(float(row["close_value"]) for row in rows if row["deal_stage"] == "Won"
                           and (closed_at(row).year, closed_at(row).month) == (year, month))  # fmt: skip
        result = month_forecast(leads, f"{year}-{month:02d}", probabilities_at, POLICY)
        assert result["forecast"] == pytest.approx(expected_forecast), (year, month)
        assert result["won"] == pytest.approx(expected_won), (year, month)
        if expected_won:
            assert result["accuracy_ratio"] == pytest.approx(1 - abs(expected_won - expected_forecast) / expected_won)
        forecasts += expected_forecast > 0
    # Not vacuous: every month from April has a forecast (March has no closed history before it to learn from).
    assert forecasts == 9
