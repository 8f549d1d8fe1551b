"""The CSV importer: date parsing, pseudonyms, Maven rows → exact events, rejected rows with line numbers, and a
dry run of the whole Maven export checked against counts taken straight from the CSV."""

from __future__ import annotations

import csv
import hashlib
import io
import re
from collections import Counter
from pathlib import Path
from zoneinfo import ZoneInfo

import orjson
import pytest

from crm_pulse.cli import main
from crm_pulse.config import Settings
from crm_pulse.importer import (
    FileReport,
    ImportFailed,
    Reject,
    convert,
    import_files,
    load_mapping,
    parse_date,
    pseudonymise,
)
from crm_pulse.schemas.events import to_epoch_ms
from crm_pulse.schemas.validate import parse_event

ROOT = Path(__file__).resolve().parents[1]
MAVEN_MAPPING = ROOT / "mappings" / "maven-crm.toml"
MAVEN_CSV = ROOT.parent / "shared" / "datasets" / "maven-crm" / "sales_pipeline.csv"
HEADER = ",".join(["opportunity_id", "sales_agent", "product", "account", "deal_stage", "engage_date", "close_date",
                   "close_value", "engage_quarter", "close_quarter"])  # fmt: skip
PROSPECTING_REASON = "prospecting: no engage_date or close_date, so no event time"

# 2016-10-20: 46 years after 1970 with 11 leap days (1972…2012) = 16801 days to 2016-01-01, plus 293 days
# (Jan–Sep of the leap year 2016 = 274, and 19) = 17094 days.
OCT_20_2016_MS = 17094 * 86_400_000
# 2017-03-01: 2016 has 366 days → 17167 days to 2017-01-01, plus 31 + 28 = 17226 days.
MAR_1_2017_MS = 17226 * 86_400_000
MOSES = "rep-" + hashlib.sha256(b"Moses Frase").hexdigest()[:10]


@pytest.fixture(scope="module")
def maven():
    return load_mapping(MAVEN_MAPPING)


def converted(text: str, mapping) -> tuple[list, list[Reject]]:
    """(the events' documents sorted as the import sorts them, the rejected rows) of a CSV text."""
    items = list(convert(io.StringIO(text), mapping, FileReport(Path("export.csv"), Path("export.rejects.csv"))))
    events = sorted(item for item in items if not isinstance(item, Reject))
    return [orjson.loads(e.value) for e in events], [item for item in items if isinstance(item, Reject)]


def run(mapping, *rows: str):
    return converted("\r\n".join([HEADER, *rows]) + "\r\n", mapping)


def test_day_first_two_digit_year_is_midnight_utc_or_the_given_zone():
    assert OCT_20_2016_MS == 1_476_921_600_000
    assert parse_date("20-10-16", ["%d-%m-%y"], ZoneInfo("UTC"))[0] == OCT_20_2016_MS
    # Berlin is on summer time (UTC+2) on 20 October 2016: its midnight is 22:00 UTC the day before.
    assert parse_date("20-10-16", ["%d-%m-%y"], ZoneInfo("Europe/Berlin"))[0] == OCT_20_2016_MS - 2 * 3_600_000
    iso_too = ["%d-%m-%y", "%Y-%m-%dT%H:%M:%S%z"]
    ms, _, fmt = parse_date("2016-10-20T02:00:00+02:00", iso_too, ZoneInfo("UTC"))
    assert (ms, fmt) == (OCT_20_2016_MS, "%Y-%m-%dT%H:%M:%S%z")
    with pytest.raises(ValueError):
        parse_date("31-02-17", ["%d-%m-%y"], ZoneInfo("UTC"))


def test_pseudonymise_is_stable_and_hides_the_name():
    assert pseudonymise("Moses Frase") == "a14ea09d7b" == pseudonymise("Moses Frase")
    assert MOSES == "rep-a14ea09d7b"
    assert pseudonymise("Anna Snelling") != pseudonymise("Moses Frase")


def test_won_row_becomes_lead_created_and_deal_won(maven):
    row = "1C1I7A6R,Moses Frase,GTX Plus Basic,Cancity,Won,20-10-16,01-03-17,1054,Q4 2016,Q1 2017"
    events, rejects = run(maven, row)
    assert rejects == []
    assert [to_epoch_ms(e.pop("occurred_at")) for e in events] == [OCT_20_2016_MS, MAR_1_2017_MS]
    envelope = {"schema_version": 1, "lead_id": "1C1I7A6R", "rep_id": MOSES, "account_id": "Cancity"}
    assert events == [
        {**envelope, "event_id": "1C1I7A6R:created", "type": "lead.created",
         "payload": {"source": "maven-export", "stage": "engaging", "amount": 1054.0,
                     "close_date": "2017-03-01T00:00:00.000Z"}},
        {**envelope, "event_id": "1C1I7A6R:won", "type": "deal.won", "payload": {"amount": 1054.0}},
    ]  # fmt: skip


def test_lost_row_becomes_lead_created_and_deal_lost(maven):
    events, rejects = run(maven, "ZX1,Anna Snelling,GTX Basic,Acme,Lost,02-01-17,15-02-17,0,Q1 2017,Q1 2017")
    assert rejects == []
    assert [(e["type"], e["event_id"], to_epoch_ms(e["occurred_at"]), e["payload"]) for e in events] == [
        # 2017-02-15 is 17226 - 14 days after the epoch: 1_487_116_800_000 ms, as the deal.lost's time.
        ("lead.created", "ZX1:created", 1_483_315_200_000,
         {"source": "maven-export", "stage": "engaging", "amount": 0.0, "close_date": "2017-02-15T00:00:00.000Z"}),
        ("deal.lost", "ZX1:lost", 1_487_116_800_000, {"reason": "lost"}),
    ]
    assert {e["rep_id"] for e in events} == {"rep-d4c1bce57c"}


def test_engaging_row_is_an_open_deal_and_an_empty_account_is_left_out(maven):
    events, rejects = run(maven, "OPEN1,Moses Frase,MG Special,,Engaging,20-10-16,,,Q4 2016,")
    assert rejects == []
    events[0]["occurred_at"] = to_epoch_ms(events[0]["occurred_at"])
    assert events == [
        {"schema_version": 1, "event_id": "OPEN1:created", "type": "lead.created", "occurred_at": OCT_20_2016_MS,
         "lead_id": "OPEN1", "rep_id": MOSES, "payload": {"source": "maven-export", "stage": "engaging"}},
    ]  # fmt: skip


def test_unmappable_rows_are_rejected_whole_with_line_and_reason(maven):
    rows = [
        "OK1,Moses Frase,GTX Basic,Cancity,Won,20-10-16,01-03-17,588,Q4 2016,Q1 2017",  # line 2
        'OK2,Moses Frase,"GTX\nBasic",Cancity,Engaging,20-10-16,,,Q4 2016,',  # lines 3-4
        "P1,Moses Frase,GTX Basic,,Prospecting,,,,,",  # line 5
        "BAD1,Moses Frase,GTX Basic,Cancity,Won,20-10-16,31-02-17,588,Q4 2016,Q1 2017",  # line 6
        "BAD2,Moses Frase,GTX Basic,Cancity,Won,20-10-16,01-03-17,lots,Q4 2016,Q1 2017",  # line 7
        "BAD3,Moses Frase,GTX Basic,Cancity,Won,20-10-16,01-03-17,-5,Q4 2016,Q1 2017",  # line 8
        "BAD4,Moses Frase,GTX Basic,Cancity,Qualified,20-10-16,,,Q4 2016,",  # line 9
        "BAD5,Moses Frase,GTX Basic,Cancity,Won,,01-03-17,588,,Q1 2017",  # line 10
        "BAD6,Moses Frase,GTX Basic",  # line 11
    ]
    events, rejects = run(maven, *rows)
    # A rejected row contributes nothing: no lead.created without its outcome.
    assert sorted(e["event_id"] for e in events) == ["OK1:created", "OK1:won", "OK2:created"]
    assert [(r.line, r.reason, r.detail) for r in rejects] == [
        (5, PROSPECTING_REASON, "deal_stage='Prospecting'"),
        (6, "unparseable date", "close_date '31-02-17' matches none of %d-%m-%y"),
        (7, "unparseable value", "close_value 'lots' is not float"),
        (8, "invalid event", "engaged: invalid_field: payload.amount: Input should be greater than or equal to 0"),
        (9, "no matching rule", "deal_stage='Qualified'"),
        (10, "missing date", "engage_date is empty; engaged needs it as its event time"),
        (11, "malformed row", "3 fields, the header has 10"),
    ]
    assert rejects[0].row == ["P1", "Moses Frase", "GTX Basic", "", "Prospecting", "", "", "", "", ""]


def test_events_are_sorted_by_time_then_id(maven):
    events, _ = run(
        maven,
        "B,Moses Frase,GTX Basic,Cancity,Won,20-10-16,01-03-17,1,Q4 2016,Q1 2017",
        "A,Moses Frase,GTX Basic,Cancity,Lost,21-10-16,20-10-17,0,Q4 2016,Q4 2017",
        "C,Moses Frase,GTX Basic,Cancity,Engaging,20-10-16,,,Q4 2016,",
    )
    assert [e["event_id"] for e in events] == ["B:created", "C:created", "A:created", "B:won", "A:lost"]


def test_mapping_mistakes_stop_the_import(tmp_path, maven):
    bad = tmp_path / "bad.toml"
    bad.write_text(MAVEN_MAPPING.read_text().replace('occurred_at = "close_date"', 'ocurred_at = "close_date"', 1))
    with pytest.raises(ImportFailed, match="unknown ocurred_at"):
        load_mapping(bad)
    with pytest.raises(ImportFailed, match="export.csv: the mapping reads column.* does not have: close_date, close_value"):
        converted("opportunity_id,sales_agent,account,deal_stage,engage_date\n", maven)


def test_publishing_requires_a_broker(monkeypatch, capsys):
    monkeypatch.delenv("CRM_PULSE_BROKER", raising=False)
    with pytest.raises(SystemExit) as exited:
        main(["import", "export.csv", "--mapping", str(MAVEN_MAPPING)])
    assert exited.value.code == 2
    assert "CRM_PULSE_BROKER is not set" in capsys.readouterr().err


def test_cli_dry_run_writes_events_and_rejects(tmp_path, monkeypatch):
    export = tmp_path / "export.csv"
    export.write_text(HEADER + "\nW1,Moses Frase,GTX Basic,Cancity,Won,20-10-16,01-03-17,588,Q4 2016,Q1 2017\n"
                      "P1,Moses Frase,GTX Basic,,Prospecting,,,,,\n")  # fmt: skip
    with pytest.raises(SystemExit) as exited:
        main(["import", str(export), "--mapping", str(MAVEN_MAPPING), "--dry-run", str(tmp_path / "out.jsonl")])
    assert exited.value.code == 0
    assert [orjson.loads(line)["event_id"] for line in (tmp_path / "out.jsonl").read_bytes().splitlines()] == [
        "W1:created", "W1:won"
    ]
    with open(tmp_path / "out.rejects.csv", newline="") as f:
        assert [(r["line"], r["reason"], r["opportunity_id"]) for r in csv.DictReader(f)] == [
            ("3", PROSPECTING_REASON, "P1")
        ]


@pytest.mark.skipif(not MAVEN_CSV.exists(), reason=f"the Maven export is not at {MAVEN_CSV}")
def test_dry_run_of_the_maven_export_matches_the_csv(tmp_path):
    with open(MAVEN_CSV, newline="") as f:
        rows = list(csv.DictReader(f))
    stages = Counter(row["deal_stage"] for row in rows)
    prospecting_lines = [line for line, row in enumerate(rows, start=2) if row["deal_stage"] == "Prospecting"]

    out = tmp_path / "maven.jsonl"
    summary = import_files(Settings(broker=None), [(MAVEN_CSV, MAVEN_MAPPING)], dry_run=out)
    [report] = summary.files
    assert (report.rows, report.rejects) == (len(rows), {PROSPECTING_REASON: stages["Prospecting"]})

    raw = out.read_bytes().splitlines()
    events = [parse_event(line) for line in raw]  # raises unless every event is valid
    assert len(events) == summary.events
    assert Counter(e.type for e in events) == report.events == {
        "lead.created": stages["Engaging"] + stages["Won"] + stages["Lost"],
        "deal.won": stages["Won"],
        "deal.lost": stages["Lost"],
    }
    assert len({e.event_id for e in events}) == len(events)
    assert [(e.occurred_at, e.event_id) for e in events] == sorted((e.occurred_at, e.event_id) for e in events)
    assert sum(e.payload.amount for e in events if e.type == "deal.won") == sum(
        float(row["close_value"]) for row in rows if row["deal_stage"] == "Won"
    )
    agents = {row["sales_agent"] for row in rows}
    assert {e.rep_id for e in events} == {"rep-" + hashlib.sha256(a.encode()).hexdigest()[:10] for a in agents}
    text = out.read_text()
    assert not any(agent in text for agent in agents)

    with open(tmp_path / "maven.rejects.csv", newline="") as f:
        rejects = list(csv.DictReader(f))
    assert [int(r["line"]) for r in rejects] == prospecting_lines
    assert len(rejects) == stages["Prospecting"]
    assert {r["reason"] for r in rejects} == {PROSPECTING_REASON}


def test_the_documented_mappings_load_and_the_maven_one_is_the_shipped_file(tmp_path):
    blocks = re.findall(r"```toml\n(.*?)```", (ROOT / "docs" / "importer.md").read_text(), re.S)
    assert len(blocks) == 4
    mappings = []
    for i, block in enumerate(blocks):
        (tmp_path / f"{i}.toml").write_text(block)
        mappings.append(load_mapping(tmp_path / f"{i}.toml"))
    assert mappings[0] == load_mapping(MAVEN_MAPPING)

    pipedrive = mappings[3]
    header = "Deal - ID,Deal - Owner,Deal - Organization,Deal - Pipeline,Deal - Status,Deal - Deal created,"
    header += "Deal - Won time,Deal - Lost time,Deal - Value,Deal - Currency,Deal - Lost reason"
    rows = [
        "7,Ana Ruiz,Acme,Sales,lost,2024-03-05 14:22:10,,2024-04-01,0,EUR,",
        "8,Ana Ruiz,Acme,Sales,deleted,2024-03-05 14:22:10,,,0,EUR,",
    ]
    events, rejects = converted("\n".join([header, *rows]) + "\n", pipedrive)
    # Berlin is on CET (UTC+1) on 5 March: 14:22:10 there is 13:22:10 UTC.
    assert [(e["event_id"], to_epoch_ms(e["occurred_at"]), e["payload"]) for e in events] == [
        ("pd-7:created", to_epoch_ms("2024-03-05T13:22:10Z"), {"source": "pipedrive", "stage": "open"}),
        ("pd-7:lost", to_epoch_ms("2024-03-31T22:00:00Z"), {"reason": "unspecified"}),
    ]
    assert events[0]["lead_id"] == "pd-deal-7" and events[0]["rep_id"] == "rep-" + pseudonymise("Ana Ruiz")
    assert [(r.line, r.reason) for r in rejects] == [(3, "deleted in Pipedrive")]
