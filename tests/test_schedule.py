"""The timing of held alerts: working hours in the rep's time zone across DST changes and past midnight, the
digest time and the release of a group, each against instants worked out by hand."""

from __future__ import annotations

from datetime import datetime, time

import pytest

from crm_pulse.directory import Rep
from crm_pulse.schedule import Timing, in_working_hours, next_day_start, release_time, window_opens


def utc(text: str) -> datetime:
    return datetime.fromisoformat(text.replace("Z", "+00:00"))


NEW_YORK = Rep("ny", timezone="America/New_York", working_hours=(time(9), time(17)))
BERLIN = Rep("be", timezone="Europe/Berlin", working_hours=(time(9), time(17, 30)))
TOKYO = Rep("tk", timezone="Asia/Tokyo", working_hours=(time(8), time(17)))  # 23:00-08:00 UTC
NIGHTS = Rep("ln", timezone="America/Los_Angeles", working_hours=(time(22), time(6)))  # past local midnight
ALL_DAY = Rep("li", timezone="Europe/Lisbon")
EARLY = Rep("ea", timezone="Europe/Berlin", working_hours=(time(2, 30), time(10)))


@pytest.mark.parametrize(
    ("rep", "now", "working", "next_start"),
    [
        # New York springs forward on Sunday 8 March 2026: 09:00 is 14:00 UTC on the Saturday, 13:00 on the Sunday.
        (NEW_YORK, "2026-03-07T23:00:00Z", False, "2026-03-08T13:00:00Z"),
        (NEW_YORK, "2026-03-06T13:30:00Z", False, "2026-03-06T14:00:00Z"),  # 08:30 EST
        (NEW_YORK, "2026-03-09T13:30:00Z", True, "2026-03-10T13:00:00Z"),  # 09:30 EDT
        # Berlin falls back on Sunday 25 October 2026: 09:00 is 07:00 UTC on the Saturday, 08:00 on the Sunday.
        (BERLIN, "2026-10-24T07:00:00Z", True, "2026-10-25T08:00:00Z"),
        (BERLIN, "2026-10-24T15:30:00Z", False, "2026-10-25T08:00:00Z"),  # 17:30 CEST: closed
        (BERLIN, "2026-10-25T16:29:59Z", True, "2026-10-26T08:00:00Z"),  # 17:29:59 CET
        # Tokyo's working day spans midnight UTC.
        (TOKYO, "2026-01-05T23:30:00Z", True, "2026-01-06T23:00:00Z"),
        (TOKYO, "2026-01-06T07:59:59Z", True, "2026-01-06T23:00:00Z"),
        (TOKYO, "2026-01-06T08:00:00Z", False, "2026-01-06T23:00:00Z"),
        (TOKYO, "2026-01-05T22:59:59Z", False, "2026-01-05T23:00:00Z"),
        # A night shift, 22:00-06:00 PST = 06:00-14:00 UTC, whose window began the local day before.
        (NIGHTS, "2026-01-06T13:00:00Z", True, "2026-01-07T06:00:00Z"),
        (NIGHTS, "2026-01-06T14:00:00Z", False, "2026-01-07T06:00:00Z"),
        # No working hours: working all day; the day starts at local midnight (Lisbon is UTC+0 in winter,
        # UTC+1 from 29 March 2026).
        (ALL_DAY, "2026-01-06T10:00:00Z", True, "2026-01-07T00:00:00Z"),
        (ALL_DAY, "2026-03-29T10:00:00Z", True, "2026-03-29T23:00:00Z"),
        # 02:30 does not exist in Berlin on 29 March 2026 (02:00 CET → 03:00 CEST): that day starts at 03:30 CEST.
        (EARLY, "2026-03-28T12:00:00Z", False, "2026-03-29T01:30:00Z"),
        (EARLY, "2026-03-29T12:00:00Z", False, "2026-03-30T00:30:00Z"),
    ],
)
def test_working_hours_and_the_next_working_day_in_the_reps_zone(rep, now, working, next_start):
    assert in_working_hours(rep, utc(now)) is working
    assert next_day_start(rep, utc(now)) == utc(next_start)
    assert window_opens(rep, utc(now)) == (utc(now) if working else utc(next_start))


GROUP = Timing(group_seconds=600)
QUIET_GROUP = Timing(group_seconds=600, quiet_hours=True)
DIGEST = Timing(digest=True)
QUIET = Timing(quiet_hours=True)


@pytest.mark.parametrize(
    ("timing", "first", "now", "expected"),
    [
        # A group goes out ten minutes after its first alert.
        (GROUP, "2026-01-06T10:00:00Z", "2026-01-06T10:00:01Z", "2026-01-06T10:10:00Z"),
        (GROUP, "2026-01-06T20:00:00Z", "2026-01-06T20:00:01Z", "2026-01-06T20:10:00Z"),
        # Berlin's day ends at 17:30 CET (16:30 UTC): a group due at 16:35 UTC waits for 09:00 CET next morning.
        (QUIET_GROUP, "2026-01-06T16:25:00Z", "2026-01-06T16:25:00Z", "2026-01-07T08:00:00Z"),
        (QUIET_GROUP, "2026-01-06T16:15:00Z", "2026-01-06T16:15:00Z", "2026-01-06T16:25:00Z"),
        # A notifier back only at 09:00 UTC sends it at once.
        (QUIET_GROUP, "2026-01-06T16:25:00Z", "2026-01-07T09:00:00Z", "2026-01-07T09:00:00Z"),
        # The digest: the next start of a working day, the same morning for an alert before it.
        (DIGEST, "2026-01-06T10:00:00Z", "2026-01-06T10:00:00Z", "2026-01-07T08:00:00Z"),
        (DIGEST, "2026-01-06T07:00:00Z", "2026-01-06T07:00:00Z", "2026-01-06T08:00:00Z"),
        (DIGEST, "2026-10-24T10:00:00Z", "2026-10-24T10:00:00Z", "2026-10-25T08:00:00Z"),  # across the DST end
        # Quiet hours alone: at once within working hours, else when they begin.
        (QUIET, "2026-01-06T10:00:00Z", "2026-01-06T10:00:02Z", "2026-01-06T10:00:02Z"),
        (QUIET, "2026-01-06T20:00:00Z", "2026-01-06T20:00:02Z", "2026-01-07T08:00:00Z"),
    ],
)
def test_when_a_reps_held_alerts_go_out(timing, first, now, expected):
    assert release_time(BERLIN, utc(first), utc(now), timing) == utc(expected)


def test_only_grouping_digests_or_quiet_hours_hold_alerts():
    assert [Timing().holds, GROUP.holds, DIGEST.holds, QUIET.holds] == [False, True, True, True]
