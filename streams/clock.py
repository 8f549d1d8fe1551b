"""The "now" of windows and stall checks: the wall clock when live, the event-time watermark when replaying.

Event time is tracked per input partition, as in Flink and Kafka Streams: events of one entity share a
partition and arrive in order there, while partitions are read at different speeds. An event is late
when it is older than its own partition's latest event by more than the grace period; the watermark is
the slowest partition's latest event time, so no partition's events are judged by a faster one.
"""

from __future__ import annotations

import time
from typing import Hashable


class Clock:
    def __init__(self, mode: str, grace_ms: int):
        self.mode = mode
        self.grace_ms = grace_ms
        self.partition_high_ms: dict[Hashable, int] = {}

    def observe(self, partition: Hashable, event_ms: int) -> None:
        if event_ms > self.partition_high_ms.get(partition, event_ms - 1):
            self.partition_high_ms[partition] = event_ms

    def is_late(self, partition: Hashable, event_ms: int) -> bool:
        high = self.partition_high_ms.get(partition)
        return high is not None and event_ms < high - self.grace_ms

    def forget(self, partitions) -> None:
        """Partitions this worker no longer reads must not hold the watermark back."""
        for partition in partitions:
            self.partition_high_ms.pop(partition, None)

    @property
    def watermark_ms(self) -> int | None:
        return min(self.partition_high_ms.values(), default=None)

    def now_ms(self) -> int | None:
        if self.mode == "wall":
            return int(time.time() * 1000)
        return self.watermark_ms
