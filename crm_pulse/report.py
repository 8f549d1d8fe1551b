"""`crm-pulse report`: the KPI catalogue of CSV exports (through the importer's mappings) or of the input topic's
history, computed in this process with the worker's own KPI code (`streams.fold`, `agents.gauges`) and no worker,
printed as a table or written as CSV or JSON (docs/report.md)."""

from __future__ import annotations

import csv
import io
import itertools
import os
import tempfile
from pathlib import Path
from types import SimpleNamespace

import orjson
from kafka import TopicPartition
from rich.console import Console
from rich.table import Table

from crm_pulse.agents.gauges import Gauges, kpi_snapshot, period_table
from crm_pulse.config import Settings
from crm_pulse.importer import FileReport, ImportFailed, Reject, Runs, _consumer, convert, load_mapping
from crm_pulse.schemas.events import ms_to_iso
from crm_pulse.schemas.validate import InvalidEvent, parse_event
from crm_pulse.streams.clock import Clock
from crm_pulse.streams.fold import Fold
from crm_pulse.streams.forecast import (
    open_deal, stage_counts, stage_figures, weighted_pipeline, weighted_rows, win_probabilities,
)  # fmt: skip
from crm_pulse.streams.kpis import day_of
from crm_pulse.streams.periods import PERIODS, period_of

FORMATS = ("table", "csv", "json")
# Labels that split a KPI by a dimension: the table shows the overall series only.
DIMENSIONS = {"rep", "source", "campaign", "score_band"}


class ReportFailed(Exception):
    """The report cannot be made: the message says what to change."""


def new_fold(settings: Settings) -> Fold:
    return Fold(settings.stall_policy, settings.business_zone, settings.baseline_days, settings.deal_policy)


def fold_files(settings: Settings, files: list[tuple[Path, Path]]) -> Fold:
    """The fold of the files' events, merged in the order `crm-pulse import` publishes them."""
    mappings = [load_mapping(mapping_path) for _, mapping_path in files]  # every mistake before any reading
    fold = new_fold(settings)
    with tempfile.TemporaryDirectory(prefix="crm-pulse-report-") as spill:
        runs = Runs(Path(spill))
        for (csv_path, _), mapping in zip(files, mappings):
            try:
                with open(csv_path, newline="", encoding=mapping.encoding) as f:
                    for item in convert(f, mapping, FileReport(csv_path, Path(os.devnull))):
                        if not isinstance(item, Reject):
                            runs.add(item)
            except UnicodeDecodeError as exc:
                raise ReportFailed(f"{csv_path} is not {mapping.encoding} ({exc}); set [csv] encoding") from None
        for event in runs.merged():
            fold.apply(event.key, parse_event(event.value.encode()).model_dump(by_alias=True))
    return fold


def fold_topic(settings: Settings) -> Fold:
    """The fold of the input topic from its start to its end as read, with the worker's ingest checks: invalid
    events and events later than the grace period behind their partition's latest are left out, as the worker
    dead-letters them."""
    if not settings.broker:
        raise ReportFailed("--topic reads the input topic: set CRM_PULSE_BROKER to the broker your worker reads")
    fold, clock = new_fold(settings), Clock("event", int(settings.grace_seconds * 1000))
    consumer = _consumer(settings)
    try:
        partitions = [TopicPartition(settings.input_topic, p)
                      for p in sorted(consumer.partitions_for_topic(settings.input_topic) or ())]  # fmt: skip
        if not partitions:
            raise ReportFailed(f"the input topic {settings.input_topic!r} does not exist on {settings.broker}")
        consumer.assign(partitions)
        consumer.seek_to_beginning()
        end = consumer.end_offsets(partitions)
        # Tansu reports an end offset inside the last record batch (`crm_pulse.broker.seal_changelogs`): read on
        # past the end offsets until a poll finds nothing more.
        while True:
            records = list(itertools.chain.from_iterable(consumer.poll(timeout_ms=1000).values()))
            if not records and all(consumer.position(tp) >= end[tp] for tp in partitions):
                break
            for record in records:
                try:
                    event = parse_event(record.value)
                except InvalidEvent:
                    continue
                if clock.is_late(record.partition, event.occurred_at):
                    continue
                clock.observe(record.partition, event.occurred_at)
                fold.apply(event.key, event.model_dump(by_alias=True))
    finally:
        consumer.close()
    return fold


def gauges_of(fold: Fold) -> Gauges:
    """The worker's gauges over the fold's aggregates; "now" is the latest event (the worker's event clock)."""
    clock = SimpleNamespace(now_ms=lambda: fold.latest_ms)
    aggregates = SimpleNamespace(kpi_sums=fold.kpi_sums, histograms=fold.histograms, zone=fold.zone)
    return Gauges(clock, aggregates, SimpleNamespace(customer_base=fold.customer_base), leads=None)


def deal_figures(fold: Fold, history_days: int) -> dict:
    """As the worker's /deals/forecast has them, at the latest event: P(win | stage), stage conversion and the
    closed deals behind them over the `history_days` days up to it, per pipeline; and the weighted pipeline of
    the deals open then, with those probabilities."""
    today = day_of(fold.latest_ms, fold.zone)
    counts = {pipeline: stage_counts(state, today, history_days) for pipeline, state in sorted(fold.outcomes.items())}
    probabilities = {pipeline: win_probabilities(c) for pipeline, c in counts.items()}
    deals = [(*deal, lead["team"], lead["rep"]) for (family, _), lead in fold.entities.items()
             if family == "lead" and (deal := open_deal(lead, fold.deal_policy)) is not None]  # fmt: skip
    weighted = weighted_pipeline(deals, lambda pipeline, stage: probabilities.get(pipeline, {}).get(stage), fold.zone)
    return {"history_days": history_days, "stages": {pipeline: stage_figures(c) for pipeline, c in counts.items() if c},
            "weighted_pipeline": weighted_rows(weighted)}  # fmt: skip


def report(settings: Settings, fold: Fold, period: str | None, first: str | None) -> dict:
    """The report as /kpis answers it: the rolling windows, or with `period` every period from `first` (default:
    the first event's) to the latest event's; and the deal figures at the latest event."""
    if fold.latest_ms is None:
        raise ReportFailed("no events to report on")
    gauges = gauges_of(fold)
    head = {"time_zone": settings.business_timezone, "now": ms_to_iso(fold.latest_ms)}
    deals = {"deals": deal_figures(fold, settings.deal_history_days)}
    if period is None:
        return {**head, "kpis": kpi_snapshot(gauges.kpi_families()), **deals}
    if first is None:
        first = period_of(period, day_of(fold.earliest_ms, fold.zone))
    try:
        return {**head, "period": period, "periods": period_table(gauges, period, first), **deals}
    except ValueError as exc:
        raise ReportFailed(f"--from {first}: {exc}") from None


def rows(body: dict) -> list[tuple[str, str, dict, float]]:
    """(window or period, metric, its other labels, value) of every sample in a report."""
    snapshots = [body["kpis"]] if "kpis" in body else [period["kpis"] for period in body["periods"]]
    return [(sample["labels"]["window"], metric, {k: v for k, v in sample["labels"].items() if k != "window"},
             sample["value"])
            for snapshot in snapshots for metric, samples in snapshot.items() for sample in samples]  # fmt: skip


# The deal figures under the names of the worker's gauges (docs/deals.md).
STAGE_METRICS = (("win_probability", "crm_deal_win_probability_ratio"), ("conversion", "crm_deal_stage_conversion_ratio"),
                 ("closed_reached", "crm_deal_closed_reached"))  # fmt: skip


def deal_rows(deals: dict) -> list[tuple[str, str, dict, float]]:
    """(window, metric, labels, value) of the deal figures: the stage figures' window is the trailing history
    (`180d`), the weighted pipeline's `open` (the deals open at the latest event)."""
    window = f"{deals['history_days']}d"
    found = [(window, metric, {"pipeline": pipeline, "stage": stage}, value)
             for pipeline, figures in deals["stages"].items() for key, metric in STAGE_METRICS
             for stage, value in figures[key].items()]  # fmt: skip
    found += [("open", "crm_pipeline_weighted_value", {"close_month": row["close_month"], "pipeline": row["pipeline"],
               "team": row["team_id"] or "none", "rep": row["rep_id"] or "unassigned"}, row["weighted_value"])
              for row in deals["weighted_pipeline"]]  # fmt: skip
    return found


def as_csv(body: dict) -> str:
    out = io.StringIO()
    writer = csv.writer(out)
    writer.writerow(["window", "metric", "labels", "value"])
    for window, metric, labels, value in rows(body) + deal_rows(body["deals"]):
        writer.writerow([window, metric, ";".join(f"{k}={v}" for k, v in labels.items()), value])
    return out.getvalue()


def shown(value: float) -> str:
    return f"{value:,.0f}" if value == int(value) else f"{value:,.4f}"


def as_table(body: dict) -> Table:
    """The overall series (no dimension): a row per metric and constant labels, a column per window or period."""
    cells: dict[tuple[str, str], dict[str, float]] = {}
    windows: dict[str, None] = {}
    for window, metric, labels, value in rows(body):
        if not DIMENSIONS & labels.keys():
            windows[window] = None
            extra = ", ".join(f"{k}={v}" for k, v in labels.items())
            cells.setdefault((metric, extra), {})[window] = value
    title = f"KPIs by {body['period']}" if "period" in body else "KPIs"
    table = Table(title=f"{title} ({body['time_zone']}; now {body['now']})")
    table.add_column("metric", no_wrap=True)
    for window in windows:
        table.add_column(window, justify="right")
    for (metric, extra), values in sorted(cells.items()):
        table.add_row(f"{metric}{{{extra}}}" if extra else metric, *(shown(values[w]) if w in values else "–" for w in windows))
    return table


def deal_tables(body: dict) -> list[Table]:
    """Per pipeline and stage: P(win | stage), conversion and the closed deals behind them; then the weighted
    pipeline by close month and pipeline (its teams and reps summed, as the table shows overall series)."""
    deals = body["deals"]
    stages = Table(title=f"Deals closed in the {deals['history_days']} days to {body['now']}")
    for column in ("pipeline", "stage", "P(win | stage)", "conversion", "closed"):
        stages.add_column(column, justify="left" if column in ("pipeline", "stage") else "right")
    for pipeline, figures in deals["stages"].items():
        for stage, reached in figures["closed_reached"].items():
            stages.add_row(pipeline, stage, shown(figures["win_probability"][stage]), shown(figures["conversion"][stage]),
                           shown(reached))  # fmt: skip
    months: dict[tuple[str, str], float] = {}
    for row in deals["weighted_pipeline"]:
        months[(row["close_month"], row["pipeline"])] = months.get((row["close_month"], row["pipeline"]), 0) + row["weighted_value"]
    weighted = Table(title="Weighted pipeline of the open deals: Σ amount × P(win | stage)")
    for column in ("close month", "pipeline", "weighted value"):
        weighted.add_column(column, justify="right" if column == "weighted value" else "left")
    for (month, pipeline), value in sorted(months.items()):
        weighted.add_row(month, pipeline, shown(value))
    return [stages, weighted]


def cli_report(settings: Settings, files: list[Path], mappings: list[Path], topic: bool, period: str | None,
               first: str | None, fmt: str, out: Path | None) -> int:  # fmt: skip
    """The `crm-pulse report` command: its exit status."""
    try:
        if topic == bool(files):
            raise ReportFailed("give CSV files with --mapping, or --topic for the input topic's history (not both)")
        if period is not None and period not in PERIODS:
            raise ReportFailed(f"--period {period}: not one of {', '.join(PERIODS)}")
        if fmt not in FORMATS:
            raise ReportFailed(f"--format {fmt}: not one of {', '.join(FORMATS)}")
        if first is not None and period is None:
            raise ReportFailed(f"--from {first} needs --period week, month or quarter")
        if files and len(mappings) not in (1, len(files)):
            raise ReportFailed(f"{len(files)} files and {len(mappings)} mappings: give one --mapping for every "
                               f"file, in the same order, or one for them all")  # fmt: skip
        if files:
            fold = fold_files(settings, list(zip(files, mappings if len(mappings) == len(files) else mappings * len(files))))
        else:
            fold = fold_topic(settings)
        body = report(settings, fold, period, first)
        if fmt == "table" and out is None:
            Console().print(as_table(body), *deal_tables(body))
        elif fmt == "table":
            with open(out, "w") as f:
                Console(file=f, width=200).print(as_table(body), *deal_tables(body))
        else:
            text = orjson.dumps(body, option=orjson.OPT_INDENT_2).decode() + "\n" if fmt == "json" else as_csv(body)
            if out is None:
                print(text, end="")
            else:
                out.write_text(text)
    except (ReportFailed, ImportFailed, OSError) as exc:
        Console(stderr=True, soft_wrap=True).print(f"crm-pulse report: {exc}", style="red", markup=False)
        return 2
    return 0
