"""The "now" of windows and stall checks: the wall clock when live, event time when replaying.

Event time is tracked per input partition, as in Flink and Kafka Streams: events of one entity share a
partition and arrive in order there, while partitions are read at different speeds. An event is late
when it is older than its own partition's latest event by more than the grace period. Windows end at
the latest event time seen of any partition (those other workers read are heard of through the
watermarks forwarded with the events). Stall checks need more: a lead may be declared stalled only once every event
that could still move it has been processed, which `UpstreamWatermark` tells behind the re-keying hop.
"""

from __future__ import annotations

import time
from typing import Iterable, MutableMapping


class Clock:
    def __init__(self, mode: str, grace_ms: int, saved: MutableMapping[str, int] | None = None):
        self.mode = mode
        self.grace_ms = grace_ms
        # {partition: latest event time} seen by this process: lateness is judged against these only, so
        # a message re-read after a crash is never rejected for an event forwarded before the crash.
        self.seen: dict[str, int] = {}
        # The same marks kept across restarts (the worker passes a table): "now" resumes where it was.
        self.saved: MutableMapping[str, int] = {} if saved is None else saved
        # The latest event time of the input partitions other workers read, as heard through the watermarks
        # forwarded with the events: a worker that reads some of the input partitions still ends its windows
        # where a worker reading all of them would.
        self.heard_ms: int | None = None

    def observe(self, partition: int, event_ms: int) -> None:
        key = str(partition)
        if event_ms > self.seen.get(key, event_ms - 1):
            self.seen[key] = event_ms

    def save(self, partition: int) -> None:
        """Keep the partition's mark across restarts (the caller does so once per batch, not per event)."""
        key = str(partition)
        if self.seen[key] > self.saved.get(key, self.seen[key] - 1):
            self.saved[key] = self.seen[key]

    def is_late(self, partition: int, event_ms: int) -> bool:
        high = self.seen.get(str(partition))
        return high is not None and event_ms < high - self.grace_ms

    def partition_watermark(self, partition: int) -> int:
        """No event older than this will be accepted from the partition any more."""
        return self.seen[str(partition)] - self.grace_ms

    def saved_watermarks(self) -> list[list[int]]:
        """[[partition, watermark]] of the saved marks: after a rebalance, those restored with the partitions
        read now."""
        return [[int(key), mark - self.grace_ms] for key, mark in sorted(self.saved.items())]

    def hear(self, watermark_ms: int) -> None:
        """A forwarded input partition's watermark (its latest event time − grace)."""
        latest = watermark_ms + self.grace_ms
        if self.heard_ms is None or latest > self.heard_ms:
            self.heard_ms = latest

    def keep_only(self, partitions: Iterable[int]) -> None:
        """After a rebalance: forget partitions another worker reads now."""
        mine = {str(p) for p in partitions}
        for key in [k for k in self.seen if k not in mine]:
            del self.seen[key]

    def _marks(self) -> list[int]:
        return [max(self.saved.get(key, 0), self.seen.get(key, 0)) for key in {*self.saved, *self.seen}]

    @property
    def watermark_ms(self) -> int | None:
        return min(self._marks(), default=None)

    @property
    def latest_ms(self) -> int | None:
        """The latest event time of any input partition, read here or heard of."""
        return max([*self._marks(), *([] if self.heard_ms is None else [self.heard_ms])], default=None)

    def now_ms(self) -> int | None:
        """Where windows end."""
        return int(time.time() * 1000) if self.mode == "wall" else self.latest_ms


class UpstreamWatermark:
    """Event time as far as an agent behind the re-keying hop has got, as in Flink: forwarded events
    carry their input partition's watermark (latest event time − grace; anything older is rejected as
    late there, so it was forwarded already). Per (own partition, input partition) the agent keeps the
    highest it has processed; once every own partition has heard from every input partition, the minimum
    is a time before which it has seen every event it ever will. Until then (after a start or a
    rebalance) there is none: a path not heard from yet may still bring older events."""

    def __init__(self, sources: int):
        self.sources = sources
        self.partitions: set[int] = set()
        self.marks: dict[tuple[int, int], int] = {}

    def observe(self, partition: int, source: int, watermark_ms: int) -> None:
        if watermark_ms > self.marks.get((partition, source), watermark_ms - 1):
            self.marks[(partition, source)] = watermark_ms

    def keep_only(self, partitions: Iterable[int]) -> None:
        """The own partitions this worker holds now (after every rebalance)."""
        self.partitions = set(partitions)
        self.marks = {key: ms for key, ms in self.marks.items() if key[0] in self.partitions}

    @property
    def watermark_ms(self) -> int | None:
        if not self.partitions or len(self.marks) < len(self.partitions) * self.sources:
            return None
        return min(self.marks.values())
