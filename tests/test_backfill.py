"""Backfills from several exports: the external merge against sorted(), several files merged in time order, the
checks that stop or flag an import (every row rejected, implausible dates, late events) with their exact numbers."""

from __future__ import annotations

import math
from datetime import datetime, timezone
from pathlib import Path

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from kafka.partitioner import DefaultPartitioner

from crm_pulse.cli import main
from crm_pulse.config import Settings
from crm_pulse.importer import DateCheck, Event, LateCheck, Runs, import_files

DAY_MS = 86_400_000
LEADS_MAPPING = """
[dates]
formats = ["%Y-%m-%d"]

[[events]]
type = "lead.created"
occurred_at = "created"
event_id = "{id}:created"
envelope = { lead_id = "id" }
payload = { source = "source", stage = { const = "new" } }
"""
DEALS_MAPPING = """
[dates]
formats = ["%d/%m/%Y"]

[[events]]
type = "deal.won"
occurred_at = "won"
event_id = "{lead}:won"
envelope = { lead_id = "lead" }
payload = { amount = { column = "amount", type = "float" } }
"""

events = st.builds(
    lambda at, n: Event(at, f"e{n}", "lead.created", f"L{n % 7}", f'{{"n": {n}}}'),
    st.integers(0, 20), st.integers(0, 50),
)  # fmt: skip


@settings(max_examples=200, deadline=None)
@given(st.lists(events, max_size=60), st.integers(1, 7))
def test_the_external_merge_is_sorted_of_everything(tmp_path_factory, added, run_events):
    runs = Runs(tmp_path_factory.mktemp("runs"), run_events)
    for event in added:
        runs.add(event)
    assert list(runs.merged()) == sorted(added)
    assert len(runs.paths) == math.ceil(len(added) / run_events)  # every run was spilled to disk


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


@pytest.fixture
def exports(tmp_path):
    """A leads export and a deals export (day-first dates), each with its mapping; the deals are not in date order."""
    leads = write(tmp_path / "leads.csv", "id,created,source\nA,2024-01-05,web\nB,2024-01-02,fair\nC,2024-01-09,web\n")
    deals = write(tmp_path / "deals.csv", "lead,won,amount\nB,20/01/2024,300\nA,03/01/2024,100\nC,,5\n")
    return leads, write(tmp_path / "leads.toml", LEADS_MAPPING), deals, write(tmp_path / "deals.toml", DEALS_MAPPING)


def test_several_files_are_merged_in_time_order(exports, tmp_path, monkeypatch):
    leads, leads_mapping, deals, deals_mapping = exports
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "out.jsonl"
    with pytest.raises(SystemExit) as exited:
        main(["import", str(leads), "--mapping", str(leads_mapping), str(deals), "--mapping", str(deals_mapping),
              "--dry-run", str(out)])  # fmt: skip
    assert exited.value.code == 0
    written = out.read_bytes()
    # A won on 3 January (dated before its creation on the 5th: the worker closes it, docs/kpis.md).
    assert [(e["event_id"], e["occurred_at"][:10]) for e in map(orjson.loads, written.splitlines())] == [
        ("B:created", "2024-01-02"), ("A:won", "2024-01-03"), ("A:created", "2024-01-05"),
        ("C:created", "2024-01-09"), ("B:won", "2024-01-20"),
    ]  # fmt: skip
    assert (tmp_path / "deals.rejects.csv").read_text().splitlines() == [
        "line,reason,detail,lead,won,amount", "4,missing date,won is empty; deal.won needs it as its event time,C,,5"
    ]
    assert (tmp_path / "leads.rejects.csv").read_text().splitlines() == ["line,reason,detail,id,created,source"]

    # Two runs of two events at most each: spilled and merged, the same bytes; ids are the same on every import.
    summary = import_files(Settings(broker=None), [(leads, leads_mapping), (deals, deals_mapping)],
                           dry_run=tmp_path / "again.jsonl", run_events=2)  # fmt: skip
    assert (tmp_path / "again.jsonl").read_bytes() == written
    assert (summary.events, [f.rows for f in summary.files], [dict(f.rejects) for f in summary.files]) == (
        5, [3, 3], [{}, {"missing date": 1}]
    )


def crm_pulse_import(*args: str, capsys) -> tuple[int, str]:
    with pytest.raises(SystemExit) as exited:
        main(["import", *args])
    return exited.value.code, capsys.readouterr().err


def test_a_file_whose_every_row_is_rejected_stops_the_import(exports, tmp_path, monkeypatch, capsys):
    leads, leads_mapping, deals, _ = exports
    monkeypatch.chdir(tmp_path)
    # The day-first deals read as ISO dates: two fail to parse, the third has none.
    month_first = write(tmp_path / "iso.toml", DEALS_MAPPING.replace("%d/%m/%Y", "%Y-%m-%d"))
    code, err = crm_pulse_import(str(leads), str(deals), "--mapping", str(leads_mapping), "--mapping",
                                 str(month_first), "--dry-run", str(tmp_path / "out.jsonl"), capsys=capsys)  # fmt: skip
    assert (code, err.splitlines()[-1]) == (2, f"crm-pulse import: {deals}: every one of its 3 rows was rejected, "
                                               f"2 of them for: unparseable date; its mapping does not fit it: see "
                                               f"deals.rejects.csv")  # fmt: skip


def test_file_and_mapping_counts_must_pair(exports, tmp_path, capsys):
    leads, leads_mapping, deals, deals_mapping = exports
    code, err = crm_pulse_import(str(leads), str(deals), str(leads), "--mapping", str(leads_mapping), "--mapping",
                                 str(deals_mapping), "--dry-run", str(tmp_path / "o.jsonl"), capsys=capsys)  # fmt: skip
    assert (code, err.splitlines()[-1:]) == (2, [
        "crm-pulse import: 3 files and 2 mappings: give one --mapping for every file, in the same order, or one "
        "for them all"
    ])  # fmt: skip
    code, err = crm_pulse_import(str(leads), str(deals), "--mapping", str(leads_mapping), "--mapping",
                                 str(deals_mapping), "--rejects", "r.csv", "--dry-run", str(tmp_path / "o.jsonl"),
                                 capsys=capsys)  # fmt: skip
    assert (code, err.splitlines()[-1:]) == (2, [
        "crm-pulse import: --rejects names one file's rejects: with several files, each goes to FILE.rejects.csv"
    ])  # fmt: skip


def utc(year: int, month: int, day: int) -> datetime:
    return datetime(year, month, day, tzinfo=timezone.utc)


def test_dates_far_from_the_files_others_are_flagged_with_their_lines():
    check = DateCheck()
    # 4 dates in each month January–October 2016 (lines 2–41), then 2 in May 2020 (lines 42, 43): 42 dates. The
    # first quartile (rank 10.5) falls in March (cumulative 12), the third (31.5) in August (32): an IQR of 5 months,
    # fences at March 2016 − 27 months and August 2016 + 27 months = November 2018.
    for n in range(40):
        check.observe(utc(2016, n // 4 + 1, 13 + n % 4), "%Y-%m-%d", n + 2)
    for line in (42, 43):
        check.observe(utc(2020, 5, 16), "%Y-%m-%d", line)
    assert check.warnings() == [
        "2 dates lie far from the file's others (half of them fall in 2016-03 … 2016-08): 2020-05: lines 42-43; "
        "is a date format reading the day, month or year from the wrong place?"
    ]


def test_a_history_spread_over_years_is_not_flagged():
    check = DateCheck()
    for n in range(60):  # one date a month, 2015–2019: quartiles 2016-03 and 2018-08
        check.observe(utc(2015 + n // 12, n % 12 + 1, 20), "%Y-%m-%d", n + 2)
    assert check.warnings() == []


def test_day_first_dates_read_month_first_are_flagged():
    check = DateCheck()
    for n in range(30):  # what "%m/%d/%Y" makes of day-first dates whose day is 12 or less: every day ≤ 12
        check.observe(utc(2024, n % 12 + 1, n % 12 + 1), "%m/%d/%Y", n + 2)
    assert check.warnings() == [
        "all 30 dates read with '%m/%d/%Y' have a day of month of 12 or less: are they day-first dates read "
        "month-first (or the other way round)?"
    ]
    monthly = DateCheck()
    for n in range(30):  # a monthly export on the 1st, and 29 dates with a 13th: neither is flagged
        monthly.observe(utc(2022 + n // 12, n % 12 + 1, 1), "%m/%d/%Y", n + 2)
    assert monthly.warnings() == []
    almost = DateCheck()
    for n in range(30):
        almost.observe(utc(2024, n % 12 + 1, 13 if n == 29 else n % 12 + 1), "%m/%d/%Y", n + 2)
    assert almost.warnings() == []


def test_late_events_are_those_older_than_their_partitions_latest_less_grace():
    # The producer's own partitioner says where each key goes, given a topic of 4 partitions.
    class Cluster:
        def topics(self):
            return {"events"}

        def partitions_for_topic(self, topic):
            return {0, 1, 2, 3}

        available_partitions_for_topic = partitions_for_topic

    where = {key: DefaultPartitioner().partition("events", None, key.encode(), None, None, Cluster())
             for key in ("L0", "L1", "L2", "L3", "L4")}  # fmt: skip
    assert where == {"L0": 0, "L1": 3, "L2": 0, "L3": 0, "L4": 3}
    latest = {0: 100 * DAY_MS, 3: 10 * DAY_MS}  # partitions 1 and 2: no worker has read them
    check = LateCheck(latest, 4, 2 * DAY_MS)
    for key in where:
        for at in (0, 8 * DAY_MS - 1, 8 * DAY_MS, 98 * DAY_MS):
            check.check(Event(at, f"{key}:{at}", "lead.created", key, "{}"))
    # Partition 0 (latest day 100, watermark day 98): 0, day 8 − 1 ms and day 8 are late, day 98 is not: 3 × 3 keys.
    # Partition 3 (watermark day 8): 0 and day 8 − 1 ms: 2 × 2 keys.
    assert check.late == {0: 9, 3: 4}
