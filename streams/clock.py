"""The "now" of windows and stall checks: the wall clock when live, event time when replaying.

Event time is tracked per input partition, as in Flink and Kafka Streams: events of one entity share a
partition and arrive in order there, while partitions are read at different speeds. An event is late
when it is older than its own partition's latest event by more than the grace period. Windows end at
the latest event time seen; stall checks use the watermark — the slowest partition's latest event time —
so that no lead is declared stalled by a partition that is merely read faster than its own.
"""

from __future__ import annotations

import time
from typing import MutableMapping


class Clock:
    def __init__(self, mode: str, grace_ms: int, marks: MutableMapping[str, int] | None = None):
        self.mode = mode
        self.grace_ms = grace_ms
        # {partition: latest event time}; the worker passes a table so that a restart resumes from it.
        self.marks: MutableMapping[str, int] = {} if marks is None else marks

    def observe(self, partition: int, event_ms: int) -> None:
        if event_ms > self.marks.get(str(partition), event_ms - 1):
            self.marks[str(partition)] = event_ms

    def is_late(self, partition: int, event_ms: int) -> bool:
        high = self.marks.get(str(partition))
        return high is not None and event_ms < high - self.grace_ms

    @property
    def watermark_ms(self) -> int | None:
        return min(self.marks.values(), default=None)

    @property
    def latest_ms(self) -> int | None:
        return max(self.marks.values(), default=None)

    def now_ms(self) -> int | None:
        """Where windows end."""
        return int(time.time() * 1000) if self.mode == "wall" else self.latest_ms

    def stall_now_ms(self) -> int | None:
        """The time stall checks compare idle leads against."""
        return int(time.time() * 1000) if self.mode == "wall" else self.watermark_ms
