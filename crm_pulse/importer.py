"""`crm-pulse import`: CSV exports → contract events, through declarative TOML mappings (docs/importer.md).

Every row becomes all of its events or none: a row that cannot be mapped is rejected with its line
number and reason, never dropped silently. Events are validated against the contract and published in
(occurred_at, event_id) order across all the files of an import (an external merge sort, in bounded
memory), so no partition ever sees an event of the import older than one before it.
"""

from __future__ import annotations

import bisect
import contextlib
import csv
import hashlib
import heapq
import itertools
import re
import tempfile
import time
import tomllib
import urllib.request
from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Iterable, Iterator, NamedTuple
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import orjson
from kafka import KafkaConsumer, KafkaProducer, TopicPartition
from kafka.errors import KafkaError
from rich.console import Console
from rich.progress import Progress
from rich.table import Table
from rich.text import Text

from crm_pulse.broker import client_security, connect_admin, ensure_topics, key_partition
from crm_pulse.config import Settings
from crm_pulse.schemas.events import EVENT_TYPES, ms_to_iso
from crm_pulse.schemas.validate import InvalidEvent, parse_event

EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)
# "date" cells are read with the mapping's [dates] formats and zone when the event is built (`build_event`).
PARSERS = {"str": str, "int": int, "float": float, "date": str}
PLACEHOLDER = re.compile(r"\{([^{}]+)\}")

# Reasons a row is rejected (a [[reject]] rule adds its own).
MALFORMED_ROW = "malformed row"
NO_RULE = "no matching rule"
MISSING_DATE = "missing date"
BAD_DATE = "unparseable date"
BAD_VALUE = "unparseable value"
MISSING_ID = "missing id"
INVALID_EVENT = "invalid event"

# Events per sorted run of the external sort: under a kilobyte each in memory, so some 150 MB at most.
RUN_EVENTS = 200_000
# Fewer dates say too little about a file's range to flag any of them.
PLAUSIBLE_MIN_DATES = 30


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
    """One event as the import sorts it: by (occurred_at, event_id), as tuples compare."""

    occurred_at: int
    event_id: str
    type: str
    key: str
    value: str


class Reject(NamedTuple):
    line: int
    reason: str
    detail: str
    row: list[str]


class LineRanges:
    """Line numbers as ranges ("2-4, 9"), of which the first `shown` are kept: a file may reject millions."""

    def __init__(self, shown: int = 6):
        self.shown, self.ranges, self.more = shown, [], False

    def add(self, line: int) -> None:
        if self.ranges and line == self.ranges[-1][1] + 1:
            self.ranges[-1][1] = line
        elif len(self.ranges) < self.shown:
            self.ranges.append([line, line])
        else:
            self.more = True

    def __str__(self) -> str:
        text = ", ".join(f"{a}-{b}" if a != b else str(a) for a, b in self.ranges)
        return text + (", …" if self.more else "")


class DateCheck:
    """Dates that parse but cannot all be right: a few far from the rest of the file (a day, month or year read
    from the wrong place), or every date read with a format having a day of month of 12 or less (day-first dates
    read month-first, or the other way round). Kept as counts per month and format: bounded memory."""

    def __init__(self):
        self.months: Counter = Counter()  # year × 12 + month − 1 → dates
        self.month_lines: dict[int, LineRanges] = {}
        self.days: dict[str, Counter] = {}  # format with %d and %m → Counter(day of month)

    def observe(self, when: datetime, fmt: str, line: int) -> None:
        month = when.year * 12 + when.month - 1
        self.months[month] += 1
        self.month_lines.setdefault(month, LineRanges(3)).add(line)
        if "%d" in fmt and "%m" in fmt:
            self.days.setdefault(fmt, Counter())[when.day] += 1

    def warnings(self) -> list[str]:
        found = []
        total = sum(self.months.values())
        if total >= PLAUSIBLE_MIN_DATES:
            ordered = sorted(self.months)
            cumulative = list(itertools.accumulate(self.months[m] for m in ordered))
            q1, q3 = (ordered[bisect.bisect_left(cumulative, q * total)] for q in (0.25, 0.75))
            # Tukey's "far out" fences, and a year either side whatever the spread.
            low, high = q1 - 3 * (q3 - q1) - 12, q3 + 3 * (q3 - q1) + 12
            far = [month for month in ordered if not low <= month <= high]
            if far:
                lines = "; ".join(f"{_month(m)}: lines {self.month_lines[m]}" for m in far[:4])
                found.append(
                    f"{sum(self.months[m] for m in far)} dates lie far from the file's others (half of them fall in "
                    f"{_month(q1)} … {_month(q3)}): {lines}{'; …' if len(far) > 4 else ''}; is a date format reading "
                    f"the day, month or year from the wrong place?"
                )
        for fmt, days in self.days.items():
            if sum(days.values()) >= PLAUSIBLE_MIN_DATES and max(days) <= 12 and len(days) > 1:
                found.append(
                    f"all {sum(days.values())} dates read with {fmt!r} have a day of month of 12 or less: are they "
                    f"day-first dates read month-first (or the other way round)?"
                )
        return found


def _month(index: int) -> str:
    return f"{index // 12}-{index % 12 + 1:02d}"


@dataclass
class FileReport:
    """What one file gave: rows, events by type, rejected rows by reason (with lines and the first detail)."""

    path: Path
    rejects_path: Path
    header: list[str] = field(default_factory=list)
    rows: int = 0
    events: Counter = field(default_factory=Counter)
    rejects: Counter = field(default_factory=Counter)
    reject_lines: dict[str, LineRanges] = field(default_factory=dict)
    reject_details: dict[str, str] = field(default_factory=dict)
    dates: DateCheck = field(default_factory=DateCheck)

    def reject(self, rejected: Reject) -> None:
        self.rejects[rejected.reason] += 1
        self.reject_lines.setdefault(rejected.reason, LineRanges()).add(rejected.line)
        self.reject_details.setdefault(rejected.reason, rejected.detail)


@dataclass
class Summary:
    files: list[FileReport]
    events: int  # written or published
    late: int  # of them, older than the worker's watermark of their partition (published with --allow-late)


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


def parse_date(value: str, formats: list[str], tz: ZoneInfo) -> tuple[int, datetime, str]:
    """(epoch ms, the time, the format) of the first format that parses `value`; times without an offset are
    in `tz`."""
    for fmt in formats:
        try:
            parsed = datetime.strptime(value, fmt)
        except ValueError:
            continue
        if parsed.tzinfo is None:
            parsed = parsed.replace(tzinfo=tz)
        return (parsed - EPOCH) // timedelta(milliseconds=1), parsed, fmt
    raise ValueError(value)


def build_event(rule: Rule, row: dict[str, str], mapping: Mapping) -> tuple[dict, datetime, str]:
    """The event's document, and its time and the date format that read it (for `DateCheck`)."""
    raw_time = row[rule.occurred_at]
    if raw_time == "":
        raise RowRejected(MISSING_DATE, f"{rule.occurred_at} is empty; {rule.name} needs it as its event time")
    try:
        ms, when, fmt = parse_date(raw_time, mapping.date_formats, mapping.timezone)
    except ValueError:
        raise RowRejected(BAD_DATE, f"{rule.occurred_at} {raw_time[:64]!r} matches none of "
                          f"{', '.join(mapping.date_formats)}") from None  # fmt: skip
    for column in PLACEHOLDER.findall(rule.event_id):
        if row[column] == "":
            raise RowRejected(MISSING_ID, f"{column} is empty; event_id {rule.event_id!r} needs it")
    event_id = PLACEHOLDER.sub(lambda m: row[m.group(1)], rule.event_id)
    envelope = {name: source.value(row) for name, source in rule.envelope.items()}
    payload = {name: source.value(row) for name, source in rule.payload.items()}
    for name, source in rule.payload.items():
        if source.type == "date" and payload[name] is not None:
            try:
                payload[name] = ms_to_iso(parse_date(payload[name], mapping.date_formats, mapping.timezone)[0])
            except ValueError:
                raise RowRejected(BAD_DATE, f"{source.column} {payload[name][:64]!r} matches none of "
                                  f"{', '.join(mapping.date_formats)}") from None  # fmt: skip
    doc = {"schema_version": 1, "event_id": event_id, "type": rule.type, "occurred_at": ms_to_iso(ms)}
    doc |= {k: v for k, v in envelope.items() if v is not None}
    doc["payload"] = {k: v for k, v in payload.items() if v is not None}
    return doc, when, fmt


def convert_row(row: dict[str, str], mapping: Mapping) -> list[tuple[Event, datetime, str]]:
    for reject in mapping.rejects:
        if matches(reject.when, row):
            raise RowRejected(reject.reason, ", ".join(f"{c}={row[c]!r}" for c in reject.when))
    rules = [rule for rule in mapping.rules if matches(rule.when, row)]
    if not rules:
        tested = dict.fromkeys(c for rule in mapping.rules for c in rule.when)
        raise RowRejected(NO_RULE, ", ".join(f"{c}={row[c]!r}" for c in tested) or "no rules")
    events = []
    for rule in rules:
        doc, when, fmt = build_event(rule, row, mapping)
        raw = orjson.dumps(doc)
        try:
            event = parse_event(raw)
        except InvalidEvent as error:
            raise RowRejected(INVALID_EVENT, f"{rule.name}: {error}") from None
        events.append((Event(event.occurred_at, event.event_id, event.type, event.key, raw.decode()), when, fmt))
    return events


def convert(lines: Iterable[str], mapping: Mapping, report: FileReport) -> Iterator[Event | Reject]:
    """Map CSV text (header first) to its events and rejected rows, in file order, counting them in `report`."""
    reader = csv.reader(lines, delimiter=mapping.delimiter)
    report.header = [name.strip() for name in next(reader, [])]
    if missing := mapping.columns() - set(report.header):
        raise ImportFailed(f"{report.path}: the mapping reads column(s) the file does not have: "
                           f"{', '.join(sorted(missing))}")  # fmt: skip
    while True:
        line = reader.line_num + 1  # where the record starts, even if a quoted field spans lines
        values = next(reader, None)
        if values is None:
            break
        if not values:
            continue
        report.rows += 1
        try:
            if len(values) != len(report.header):
                raise RowRejected(MALFORMED_ROW, f"{len(values)} fields, the header has {len(report.header)}")
            events = convert_row(dict(zip(report.header, (v.strip() for v in values))), mapping)
        except RowRejected as rejected:
            report.reject(reject := Reject(line, rejected.reason, rejected.detail, values))
            yield reject
            continue
        for event, when, fmt in events:
            report.events[event.type] += 1
            report.dates.observe(when, fmt, line)
            yield event


class Runs:
    """Events in (occurred_at, event_id) order in bounded memory: sorted runs of at most `run_events` events are
    spilled to JSON-lines files in `directory`, and `merged()` merges them all with heapq.merge."""

    def __init__(self, directory: Path, run_events: int = RUN_EVENTS):
        self.directory, self.run_events = directory, run_events
        self.buffer: list[Event] = []
        self.paths: list[Path] = []
        self.count = 0

    def add(self, event: Event) -> None:
        self.buffer.append(event)
        self.count += 1
        if len(self.buffer) >= self.run_events:
            self.spill()

    def spill(self) -> None:
        if not self.buffer:
            return
        self.buffer.sort()
        path = self.directory / f"run-{len(self.paths):05d}.jsonl"
        with open(path, "wb") as f:
            f.writelines(orjson.dumps(tuple(event), option=orjson.OPT_APPEND_NEWLINE) for event in self.buffer)
        self.paths.append(path)
        self.buffer.clear()

    def merged(self) -> Iterator[Event]:
        self.spill()
        with contextlib.ExitStack() as files:
            runs = [map(_event_of_line, files.enter_context(open(path, "rb"))) for path in self.paths]
            yield from heapq.merge(*runs)


def _event_of_line(line: bytes) -> Event:
    return Event(*orjson.loads(line))


# --- the worker's view: watermarks, partitions, what it has applied --------------------------------


class LateCheck:
    """Which events the worker will dead-letter as late: those older than the latest event time of their input
    partition (the worker's event-time table) by more than the grace period (streams/clock.py). The import's own
    events are never late to each other: they are published in time order."""

    def __init__(self, latest: dict[int, int], partitions: int, grace_ms: int):
        self.latest, self.partitions, self.grace_ms = latest, partitions, grace_ms
        self.late: Counter = Counter()  # partition → events

    def check(self, event: Event) -> None:
        partition = key_partition(event.key, self.partitions)
        if partition in self.latest and event.occurred_at < self.latest[partition] - self.grace_ms:
            self.late[partition] += 1

    def refusal(self, total: int) -> str:
        partitions = ", ".join(f"{p} (latest event {ms_to_iso(self.latest[p])})" for p in sorted(self.late))
        return (
            f"{sum(self.late.values())} of {total} events are older than the latest event of their input partition "
            f"less the grace period, so the worker would dead-letter them as late (partitions {partitions}); "
            f"import into a fresh CRM_PULSE_APP_ID and input topic, or publish anyway with --allow-late"
        )


def _consumer(settings: Settings, group_id: str | None = None) -> KafkaConsumer:
    """A consumer that never subscribes, so it joins no group (`group_id` only names the group whose committed
    offsets it asks for), reads only what it assigns itself and commits nothing."""
    return KafkaConsumer(bootstrap_servers=settings.bootstrap_servers, group_id=group_id, enable_auto_commit=False,
                         **client_security(settings))  # fmt: skip


def latest_event_times(consumer: KafkaConsumer, settings: Settings) -> dict[int, int]:
    """{input partition: its latest event time} from the worker's event-time changelog (compacted: the last value
    of a key wins); none if no worker of this app id has run."""
    topic = f"{settings.app_id}-event-time-changelog"
    partitions = [TopicPartition(topic, p) for p in sorted(consumer.partitions_for_topic(topic) or ())]
    if not partitions:
        return {}
    consumer.assign(partitions)
    consumer.seek_to_beginning()
    end = consumer.end_offsets(partitions)
    latest: dict[int, int] = {}
    while any(consumer.position(tp) < end[tp] for tp in partitions):
        for record in itertools.chain.from_iterable(consumer.poll(timeout_ms=500).values()):
            key = orjson.loads(record.key) if record.key else None
            if isinstance(key, str) and key.isdigit():  # not a seal (crm_pulse.broker.seal_changelogs)
                if record.value is None:
                    latest.pop(int(key), None)
                else:
                    latest[int(key)] = orjson.loads(record.value)
    return latest


def publish(events: Iterator[Event], total: int, settings: Settings, progress: Progress) -> dict[TopicPartition, int]:
    """Send `events` in order; the end offset of each partition written (one past the last event sent there),
    from the broker's acknowledgements: Tansu may report less (`crm_pulse.broker.seal_changelogs`)."""
    task = progress.add_task("publishing", total=total)
    ends: dict[TopicPartition, int] = {}
    failures: list[Exception] = []

    def sent(metadata) -> None:
        tp = TopicPartition(metadata.topic, metadata.partition)
        ends[tp] = max(ends.get(tp, 0), metadata.offset + 1)
        progress.advance(task)

    try:
        producer = KafkaProducer(bootstrap_servers=settings.bootstrap_servers, linger_ms=20,
                                 **client_security(settings))  # fmt: skip
        try:
            for event in events:
                future = producer.send(settings.input_topic, key=event.key.encode(), value=event.value.encode())
                future.add_callback(sent).add_errback(failures.append)
            producer.flush()
        finally:
            producer.close()
    except KafkaError as exc:
        raise ImportFailed(f"publishing to {settings.broker} failed: {exc}") from None
    if failures:
        raise ImportFailed(f"{len(failures)} of {total} events were not published: {failures[0]}")
    return ends


class NotApplied(ImportFailed):
    """The events were published, but the worker did not apply them all within the --wait timeout."""


def wait_applied(settings: Settings, ends: dict[TopicPartition, int], timeout: float, progress: Progress) -> None:
    """Return once the app's consumer group has committed the input topic up to `ends`, then each internal topic
    up to the end it had then, twice: an event's effects go from the input through its family's topic to the
    aggregates' delta topics. Committed offsets are asked for without joining the group: that would take
    partitions from the worker."""
    deadline = time.monotonic() + timeout
    admin, consumer = connect_admin(settings), _consumer(settings, group_id=settings.app_id)
    try:
        internal = [TopicPartition(topic, p) for topic in sorted(admin.list_topics())
                    if topic.startswith(f"{settings.app_id}-") and not topic.endswith("-changelog")
                    for p in sorted(consumer.partitions_for_topic(topic) or ())]  # fmt: skip
        task = progress.add_task("waiting for the worker", total=sum(ends.values()))

        def until_committed(targets: dict[TopicPartition, int]) -> None:
            while True:
                done = {tp: consumer.committed(tp) or 0 for tp in targets}
                progress.update(task, completed=sum(min(done.get(tp, 0), end) for tp, end in ends.items()))
                if all(done[tp] >= end for tp, end in targets.items()):
                    return
                if time.monotonic() > deadline:
                    behind = sum(end - done[tp] for tp, end in targets.items() if done[tp] < end)
                    raise NotApplied(
                        f"published, but after {timeout:.0f} s the worker (group {settings.app_id}) has yet to apply "
                        f"{behind} message(s) on {', '.join(sorted({tp.topic for tp in targets}))}: is it running? "
                        f"Wait longer with --wait-timeout"
                    )
                time.sleep(0.5)

        until_committed(ends)
        for _ in range(2):
            until_committed(consumer.end_offsets(internal))
    finally:
        admin.close()
        consumer.close()


HEADLINE_KPIS = (("crm_deals_won", "deals won", "{:,.0f}"), ("crm_win_rate_ratio", "win rate", "{:.1%}"),
                 ("crm_won_revenue", "won revenue", "{:,.2f}"))  # fmt: skip


def headline_kpis(settings: Settings, console: Console) -> None:
    """The worker's all-time headline KPIs, from its /kpis endpoint."""
    url = f"http://{settings.metrics_host}:{settings.metrics_port}/kpis"
    try:
        with urllib.request.urlopen(url, timeout=10) as response:
            kpis = orjson.loads(response.read())["kpis"]
    except (OSError, ValueError, KeyError) as exc:
        console.print(f"the worker applied the import; its KPIs could not be read from {url}: {exc}", markup=False)
        return
    table = Table("KPI (window all)", "value", title=f"headline KPIs ← {url}")
    for metric, label, fmt in HEADLINE_KPIS:
        values = [s["value"] for s in kpis.get(metric, []) if s["labels"] == {"window": "all"}]
        table.add_row(f"{label} ({metric})", fmt.format(values[0]) if values else "– (not on this worker)")
    console.print(table)


# --- the import ------------------------------------------------------------------------------------


def rejects_paths(files: list[tuple[Path, Path]], dry_run: Path | None, rejects: Path | None) -> list[Path]:
    """Where each file's rejected rows go: --rejects (one file only), OUT.rejects.csv beside a one-file dry run,
    else FILE.rejects.csv in the current directory."""
    if rejects is not None and len(files) > 1:
        raise ImportFailed("--rejects names one file's rejects: with several files, each goes to FILE.rejects.csv")
    if rejects is not None:
        return [rejects]
    if dry_run is not None and len(files) == 1:
        return [dry_run.with_suffix(".rejects.csv")]
    paths = [Path(f"{csv_path.stem}.rejects.csv") for csv_path, _ in files]
    if len(set(paths)) < len(paths):
        raise ImportFailed(f"two files would write their rejects to the same {', '.join(sorted(map(str, paths)))}: "
                           f"rename one")  # fmt: skip
    return paths


def read_file(csv_path: Path, mapping: Mapping, report: FileReport, runs: Runs, late: LateCheck | None,
              progress: Progress) -> None:  # fmt: skip
    """Convert one file: its events into `runs` (and the late check), its rejected rows into its rejects CSV."""
    with open(csv_path, "rb") as f:
        total_lines = sum(1 for _ in f)
    try:
        with open(csv_path, newline="", encoding=mapping.encoding) as f, \
                open(report.rejects_path, "w", newline="", encoding="utf-8") as out:  # fmt: skip
            rejects = csv.writer(out)
            items = convert(progress.track(f, total=total_lines, description=f"reading {csv_path.name}"), mapping,
                            report)  # fmt: skip
            first = next(items, None)  # the header is read by then
            rejects.writerow(["line", "reason", "detail", *report.header])
            for item in itertools.chain([first] if first else [], items):
                if isinstance(item, Reject):
                    rejects.writerow([item.line, item.reason, item.detail, *item.row])
                    continue
                runs.add(item)
                if late is not None:
                    late.check(item)
    except UnicodeDecodeError as exc:
        raise ImportFailed(f"{csv_path} is not {mapping.encoding} ({exc}); set [csv] encoding") from None
    if report.rows and not report.events:
        (reason, n), = report.rejects.most_common(1)
        raise ImportFailed(f"{csv_path}: every one of its {report.rows} rows was rejected, {n} of them for: {reason}; "
                           f"its mapping does not fit it: see {report.rejects_path}")  # fmt: skip


def import_files(
    settings: Settings,
    files: list[tuple[Path, Path]],
    dry_run: Path | None = None,
    rejects: Path | None = None,
    allow_late: bool = False,
    wait: float | None = None,
    console: Console | None = None,
    run_events: int = RUN_EVENTS,
) -> Summary:
    """Convert each (CSV, mapping) of `files`, then write their events merged in (occurred_at, event_id) order to
    `dry_run` (JSONL) or publish them to the input topic; with `wait` (seconds), wait until the worker has applied
    them and show its headline KPIs."""
    console = console or Console()
    if dry_run is None and not settings.broker:
        # An embedded broker would start empty and vanish with the import, taking the events with it.
        raise ImportFailed(
            "CRM_PULSE_BROKER is not set: set it to the broker your worker reads (kafka://host:port) "
            "to publish, or use --dry-run OUT.jsonl to write the events to a file"
        )
    mappings = [load_mapping(mapping_path) for _, mapping_path in files]  # every mistake before any reading
    reports = [FileReport(csv_path, path) for (csv_path, _), path in zip(files, rejects_paths(files, dry_run, rejects))]
    late = None
    if dry_run is None:
        ensure_topics(settings)
        consumer = _consumer(settings)
        try:
            partitions = len(consumer.partitions_for_topic(settings.input_topic))
            late = LateCheck(latest_event_times(consumer, settings), partitions, int(settings.grace_seconds * 1000))
        finally:
            consumer.close()
    with tempfile.TemporaryDirectory(prefix="crm-pulse-import-") as spill, \
            Progress(console=Console(stderr=True), transient=False) as progress:  # fmt: skip
        runs = Runs(Path(spill), run_events)
        for (csv_path, _), mapping, report in zip(files, mappings, reports):
            read_file(csv_path, mapping, report, runs, late, progress)
        if late is not None and late.late and not allow_late:
            raise ImportFailed(late.refusal(runs.count))
        if dry_run is not None:
            with open(dry_run, "wb") as out:
                for event in progress.track(runs.merged(), total=runs.count, description="writing"):
                    out.write(event.value.encode() + b"\n")
        else:
            ends = publish(runs.merged(), runs.count, settings, progress)
    summary = Summary(reports, runs.count, sum(late.late.values()) if late else 0)
    print_summary(summary, dry_run, settings.input_topic, console)
    if wait is not None and dry_run is None:
        with Progress(console=Console(stderr=True), transient=True) as progress:
            wait_applied(settings, ends, wait, progress)
        headline_kpis(settings, console)
    return summary


def print_summary(summary: Summary, dry_run: Path | None, topic: str, console: Console) -> None:
    table = Table("", "count", title=f"import summary → {dry_run or topic}")
    for file in summary.files:
        table.add_row(f"{file.path.name}: rows read", f"{file.rows:,}")
        for kind, n in sorted(file.events.items()):
            table.add_row(f"{file.path.name}: events {kind}", f"{n:,}")
        table.add_row(f"{file.path.name}: rows rejected", f"{file.rejects.total():,}")
    table.add_row("events written" if dry_run else "events published", f"{summary.events:,}")
    if summary.late:
        table.add_row("of them late: the worker dead-letters them", f"{summary.late:,}")
    console.print(table)
    for file in summary.files:
        if file.rejects:
            by_reason = Table("reason", "rows", "lines", "first detail", title=f"rejected rows of {file.path.name}")
            for reason, n in file.rejects.most_common():
                by_reason.add_row(Text(reason), f"{n:,}", str(file.reject_lines[reason]),
                                  Text(file.reject_details[reason]))  # fmt: skip
            console.print(by_reason)
        console.print(f"{file.path.name}: every rejected row, with its line number and reason: {file.rejects_path}",
                      markup=False)  # fmt: skip
        for warning in file.dates.warnings():
            console.print(f"{file.path.name}: check the dates: {warning}", style="yellow", markup=False)


def cli_import(settings: Settings, files: list[Path], mappings: list[Path], dry_run: Path | None,
               rejects: Path | None, allow_late: bool, wait: float | None) -> int:  # fmt: skip
    """The `crm-pulse import` command: its exit status."""
    try:
        if len(mappings) not in (1, len(files)):
            raise ImportFailed(f"{len(files)} files and {len(mappings)} mappings: give one --mapping for every "
                               f"file, in the same order, or one for them all")  # fmt: skip
        paired = list(zip(files, mappings if len(mappings) == len(files) else mappings * len(files)))
        import_files(settings, paired, dry_run, rejects, allow_late, wait)
    except (ImportFailed, OSError) as exc:
        Console(stderr=True, soft_wrap=True).print(f"crm-pulse import: {exc}", style="red", markup=False)
        return 1 if isinstance(exc, NotApplied) else 2
    return 0
