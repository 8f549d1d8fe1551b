"""`crm-pulse import` of the whole Maven export into a worker on the real embedded broker: the all-time KPIs on
/metrics and the monthly table on /kpis?period=month equal what the CSV says, computed here with the csv module;
`crm-pulse report` of the CSV gives every series the worker serves."""

from __future__ import annotations

import csv
import hashlib
import subprocess
import sys
import time
from collections import defaultdict
from datetime import datetime
from pathlib import Path

import orjson
import pytest

from tests.integration.test_backfill import samples, served_months_equal

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
MAPPING = ROOT / "mappings" / "maven-crm.toml"
MAVEN_CSV = ROOT.parent / "shared" / "datasets" / "maven-crm" / "sales_pipeline.csv"


def m(name, **labels):
    return (name, tuple(sorted(labels.items())))


def expected_kpis() -> tuple[int, dict]:
    """(events the import publishes, {metric: value}) straight from the CSV."""
    with open(MAVEN_CSV, newline="") as f:
        rows = list(csv.DictReader(f))
    won = [r for r in rows if r["deal_stage"] == "Won"]
    lost = [r for r in rows if r["deal_stage"] == "Lost"]
    engaging = [r for r in rows if r["deal_stage"] == "Engaging"]
    by_rep = defaultdict(lambda: {"Won": 0, "Lost": 0})
    for r in won + lost:
        by_rep["rep-" + hashlib.sha256(r["sales_agent"].encode()).hexdigest()[:10]][r["deal_stage"]] += 1

    def day(value: str) -> datetime:
        return datetime.strptime(value, "%d-%m-%y")

    cycle_seconds = [(day(r["close_date"]) - day(r["engage_date"])).total_seconds() for r in won]
    assert min(cycle_seconds) >= 0  # no deal closes before its engagement: a cycle counts in its close month
    expected = {
        m("crm_win_rate_ratio", window="all"): len(won) / (len(won) + len(lost)),
        m("crm_won_revenue", window="all"): sum(float(r["close_value"]) for r in won),
        m("crm_sales_cycle_mean_seconds", window="all"): sum(cycle_seconds) / len(cycle_seconds),
        m("crm_leads_open", stage="engaging"): len(engaging),
        m("crm_events_invalid_total", reason="late"): 0,
        **{m("crm_rep_win_rate_ratio", window="all", rep=rep): n["Won"] / (n["Won"] + n["Lost"])
           for rep, n in by_rep.items()},  # fmt: skip
    }
    return len(won) + len(lost) + len(engaging) + len(won) + len(lost), expected


def expected_months() -> dict[str, dict]:
    """{month: {metric: value}}: leads by engage date, deals and their cycles by close date."""
    with open(MAVEN_CSV, newline="") as f:
        rows = [r for r in csv.DictReader(f) if r["deal_stage"] in ("Won", "Lost", "Engaging")]
    months = defaultdict(lambda: defaultdict(float))
    for r in rows:
        engaged = datetime.strptime(r["engage_date"], "%d-%m-%y")
        months[f"{engaged:%Y-%m}"]["leads"] += 1
        if r["deal_stage"] != "Engaging":
            closed = datetime.strptime(r["close_date"], "%d-%m-%y")
            month = months[f"{closed:%Y-%m}"]
            month[r["deal_stage"]] += 1
            if r["deal_stage"] == "Won":
                month["revenue"] += float(r["close_value"])
                month["cycle_seconds"] += (closed - engaged).total_seconds()
    return {
        month: {"crm_new_leads": n["leads"], "crm_deals_won": n["Won"], "crm_deals_lost": n["Lost"],
                "crm_won_revenue": n["revenue"],
                "crm_win_rate_ratio": n["Won"] / (n["Won"] + n["Lost"]) if n["Won"] + n["Lost"] else None,
                "crm_sales_cycle_mean_seconds": n["cycle_seconds"] / n["Won"] if n["Won"] else None}
        for month, n in sorted(months.items())
    }  # fmt: skip


@pytest.mark.skipif(not MAVEN_CSV.exists(), reason=f"the Maven export is not at {MAVEN_CSV}")
def test_maven_import_gives_the_csvs_all_time_kpis(start_worker, tmp_path):
    events, expected = expected_kpis()
    assert len([k for k in expected if k[0] == "crm_rep_win_rate_ratio"]) == 30  # one series per sales agent
    worker = start_worker(CRM_PULSE_PARTITIONS="4", CRM_PULSE_CLOCK="event")

    imported = subprocess.run(
        [sys.executable, "-m", "crm_pulse.cli", "import", str(MAVEN_CSV), "--mapping", str(MAPPING),
         "--rejects", str(tmp_path / "rejects.csv")],
        env=worker.env, cwd=ROOT, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert imported.returncode == 0, imported.stderr[-3000:]

    # Aggregates trail the per-lead agent by an internal topic and leads_open by a stall scan: poll until settled.
    deadline = time.monotonic() + 300
    while True:
        got = worker.metrics()
        processed = sum(v for (name, _), v in got.items() if name == "crm_events_processed_total")
        current = {key: got.get(key) for key in expected}
        if (processed == events and current == pytest.approx(expected)) or time.monotonic() > deadline:
            break
        time.sleep(1)
    assert processed == events
    assert current == pytest.approx(expected)

    # The monthly table, from the first engagement (October 2016) to the last close.
    months = expected_months()
    assert (list(months)[0], list(months)[-1], len(months)) == ("2016-10", "2017-12", 15)
    body = served_months_equal(worker, months)

    reported = subprocess.run(
        [sys.executable, "-m", "crm_pulse.cli", "report", str(MAVEN_CSV), "--mapping", str(MAPPING),
         "--period", "month", "--format", "json"],
        env=worker.env, cwd=tmp_path, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert reported.returncode == 0, reported.stderr[-3000:]
    expected_samples = samples(body["periods"])
    assert len(expected_samples) > 1000  # 15 months: overall and 30 reps
    assert samples(orjson.loads(reported.stdout)["periods"]) == pytest.approx(expected_samples)
