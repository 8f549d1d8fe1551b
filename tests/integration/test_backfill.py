"""A backfill from three exports (leads, deals, activities: each unsorted, each with its own mapping) imported as a
user would, with --wait, into a worker on the real embedded broker: once the import returns, the worker's all-time
KPIs equal a batch computation here, and no event was late. Then an import of older history is refused for its
late events, and with --allow-late published and counted as the worker then dead-letters them. Last, the monthly
table equals the batch truth month by month, on the worker's /kpis?period=month and in `crm-pulse report` from
the files and from the input topic."""

from __future__ import annotations

import random
import re
import subprocess
import sys
from collections import defaultdict
from datetime import date, timedelta
from pathlib import Path

import orjson
import pytest

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
LEADS_MAPPING = """
[dates]
formats = ["%Y-%m-%d"]

[envelope]
lead_id = "id"
rep_id = "owner"

[[events]]
type = "lead.created"
occurred_at = "created"
event_id = "{id}:created"
payload = { source = "source", stage = { const = "new" } }
"""
DEALS_MAPPING = """
[dates]
formats = ["%d/%m/%Y"]

[envelope]
lead_id = "lead"

[[events]]
when = { status = "won" }
type = "deal.won"
occurred_at = "closed"
event_id = "{lead}:won"
payload = { amount = { column = "amount", type = "float" } }

[[events]]
when = { status = "lost" }
type = "deal.lost"
occurred_at = "closed"
event_id = "{lead}:lost"
payload = { reason = { const = "lost" } }
"""
ACTIVITIES_MAPPING = """
[dates]
formats = ["%Y-%m-%dT%H:%M:%S%z"]

[[events]]
type = "lead.activity"
occurred_at = "at"
event_id = "{activity}"
envelope = { lead_id = "lead" }
payload = { kind = { const = "call" }, direction = "direction" }
"""


def m(name, **labels):
    return (name, tuple(sorted(labels.items())))


def write_exports(tmp_path: Path, leads: int = 60) -> tuple[list[str], dict, dict]:
    """The three exports and their mappings (shuffled rows, as CRMs export them); (import arguments, expected KPIs,
    {month: {metric: expected value}})."""
    rnd = random.Random(18)
    start = date(2024, 1, 1)
    created = {f"L{i:03d}": start + timedelta(days=i) for i in range(leads)}
    lead_rows = [f"{lead},{day:%Y-%m-%d},{'web' if i % 2 else 'fair'},rep-{i % 3}"
                 for i, (lead, day) in enumerate(created.items())]  # fmt: skip
    deals, won, lost, cycles = [], [], 0, []
    months = defaultdict(lambda: defaultdict(float))
    for lead, day in created.items():
        months[f"{day:%Y-%m}"]["leads"] += 1
    for i, (lead, day) in enumerate(created.items()):
        if i % 3 == 0:
            # L000's win is dated two days before its creation: closed all the same, with a cycle of 0 (kpis.md).
            closed = day + timedelta(days=-2 if i == 0 else i % 5 + 1)
            deals.append(f"{lead},won,{closed:%d/%m/%Y},{100 + i}")
            won.append(100 + i)
            cycles.append(max(0, (closed - day).days) * 86400)
            # The win counts on its own date (December 2023 for L000); its cycle when it ends, at creation at the earliest.
            months[f"{closed:%Y-%m}"]["won"] += 1
            months[f"{closed:%Y-%m}"]["revenue"] += 100 + i
            months[f"{max(closed, day):%Y-%m}"]["cycles"] += 1
        elif i % 3 == 1:
            deals.append(f"{lead},lost,{day + timedelta(days=2):%d/%m/%Y},0")
            months[f"{day + timedelta(days=2):%Y-%m}"]["lost"] += 1
            lost += 1
    activities = [f"A{i},{lead},{day + timedelta(hours=30):%Y-%m-%dT%H:%M:%S}+00:00,{'inbound' if i % 4 else 'outbound'}"
                  for i, (lead, day) in enumerate(created.items()) if i % 2 == 0]  # fmt: skip
    args = []
    for name, header, rows, mapping in (
        ("leads", "id,created,source,owner", lead_rows, LEADS_MAPPING),
        ("deals", "lead,status,closed,amount", deals, DEALS_MAPPING),
        ("activities", "activity,lead,at,direction", activities, ACTIVITIES_MAPPING),
    ):
        rnd.shuffle(rows)
        (tmp_path / f"{name}.csv").write_text("\n".join([header, *rows]) + "\n")
        (tmp_path / f"{name}.toml").write_text(mapping)
        args += [str(tmp_path / f"{name}.csv"), "--mapping", str(tmp_path / f"{name}.toml")]
    expected = {
        m("crm_new_leads", window="all"): leads,
        m("crm_deals_won", window="all"): len(won),
        m("crm_deals_lost", window="all"): lost,
        m("crm_win_rate_ratio", window="all"): len(won) / (len(won) + lost),
        m("crm_won_revenue", window="all"): sum(won),
        m("crm_sales_cycle_mean_seconds", window="all"): sum(cycles) / len(cycles),
        m("crm_activities", window="all"): len(activities),
        m("crm_events_processed_total", type="lead.created"): leads,
        m("crm_events_processed_total", type="deal.won"): len(won),
        m("crm_events_processed_total", type="deal.lost"): lost,
        m("crm_events_processed_total", type="lead.activity"): len(activities),
    }
    monthly = {
        month: {"crm_new_leads": n["leads"], "crm_deals_won": n["won"], "crm_deals_lost": n["lost"],
                "crm_won_revenue": n["revenue"],
                "crm_win_rate_ratio": n["won"] / (n["won"] + n["lost"]) if n["won"] + n["lost"] else None,
                "crm_sales_cycle_observations": n["cycles"] or None}
        for month, n in sorted(months.items())
    }  # fmt: skip
    return args, expected, monthly


def overall_by_period(periods: list[dict]) -> dict[str, dict[str, float]]:
    """{period: {metric: value}} of the overall series (labelled by the period alone) of a /kpis?period= answer."""
    return {p["period"]: {metric: s["value"] for metric, samples in p["kpis"].items() for s in samples
                          if s["labels"] == {"window": p["period"]}}
            for p in periods}  # fmt: skip


def served_months_equal(worker, months: dict[str, dict]) -> dict:
    """The worker's /kpis?period=month from the first of `months`, once its overall series equal them."""
    status, body = worker.get_json(f"/kpis?period=month&from={next(iter(months))}")
    assert status == 200
    served = overall_by_period(body["periods"])
    assert list(served) == list(months)
    for month, values in months.items():
        assert {name: served[month].get(name) for name in values} == pytest.approx(values), month
    return body


def samples(periods: list[dict]) -> dict[tuple, float]:
    """{(period, metric, labels): value} of every series of a /kpis?period= answer, whatever their order."""
    return {(p["period"], p["first_day"], p["last_day"], metric, tuple(sorted(s["labels"].items()))): s["value"]
            for p in periods for metric, found in p["kpis"].items() for s in found}  # fmt: skip


def crm_pulse_report(worker, tmp_path: Path, *args: str) -> dict:
    done = subprocess.run([sys.executable, "-m", "crm_pulse.cli", "report", *args, "--format", "json"], env=worker.env,
                          cwd=tmp_path, capture_output=True, text=True, timeout=300)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    return orjson.loads(done.stdout)


def crm_pulse_import(worker, tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "crm_pulse.cli", "import", *args], env=worker.env, cwd=tmp_path,
                          capture_output=True, text=True, timeout=300)  # fmt: skip


def test_three_exports_imported_with_wait_give_the_batch_kpis_and_older_history_is_refused_as_late(
    start_worker, tmp_path
):
    worker = start_worker(CRM_PULSE_PARTITIONS="2")
    args, expected, monthly = write_exports(tmp_path)

    imported = crm_pulse_import(worker, tmp_path, *args, "--wait", "--wait-timeout", "120")
    assert imported.returncode == 0, imported.stderr[-3000:]
    assert re.search(r"events published\W+130\b", imported.stdout), imported.stdout  # 60 leads, 40 deals, 30 calls
    assert re.search(r"deals won \(crm_deals_won\)\W+20\b", imported.stdout)
    assert re.search(r"win rate \(crm_win_rate_ratio\)\W+50\.0%", imported.stdout)
    # No polling: --wait returned once the worker had applied everything.
    got = worker.metrics()
    assert {key: got.get(key) for key in expected} == pytest.approx(expected)
    assert got.get(m("crm_events_invalid_total", reason="late"), 0) == 0

    # History from 2020: every partition's latest event is in 2024, far more than the grace period later.
    (tmp_path / "old.csv").write_text("id,created,source,owner\n" + "".join(
        f"OLD{i},2020-03-0{i + 1},web,rep-0\n" for i in range(5)))  # fmt: skip
    refused = crm_pulse_import(worker, tmp_path, str(tmp_path / "old.csv"), "--mapping", str(tmp_path / "leads.toml"))
    assert refused.returncode == 2
    assert refused.stderr.splitlines()[-1].startswith(
        "crm-pulse import: 5 of 5 events are older than the latest event of their input partition less the grace "
        "period, so the worker would dead-letter them as late (partitions "
    ), refused.stderr[-2000:]
    assert worker.metrics().get(m("crm_events_received_total")) == 130  # nothing was published

    allowed = crm_pulse_import(worker, tmp_path, str(tmp_path / "old.csv"), "--mapping", str(tmp_path / "leads.toml"),
                               "--allow-late", "--wait", "--wait-timeout", "120")  # fmt: skip
    assert allowed.returncode == 0, allowed.stderr[-3000:]
    assert "of them late: the worker dead-letters them" in allowed.stdout
    got = worker.metrics()
    assert got.get(m("crm_events_invalid_total", reason="late")) == 5
    assert got.get(m("crm_new_leads", window="all")) == 60

    # The monthly table: December 2023 (L000's win) to March 2024 (the last closes), as the batch says.
    assert list(monthly) == ["2023-12", "2024-01", "2024-02", "2024-03"]
    body = served_months_equal(worker, monthly)
    # `crm-pulse report` gives the worker's numbers, every series of every month: from the files (without the
    # late history) and from the input topic (leaving out the late events as the worker did).
    for source in (args, ["--topic"]):
        reported = crm_pulse_report(worker, tmp_path, *source, "--period", "month")
        expected_samples, found = samples(body["periods"]), samples(reported["periods"])
        assert len(expected_samples) > 100  # overall, by rep, by source; KPIs, histograms
        assert found == expected_samples, source
