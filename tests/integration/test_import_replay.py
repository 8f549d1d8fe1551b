"""`crm-pulse import` of the whole Maven export into a worker on the real embedded broker: the all-time KPIs on
/metrics equal what the CSV says, computed here with the csv module."""

from __future__ import annotations

import csv
import hashlib
import subprocess
import sys
import time
from collections import defaultdict
from datetime import datetime
from pathlib import Path

import pytest

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
