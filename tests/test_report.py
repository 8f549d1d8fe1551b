"""`crm-pulse report` from CSV exports: the KPI values worked out by hand, per month in UTC and in New York,
each format, and a user's mistakes as one line."""

from __future__ import annotations

import csv
import io
from pathlib import Path

import orjson
import pytest

from crm_pulse.cli import main
from tests.integration.test_backfill import DEALS_MAPPING, LEADS_MAPPING, overall_by_period

@pytest.fixture
def exports(tmp_path) -> list[str]:
    """Leads on 30 and 31 January and 1 February (00:00 UTC: 31 January, 19:00 in New York); L1 won on 2 February
    after 3 days, L2 lost on the 3rd, L3 won on the 5th after 4 days."""
    files = {
        "leads.csv": "id,created,source,owner\nL1,2024-01-30,web,rep-a\nL2,2024-01-31,web,rep-a\nL3,2024-02-01,fair,rep-b\n",
        "deals.csv": "lead,status,closed,amount\nL1,won,02/02/2024,300\nL2,lost,03/02/2024,\nL3,won,05/02/2024,200\n",
        "leads.toml": LEADS_MAPPING, "deals.toml": DEALS_MAPPING,
    }  # fmt: skip
    for name, text in files.items():
        (tmp_path / name).write_text(text)
    return [str(tmp_path / "leads.csv"), "--mapping", str(tmp_path / "leads.toml"),
            str(tmp_path / "deals.csv"), "--mapping", str(tmp_path / "deals.toml")]  # fmt: skip


def report(*args: str, capsys) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as exited:
        main(["report", *args])
    out, err = capsys.readouterr()
    return exited.value.code, out, err


def test_a_monthly_report_in_utc(exports, capsys):
    code, out, _ = report(*exports, "--period", "month", "--format", "json", capsys=capsys)
    body = orjson.loads(out)
    assert (code, body["time_zone"], body["now"], body["period"]) == (0, "UTC", "2024-02-05T00:00:00.000Z", "month")
    months = overall_by_period(body["periods"])
    assert months["2024-01"] == {"crm_deals_won": 0, "crm_deals_lost": 0, "crm_new_leads": 2, "crm_new_deals": 0,
                                 "crm_won_revenue": 0, "crm_conversion_ratio": 0.0}  # fmt: skip
    assert months["2024-02"] == pytest.approx({
        "crm_deals_won": 2, "crm_deals_lost": 1, "crm_win_rate_ratio": 2 / 3, "crm_won_revenue": 500,
        "crm_average_deal_size": 250, "crm_new_leads": 1, "crm_new_deals": 2, "crm_conversion_ratio": 2.0,
        "crm_lead_velocity_ratio": -0.5,  # (1 − 2) / 2
        "crm_sales_cycle_observations": 2, "crm_sales_cycle_mean_seconds": 3.5 * 86400,  # 3 and 4 days
        # 3 d falls in the (2 d, 3 d] bucket, 4 d in (3 d, 5 d]: p50 (rank 1 of 2) at the top of the first,
        # p90 (rank 1.8) 0.8 of the way through the second: 3 d + 0.8 × 2 d.
        "crm_sales_cycle_p50_seconds": 3 * 86400, "crm_sales_cycle_p90_seconds": 4.6 * 86400,
    })  # fmt: skip
    by_rep = {s["labels"]["rep"]: s["value"] for s in body["periods"][0]["kpis"]["crm_rep_new_leads"]}
    assert by_rep == {"rep-a": 2, "rep-b": 0}  # L3 (rep-b) is February's


def test_the_business_time_zone_moves_a_midnight_lead_into_the_month_before(exports, capsys, monkeypatch):
    monkeypatch.setenv("CRM_PULSE_BUSINESS_TIMEZONE", "America/New_York")
    code, out, _ = report(*exports, "--period", "month", "--format", "json", capsys=capsys)
    months = overall_by_period(orjson.loads(out)["periods"])
    assert (code, months["2024-01"]["crm_new_leads"], months["2024-02"]["crm_new_leads"]) == (0, 3, 0)
    assert months["2024-02"]["crm_lead_velocity_ratio"] == -1.0
    assert "crm_conversion_ratio" not in months["2024-02"]  # no leads created in February there


def test_csv_and_table_and_the_rolling_windows(exports, capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("COLUMNS", "200")  # the table's width: rich reads the terminal's from there
    code, out, _ = report(*exports, "--period", "quarter", "--from", "2024-Q1", "--format", "csv", capsys=capsys)
    rows = {(r["window"], r["metric"], r["labels"]): float(r["value"]) for r in csv.DictReader(io.StringIO(out))}
    assert code == 0
    assert (rows[("2024-Q1", "crm_won_revenue", "")], rows[("2024-Q1", "crm_rep_new_leads", "rep=rep-b")]) == (500, 1)

    code, out, _ = report(*exports, capsys=capsys)  # rolling windows ending 5 February, as a table
    assert code == 0
    header = next(line for line in out.splitlines() if "metric" in line)
    assert [cell.strip() for cell in header.split("┃")[2:-1]] == [
        "7d", "30d", "all", "week_current", "week_previous", "month_current", "month_previous", "quarter_current",
        "quarter_previous"]  # fmt: skip
    row = next(line for line in out.splitlines() if line.startswith("│ crm_new_leads "))
    # Today is Monday 5 February (ISO week 6): the 7 days from 30 January hold all three leads, last week (29
    # January – 4 February) too; February one, January two; this quarter three, the last none.
    assert [cell.strip() for cell in row.split("│")[2:-1]] == ["3", "3", "3", "0", "3", "1", "2", "3", "0"]

    code, _, _ = report(*exports, "--format", "json", "--out", str(tmp_path / "kpis.json"), capsys=capsys)
    written = orjson.loads((tmp_path / "kpis.json").read_bytes())["kpis"]
    assert {s["labels"]["window"]: s["value"] for s in written["crm_win_rate_ratio"]}["all"] == 2 / 3


@pytest.mark.parametrize("args, message", [
    (["--period", "month", "--from", "2024-13"], "--from 2024-13: '2024-13' is not a month: expected YYYY-MM, e.g. 2018-01"),
    (["--from", "2024-01"], "--from 2024-01 needs --period week, month or quarter"),
    (["--period", "fortnight"], "--period fortnight: not one of week, month, quarter"),
    (["--format", "xlsx"], "--format xlsx: not one of table, csv, json"),
    (["--topic"], "give CSV files with --mapping, or --topic for the input topic's history (not both)"),
])  # fmt: skip
def test_a_mistake_is_one_line_and_exit_2(exports, capsys, args, message):
    code, out, err = report(*exports, *args, capsys=capsys)
    assert (code, out, err.splitlines()) == (2, "", [f"crm-pulse report: {message}"])


def test_a_missing_file_is_one_line_and_exit_2(exports, capsys):
    code, _, err = report(exports[0].replace("leads.csv", "nowhere.csv"), *exports[1:], capsys=capsys)
    assert (code, err.splitlines()) == (2, [f"crm-pulse report: [Errno 2] No such file or directory: "
                                            f"'{Path(exports[0]).with_name('nowhere.csv')}'"])  # fmt: skip


STAGES_MAPPING = """
[dates]
formats = ["%Y-%m-%d"]

[envelope]
lead_id = "lead"

[[events]]
type = "lead.stage_changed"
occurred_at = "at"
event_id = "{lead}:{to}"
payload = { from = "from", to = "to" }
"""
UPDATES_MAPPING = """
[dates]
formats = ["%Y-%m-%d"]

[envelope]
lead_id = "lead"

[[events]]
type = "deal.updated"
occurred_at = "at"
event_id = "{lead}:updated"
payload = { amount = { column = "amount", type = "float" }, close_date = { column = "close", type = "date" } }
"""


@pytest.fixture
def pipeline_exports(tmp_path) -> list[str]:
    """Closed in January: A new → qualified → proposal → won; B new → qualified → lost; C new → lost. Open on
    30 January (the latest event): D in qualified (4,000 due 15 February), E in new (900 due 10 March), F in
    proposal (500 due 20 February), G in negotiation (700 due 1 February), all of the default pipeline's order
    new, qualified, proposal, negotiation."""
    files = {
        "leads.csv": "id,created,source,owner\nA,2024-01-02,web,rep-a\nB,2024-01-03,web,rep-a\nC,2024-01-04,web,rep-b\n"
                     "D,2024-01-20,web,rep-a\nE,2024-01-21,web,rep-b\nF,2024-01-22,web,rep-a\nG,2024-01-23,web,rep-b\n",
        "stages.csv": "lead,at,from,to\nA,2024-01-05,new,qualified\nA,2024-01-10,qualified,proposal\n"
                      "B,2024-01-06,new,qualified\nD,2024-01-25,new,qualified\nF,2024-01-23,new,qualified\n"
                      "F,2024-01-28,qualified,proposal\nG,2024-01-30,new,negotiation\n",
        "deals.csv": "lead,status,closed,amount\nA,won,20/01/2024,1000\nB,lost,15/01/2024,\nC,lost,08/01/2024,\n",
        "updates.csv": "lead,at,amount,close\nD,2024-01-26,4000,2024-02-15\nE,2024-01-22,900,2024-03-10\n"
                       "F,2024-01-29,500,2024-02-20\nG,2024-01-29,700,2024-02-01\n",
        "leads.toml": LEADS_MAPPING, "stages.toml": STAGES_MAPPING, "deals.toml": DEALS_MAPPING,
        "updates.toml": UPDATES_MAPPING,
    }  # fmt: skip
    for name, text in files.items():
        (tmp_path / name).write_text(text)
    return [arg for name in ("leads", "stages", "deals", "updates")
            for arg in (str(tmp_path / f"{name}.csv"), "--mapping", str(tmp_path / f"{name}.toml"))]  # fmt: skip


def test_deal_figures_from_exports(pipeline_exports, capsys, monkeypatch):
    code, out, _ = report(*pipeline_exports, "--period", "month", "--format", "json", capsys=capsys)
    deals = orjson.loads(out)["deals"]
    # new: reached by A, B, C; A won; A and B went on. qualified: A, B; A won and went on. proposal: A, won.
    assert (code, deals["history_days"], deals["stages"]) == (0, 180, {"default": {
        "win_probability": {"new": pytest.approx(1 / 3), "qualified": 0.5, "proposal": 1.0},
        "conversion": {"new": pytest.approx(2 / 3), "qualified": 0.5, "proposal": 1.0},
        "closed_reached": {"new": 3, "qualified": 2, "proposal": 1},
    }})  # fmt: skip
    # D 4,000 × 1/2 + F 500 × 1 in February (rep-a), E 900 × 1/3 in March (rep-b); G's negotiation has no
    # closed history, so it is left out.
    assert deals["weighted_pipeline"] == [
        {"close_month": "2024-02", "pipeline": "default", "team_id": None, "rep_id": "rep-a", "weighted_value": 2500.0},
        {"close_month": "2024-03", "pipeline": "default", "team_id": None, "rep_id": "rep-b",
         "weighted_value": pytest.approx(300.0)},
    ]  # fmt: skip

    code, out, _ = report(*pipeline_exports, "--format", "csv", capsys=capsys)
    rows = {(r["window"], r["metric"], r["labels"]): float(r["value"]) for r in csv.DictReader(io.StringIO(out))}
    assert rows[("180d", "crm_deal_stage_conversion_ratio", "pipeline=default;stage=qualified")] == 0.5
    assert rows[("open", "crm_pipeline_weighted_value",
                 "close_month=2024-02;pipeline=default;team=none;rep=rep-a")] == 2500  # fmt: skip

    # A window of 11 days, 20 to 30 January, keeps A alone (closed on the 20th): P(win) 1 at every stage it reached.
    monkeypatch.setenv("CRM_PULSE_DEAL_HISTORY_DAYS", "11")
    monkeypatch.setenv("COLUMNS", "200")
    code, out, _ = report(*pipeline_exports, capsys=capsys)
    lines = [" ".join(line.replace("│", " ").split()) for line in out.splitlines()]
    assert code == 0 and "Deals closed in the 11 days to 2024-01-30T00:00:00.000Z" in lines
    assert [line for line in lines if line.startswith(("default ", "2024-"))] == [
        "default new 1 1 1", "default qualified 1 1 1", "default proposal 1 1 1",
        # D 4,000 + F 500 in February; E 900 in March: all at P = 1 now.
        "2024-02 default 4,500", "2024-03 default 900",
    ]
