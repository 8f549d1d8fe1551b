"""The rep directory of `crm-pulse alerts notify` (docs/alerts.md#the-rep-directory): who a rep is and where
to reach them, from a TOML or CSV file that is read again when it changes, and `import_user_export`, which
turns a CRM's user export into such a CSV file."""

from __future__ import annotations

import csv
import logging
import re
import tomllib
from dataclasses import dataclass
from datetime import time
from pathlib import Path
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

log = logging.getLogger(__name__)

# The columns of a CSV directory, and the keys of a rep's table in a TOML one.
COLUMNS = ("id", "name", "email", "slack", "timezone", "working_hours", "manager", "team", "team_channel")
WORKING_HOURS = re.compile(r"(\d\d):(\d\d)-(\d\d):(\d\d)")


class DirectoryInvalid(ValueError):
    """A directory file that cannot be used: one line naming the file, the rep and what to fix."""


@dataclass(frozen=True)
class Rep:
    id: str
    name: str | None = None
    email: str | None = None
    slack: str | None = None  # a Slack user id (U…), or a channel id (C…) or #name
    timezone: str = "UTC"
    working_hours: tuple[time, time] | None = None
    manager: str | None = None  # the manager's rep id: escalations also go to them
    team: str | None = None  # the team id alerts carry as team_id
    team_channel: str | None = None  # where the team's unassigned leads are announced (Slack)

    @property
    def display_name(self) -> str:
        return self.name or self.id


@dataclass(frozen=True)
class Directory:
    reps: dict[str, Rep]
    team_channels: dict[str, str]  # team id → Slack channel, from the reps' team and team_channel


def _rep(entry: dict, where: str) -> Rep:
    unknown = sorted(set(entry) - set(COLUMNS))
    if unknown:
        raise DirectoryInvalid(f"{where}: unknown key {unknown[0]!r}; the keys are {', '.join(COLUMNS)}")
    values = {key: value.strip() if isinstance(value, str) else value for key, value in entry.items()}
    values = {key: value for key, value in values.items() if value not in ("", None)}
    if not all(isinstance(value, str) for value in values.values()):
        raise DirectoryInvalid(f"{where}: every value must be a string")
    if "email" in values and "@" not in values["email"]:
        raise DirectoryInvalid(f"{where}: email {values['email']!r} is not an e-mail address")
    try:
        ZoneInfo(values.get("timezone", "UTC"))
    except (ZoneInfoNotFoundError, ValueError):
        raise DirectoryInvalid(
            f"{where}: timezone {values['timezone']!r} is not an IANA time zone such as Europe/Berlin"
        ) from None
    if "working_hours" in values:
        hours = WORKING_HOURS.fullmatch(values["working_hours"])
        try:
            start, end = time(int(hours[1]), int(hours[2])), time(int(hours[3]), int(hours[4]))
        except (TypeError, ValueError):
            raise DirectoryInvalid(
                f"{where}: working_hours {values['working_hours']!r} is not like 09:00-17:30"
            ) from None
        values["working_hours"] = (start, end)
    return Rep(**values)


def parse_directory(path: Path) -> Directory:
    """The directory in `path` (.toml: a table per rep under [reps]; .csv: the COLUMNS), or DirectoryInvalid."""
    try:
        if path.suffix == ".toml":
            tables = tomllib.loads(path.read_text(encoding="utf-8")).get("reps", {})
            entries = [({"id": rep_id, **table}, f"{path}: [reps.{rep_id}]") for rep_id, table in tables.items()]
        elif path.suffix == ".csv":
            with path.open(newline="", encoding="utf-8-sig") as file:
                reader = csv.DictReader(file)
                if "id" not in (reader.fieldnames or ()):
                    raise DirectoryInvalid(f"{path}: no id column; the columns are {', '.join(COLUMNS)}")
                entries = [(row, f"{path}:{reader.line_num}") for row in reader]
        else:
            raise DirectoryInvalid(f"{path}: a rep directory is a .toml or .csv file")
    except OSError as exc:
        raise DirectoryInvalid(f"{path}: cannot be read ({exc.strerror})") from exc
    except (tomllib.TOMLDecodeError, UnicodeDecodeError, csv.Error) as exc:
        raise DirectoryInvalid(f"{path}: {exc}") from exc
    reps: dict[str, Rep] = {}
    for entry, where in entries:
        rep = _rep(entry, where)
        if rep.id in reps:
            raise DirectoryInvalid(f"{where}: rep {rep.id} is listed twice")
        reps[rep.id] = rep
    team_channels: dict[str, str] = {}
    for rep in reps.values():
        if rep.manager and rep.manager not in reps:
            raise DirectoryInvalid(f"{path}: rep {rep.id}: manager {rep.manager} is not in the directory; add them")
        if rep.team and rep.team_channel:
            if team_channels.setdefault(rep.team, rep.team_channel) != rep.team_channel:
                raise DirectoryInvalid(
                    f"{path}: rep {rep.id}: team {rep.team} has two team channels, "
                    f"{team_channels[rep.team]} and {rep.team_channel}; give the team one"
                )
    return Directory(reps, team_channels)


class DirectoryFile:
    """The directory in a file, read again when the file changes. A change that makes it invalid is logged and
    the last good directory kept, so an editing mistake never stops notifications."""

    def __init__(self, path: Path):
        self.path = path
        self._stamp = self._stat()
        self.directory = parse_directory(path)

    def _stat(self) -> tuple[int, int] | None:
        try:
            stat = self.path.stat()
        except OSError:
            return None
        return stat.st_mtime_ns, stat.st_size

    def current(self) -> Directory:
        stamp = self._stat()
        if stamp != self._stamp:
            self._stamp = stamp
            try:
                self.directory = parse_directory(self.path)
                log.info("reloaded the rep directory %s: %d reps", self.path, len(self.directory.reps))
            except DirectoryInvalid as exc:
                log.error("keeping the previous rep directory: %s", exc)
        return self.directory


# Column names in CRM user exports (Salesforce, HubSpot, Pipedrive, …), compared lower-case without spaces,
# dashes or underscores.
EXPORT_COLUMNS = {
    "id": ("id", "userid", "ownerid", "repid"),
    "name": ("name", "fullname", "username"),
    "email": ("email", "emailaddress"),
    "slack": ("slack", "slackid", "slackuser", "slackuserid"),
    "timezone": ("timezone", "timezonesidkey", "tz"),
    "working_hours": ("workinghours",),
    "manager": ("manager", "managerid"),
    "team": ("team", "teamid", "primaryteam"),
    "team_channel": ("teamchannel", "slackchannel"),
}


def _normalised(column: str) -> str:
    return re.sub(r"[\s_\-]", "", column.lower())


def import_user_export(export: Path, out: Path) -> int:
    """Write the directory CSV `out` from a CRM user export; the number of reps. Columns are matched by their
    usual names (EXPORT_COLUMNS); a name may also come from first and last name columns. The result is checked
    as a directory, so a bad time zone or an unknown manager is reported now, not when the notifier reads it."""
    try:
        with export.open(newline="", encoding="utf-8-sig") as file:
            reader = csv.DictReader(file)
            by_name = {_normalised(column): column for column in reader.fieldnames or ()}
            source = {
                field: next((by_name[alias] for alias in aliases if alias in by_name), None)
                for field, aliases in EXPORT_COLUMNS.items()
            }
            if source["id"] is None:
                raise DirectoryInvalid(
                    f"{export}: no user id column (one of {', '.join(EXPORT_COLUMNS['id'])}); rename it to id"
                )
            first, last = by_name.get("firstname"), by_name.get("lastname")
            rows = []
            for row in reader:
                rep = {field: (row[column] or "").strip() if column else "" for field, column in source.items()}
                if not rep["name"] and (first or last):
                    rep["name"] = " ".join(filter(None, ((row[c] or "").strip() for c in (first, last) if c)))
                rows.append(rep)
    except OSError as exc:
        raise DirectoryInvalid(f"{export}: cannot be read ({exc.strerror})") from exc
    with out.open("w", newline="", encoding="utf-8") as file:
        writer = csv.DictWriter(file, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    return len(parse_directory(out).reps)
