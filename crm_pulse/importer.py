"""`crm-pulse import`: a CSV export → contract events, through a declarative TOML mapping (docs/importer.md).

Every row becomes all of its events or none: a row that cannot be mapped is rejected with its line
number and reason, never dropped silently. Events are validated against the contract and published in
(occurred_at, event_id) order, so no partition ever sees an event older than one before it.
"""

from __future__ import annotations

import csv
import hashlib
import re
import tomllib
from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Iterable, NamedTuple
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import orjson
from kafka import KafkaProducer
from kafka.errors import KafkaError
from rich.console import Console
from rich.progress import Progress
from rich.table import Table
from rich.text import Text

from crm_pulse.broker import client_security, ensure_topics
from crm_pulse.config import Settings
from crm_pulse.schemas.events import EVENT_TYPES, ms_to_iso
from crm_pulse.schemas.validate import InvalidEvent, parse_event

EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)
PARSERS = {"str": str, "int": int, "float": float}
PLACEHOLDER = re.compile(r"\{([^{}]+)\}")

# Reasons a row is rejected (a [[reject]] rule adds its own).
MALFORMED_ROW = "malformed row"
NO_RULE = "no matching rule"
MISSING_DATE = "missing date"
BAD_DATE = "unparseable date"
BAD_VALUE = "unparseable value"
MISSING_ID = "missing id"
INVALID_EVENT = "invalid event"


class ImportFailed(Exception):
    """The import cannot run: a bad mapping, an unreadable file, no broker, or the broker refused events."""


def pseudonymise(value: str) -> str:
    """A stable id for a person's name: the same name always gives the same id, and the id shows no name."""
    return hashlib.sha256(value.encode()).hexdigest()[:10]


@dataclass(frozen=True)
class Source:
    """Where one event field comes from: a column (parsed, transformed, prefixed; `default` if empty) or a constant."""

    column: str | None = None
    const: object = None
    type: str = "str"
    transform: str | None = None
    prefix: str = ""
    default: object = None

    def value(self, row: dict[str, str]) -> object:
        if self.column is None:
            return self.const
        raw = row[self.column]
        if raw == "":
            return self.default
        if self.transform == "pseudonymise":
            raw = pseudonymise(raw)
        try:
            value = PARSERS[self.type](raw)
        except ValueError:
            raise RowRejected(BAD_VALUE, f"{self.column} {raw[:64]!r} is not {self.type}") from None
        return self.prefix + value if self.prefix else value


@dataclass(frozen=True)
class Rule:
    name: str
    type: str
    occurred_at: str
    event_id: str
    when: dict[str, str | list | bool]
    envelope: dict[str, Source]
    payload: dict[str, Source]


@dataclass(frozen=True)
class RejectRule:
    when: dict[str, str | list | bool]
    reason: str


@dataclass(frozen=True)
class Mapping:
    rules: list[Rule]
    rejects: list[RejectRule]
    date_formats: list[str]
    timezone: ZoneInfo
    delimiter: str = ","
    encoding: str = "utf-8-sig"

    def columns(self) -> set[str]:
        """Every column the mapping reads."""
        used = set()
        for rule in (*self.rules, *self.rejects):
            used |= set(rule.when)
        for rule in self.rules:
            used |= {rule.occurred_at, *PLACEHOLDER.findall(rule.event_id)}
            used |= {s.column for s in (*rule.envelope.values(), *rule.payload.values()) if s.column}
        return used


class RowRejected(Exception):
    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason, self.detail = reason, detail


class Event(NamedTuple):
    occurred_at: int
    event_id: str
    type: str
    key: bytes
    value: bytes


class Reject(NamedTuple):
    line: int
    reason: str
    detail: str
    row: list[str]


@dataclass
class Conversion:
    header: list[str]
    rows: int = 0
    events: list[Event] = field(default_factory=list)
    rejects: list[Reject] = field(default_factory=list)


@dataclass
class Summary:
    rows: int
    events: Counter
    rejects: Counter
    rejects_path: Path


# --- the mapping file ----------------------------------------------------------------------------


def _table(value: object, where: str, allowed: set[str], required: set[str] = frozenset()) -> dict:
    if not isinstance(value, dict):
        raise ImportFailed(f"{where} must be a table")
    if unknown := set(value) - allowed:
        raise ImportFailed(f"{where}: unknown {', '.join(sorted(unknown))} (allowed: {', '.join(sorted(allowed))})")
    if missing := required - set(value):
        raise ImportFailed(f"{where}: missing {', '.join(sorted(missing))}")
    return value


def _source(spec: object, where: str) -> Source:
    if isinstance(spec, str):
        return Source(column=spec)
    spec = _table(spec, where, {"column", "const", "type", "transform", "prefix", "default"})
    if ("column" in spec) == ("const" in spec):
        raise ImportFailed(f"{where}: give either column or const")
    if "const" in spec:
        if len(spec) > 1:
            raise ImportFailed(f"{where}: a const takes no type, transform, prefix or default")
        return Source(const=spec["const"])
    source = Source(**spec)
    if source.type not in PARSERS:
        raise ImportFailed(f"{where}: type must be one of {', '.join(PARSERS)}")
    if source.transform not in (None, "pseudonymise"):
        raise ImportFailed(f"{where}: the only transform is pseudonymise")
    if source.type != "str" and (source.transform or source.prefix):
        raise ImportFailed(f"{where}: transform and prefix apply to type str only")
    return source


def _when(spec: object, where: str) -> dict:
    if not isinstance(spec, dict):
        raise ImportFailed(f"{where} must be a table of column = condition")
    for column, condition in spec.items():
        if not isinstance(condition, (str, bool)) and not (
            isinstance(condition, list) and all(isinstance(v, str) for v in condition)
        ):
            raise ImportFailed(f"{where}.{column}: a condition is a string, a list of strings, true or false")
    return spec


def load_mapping(path: Path) -> Mapping:
    try:
        with open(path, "rb") as f:
            doc = tomllib.load(f)
    except tomllib.TOMLDecodeError as exc:
        raise ImportFailed(f"{path}: {exc}") from None
    _table(doc, str(path), {"csv", "dates", "envelope", "events", "reject"}, {"dates", "events"})
    csv_options = _table(doc.get("csv", {}), "[csv]", {"delimiter", "encoding"})
    dates = _table(doc["dates"], "[dates]", {"formats", "timezone"}, {"formats"})
    try:
        tz = ZoneInfo(dates.get("timezone", "UTC"))
    except (ZoneInfoNotFoundError, ValueError):
        raise ImportFailed(f"[dates] timezone {dates['timezone']!r} is not an IANA time zone") from None
    shared = {name: _source(spec, f"[envelope].{name}") for name, spec in doc.get("envelope", {}).items()}
    rules = []
    for i, spec in enumerate(doc["events"]):
        where = f"[[events]] #{i + 1}"
        spec = _table(spec, where, {"name", "when", "type", "occurred_at", "event_id", "envelope", "payload"},
                      {"type", "occurred_at", "event_id"})  # fmt: skip
        if spec["type"] not in EVENT_TYPES:
            raise ImportFailed(f"{where}: type {spec['type']!r} is not one of {', '.join(EVENT_TYPES)}")
        own = {k: _source(v, f"{where}.envelope.{k}") for k, v in spec.get("envelope", {}).items()}
        rules.append(Rule(
            name=spec.get("name", spec["type"]),
            type=spec["type"],
            occurred_at=spec["occurred_at"],
            event_id=spec["event_id"],
            when=_when(spec.get("when", {}), f"{where}.when"),
            envelope={**shared, **own},
            payload={k: _source(v, f"{where}.payload.{k}") for k, v in spec.get("payload", {}).items()},
        ))  # fmt: skip
    rejects = []
    for i, spec in enumerate(doc.get("reject", [])):
        where = f"[[reject]] #{i + 1}"
        spec = _table(spec, where, {"when", "reason"}, {"when", "reason"})
        rejects.append(RejectRule(_when(spec["when"], f"{where}.when"), spec["reason"]))
    return Mapping(rules, rejects, list(dates["formats"]), tz, **csv_options)


# --- rows → events -------------------------------------------------------------------------------


def matches(when: dict, row: dict[str, str]) -> bool:
    """All conditions hold: a string is equal, a list contains the value, true/false: non-empty/empty."""
    for column, condition in when.items():
        value = row[column]
        if isinstance(condition, bool):
            if condition != (value != ""):
                return False
        elif value not in (condition if isinstance(condition, list) else [condition]):
            return False
    return True


def parse_date(value: str, formats: list[str], tz: ZoneInfo) -> int:
    """Epoch ms of the first format that parses `value`; times without an offset are in `tz`."""
    for fmt in formats:
        try:
            parsed = datetime.strptime(value, fmt)
        except ValueError:
            continue
        if parsed.tzinfo is None:
            parsed = parsed.replace(tzinfo=tz)
        return (parsed - EPOCH) // timedelta(milliseconds=1)
    raise ValueError(value)


def build_event(rule: Rule, row: dict[str, str], mapping: Mapping) -> dict:
    raw_time = row[rule.occurred_at]
    if raw_time == "":
        raise RowRejected(MISSING_DATE, f"{rule.occurred_at} is empty; {rule.name} needs it as its event time")
    try:
        ms = parse_date(raw_time, mapping.date_formats, mapping.timezone)
    except ValueError:
        raise RowRejected(BAD_DATE, f"{rule.occurred_at} {raw_time[:64]!r} matches none of "
                          f"{', '.join(mapping.date_formats)}") from None  # fmt: skip
    for column in PLACEHOLDER.findall(rule.event_id):
        if row[column] == "":
            raise RowRejected(MISSING_ID, f"{column} is empty; event_id {rule.event_id!r} needs it")
    event_id = PLACEHOLDER.sub(lambda m: row[m.group(1)], rule.event_id)
    envelope = {name: source.value(row) for name, source in rule.envelope.items()}
    payload = {name: source.value(row) for name, source in rule.payload.items()}
    doc = {"schema_version": 1, "event_id": event_id, "type": rule.type, "occurred_at": ms_to_iso(ms)}
    doc |= {k: v for k, v in envelope.items() if v is not None}
    doc["payload"] = {k: v for k, v in payload.items() if v is not None}
    return doc


def convert_row(row: dict[str, str], mapping: Mapping) -> list[Event]:
    for reject in mapping.rejects:
        if matches(reject.when, row):
            raise RowRejected(reject.reason, ", ".join(f"{c}={row[c]!r}" for c in reject.when))
    rules = [rule for rule in mapping.rules if matches(rule.when, row)]
    if not rules:
        tested = dict.fromkeys(c for rule in mapping.rules for c in rule.when)
        raise RowRejected(NO_RULE, ", ".join(f"{c}={row[c]!r}" for c in tested) or "no rules")
    events = []
    for rule in rules:
        raw = orjson.dumps(build_event(rule, row, mapping))
        try:
            event = parse_event(raw)
        except InvalidEvent as error:
            raise RowRejected(INVALID_EVENT, f"{rule.name}: {error}") from None
        events.append(Event(event.occurred_at, event.event_id, event.type, event.key.encode(), raw))
    return events


def convert(lines: Iterable[str], mapping: Mapping) -> Conversion:
    """Map CSV text (header first) to events sorted by (occurred_at, event_id), and the rows rejected."""
    reader = csv.reader(lines, delimiter=mapping.delimiter)
    header = [name.strip() for name in next(reader, [])]
    if missing := mapping.columns() - set(header):
        raise ImportFailed(f"the mapping reads column(s) the file does not have: {', '.join(sorted(missing))}")
    result = Conversion(header)
    while True:
        line = reader.line_num + 1  # where the record starts, even if a quoted field spans lines
        values = next(reader, None)
        if values is None:
            break
        if not values:
            continue
        result.rows += 1
        try:
            if len(values) != len(header):
                raise RowRejected(MALFORMED_ROW, f"{len(values)} fields, the header has {len(header)}")
            result.events += convert_row(dict(zip(header, (v.strip() for v in values))), mapping)
        except RowRejected as rejected:
            result.rejects.append(Reject(line, rejected.reason, rejected.detail, values))
    result.events.sort(key=lambda e: (e.occurred_at, e.event_id))
    return result


# --- output --------------------------------------------------------------------------------------


def write_rejects(conversion: Conversion, path: Path) -> None:
    """line, reason, detail and the original row (so it can be fixed and re-imported)."""
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["line", "reason", "detail", *conversion.header])
        writer.writerows([r.line, r.reason, r.detail, *r.row] for r in conversion.rejects)


def publish(events: list[Event], settings: Settings, progress: Progress) -> None:
    task = progress.add_task("publishing", total=len(events))
    try:
        ensure_topics(settings)
        producer = KafkaProducer(
            bootstrap_servers=settings.bootstrap_servers, linger_ms=20, **client_security(settings)
        )
        try:
            futures = [producer.send(settings.input_topic, key=e.key, value=e.value) for e in events]
            for future in futures:
                future.add_both(lambda _: progress.advance(task))
            producer.flush()
        finally:
            producer.close()
    except KafkaError as exc:
        raise ImportFailed(f"publishing to {settings.broker} failed: {exc}") from None
    if failed := [f.exception for f in futures if f.failed()]:
        raise ImportFailed(f"{len(failed)} of {len(events)} events were not published: {failed[0]}")


def import_csv(
    settings: Settings,
    csv_path: Path,
    mapping_path: Path,
    dry_run: Path | None = None,
    rejects_path: Path | None = None,
    console: Console | None = None,
) -> Summary:
    """Convert `csv_path`, then write the events to `dry_run` (JSONL) or publish them to the input topic."""
    console = console or Console()
    if dry_run is None and not settings.broker:
        # An embedded broker would start empty and vanish with the import, taking the events with it.
        raise ImportFailed(
            "CRM_PULSE_BROKER is not set: set it to the broker your worker reads (kafka://host:port) "
            "to publish, or use --dry-run OUT.jsonl to write the events to a file"
        )
    mapping = load_mapping(mapping_path)
    if rejects_path is None:
        rejects_path = dry_run.with_suffix(".rejects.csv") if dry_run else Path(csv_path.stem + ".rejects.csv")
    with open(csv_path, "rb") as f:
        total_lines = sum(1 for _ in f)
    with Progress(console=Console(stderr=True), transient=False) as progress:
        with open(csv_path, newline="", encoding=mapping.encoding) as f:
            try:
                conversion = convert(progress.track(f, total=total_lines, description="reading"), mapping)
            except UnicodeDecodeError as exc:
                raise ImportFailed(f"{csv_path} is not {mapping.encoding} ({exc}); set [csv] encoding") from None
        write_rejects(conversion, rejects_path)
        if dry_run:
            with open(dry_run, "wb") as out:
                for event in progress.track(conversion.events, description="writing"):
                    out.write(event.value + b"\n")
        else:
            publish(conversion.events, settings, progress)
    summary = Summary(
        conversion.rows, Counter(e.type for e in conversion.events), Counter(r.reason for r in conversion.rejects),
        rejects_path,
    )  # fmt: skip
    report(summary, conversion.rejects, dry_run or settings.input_topic, console)
    return summary


def line_ranges(lines: list[int], shown: int = 6) -> str:
    """[2, 3, 4, 9] → "2-4, 9", cut after `shown` ranges."""
    ranges: list[list[int]] = []
    for line in lines:
        if ranges and line == ranges[-1][1] + 1:
            ranges[-1][1] = line
        else:
            ranges.append([line, line])
    text = ", ".join(f"{a}-{b}" if a != b else str(a) for a, b in ranges[:shown])
    return text + (", …" if len(ranges) > shown else "")


def report(summary: Summary, rejects: list[Reject], destination: object, console: Console) -> None:
    table = Table("", "count", title=f"import summary → {destination}")
    table.add_row("rows read", str(summary.rows))
    for kind, n in sorted(summary.events.items()):
        table.add_row(f"events: {kind}", str(n))
    table.add_row("rows rejected", str(len(rejects)))
    console.print(table)
    if rejects:
        by_reason = Table("reason", "rows", "lines", "first detail", title="rejected rows")
        for reason, n in summary.rejects.most_common():
            group = [r for r in rejects if r.reason == reason]
            by_reason.add_row(Text(reason), str(n), line_ranges([r.line for r in group]), Text(group[0].detail))
        console.print(by_reason)
    console.print(f"every rejected row, with its line number and reason: {summary.rejects_path}", markup=False)


def cli_import(settings: Settings, csv_path: Path, mapping_path: Path, dry_run: Path | None, rejects: Path | None):
    """The `crm-pulse import` command: its exit status."""
    try:
        import_csv(settings, csv_path, mapping_path, dry_run, rejects)
    except (ImportFailed, OSError) as exc:
        Console(stderr=True).print(f"crm-pulse import: {exc}", style="red", markup=False)
        return 2
    return 0
