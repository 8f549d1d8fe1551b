"""When `crm-pulse alerts notify` posts a rep's alerts (docs/alerts.md#grouping-digests-and-quiet-hours): pure
functions of the rep's directory entry (time zone, working hours) and an instant, in UTC.

Working hours are local wall-clock times, so their UTC instants move with daylight saving time; hours whose end
is not after their start (22:00-06:00) run past local midnight. A rep without working hours works all day."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, time, timedelta, timezone
from zoneinfo import ZoneInfo

from crm_pulse.directory import Rep


@dataclass(frozen=True)
class Timing:
    group_seconds: float = 0  # a rep's alerts within this long of the first go in one message
    digest: bool = False  # hold a rep's alerts for one message at the start of their next working day
    quiet_hours: bool = False  # hold alerts that arrive outside working hours until those begin

    @property
    def holds(self) -> bool:
        return self.group_seconds > 0 or self.digest or self.quiet_hours


def windows(rep: Rep, around: datetime) -> list[tuple[datetime, datetime]]:
    """The rep's working windows [opens, closes) in UTC that begin on the local days from the one before
    `around` to two after it: enough to hold `around` and the next start after it."""
    zone = ZoneInfo(rep.timezone)
    start, end = rep.working_hours or (time(0), time(0))
    today = around.astimezone(zone).date()
    result = []
    for offset in range(-1, 3):
        day = today + timedelta(days=offset)
        # Combined in the rep's zone and only then converted: arithmetic on zoned datetimes is wall-clock.
        opens = datetime.combine(day, start, zone).astimezone(timezone.utc)
        closes = datetime.combine(day + timedelta(days=end <= start), end, zone).astimezone(timezone.utc)
        result.append((opens, closes))
    return result


def in_working_hours(rep: Rep, now: datetime) -> bool:
    return any(opens <= now < closes for opens, closes in windows(rep, now))


def next_day_start(rep: Rep, now: datetime) -> datetime:
    """The first start of the rep's working day after `now`: when their digest goes out."""
    return min(opens for opens, _ in windows(rep, now) if opens > now)


def window_opens(rep: Rep, now: datetime) -> datetime:
    """`now` within working hours, else when they next begin."""
    return now if in_working_hours(rep, now) else next_day_start(rep, now)


def release_time(rep: Rep, first_published: datetime, now: datetime, timing: Timing) -> datetime:
    """When the rep's held alerts, the first of them published at `first_published`, go out in one message:
    at the end of the grouping interval, or at the digest, and under quiet hours not before working hours
    begin. A time not after `now` means at once."""
    at = next_day_start(rep, first_published) if timing.digest else first_published + timedelta(seconds=timing.group_seconds)
    return window_opens(rep, max(at, now)) if timing.quiet_hours else at
