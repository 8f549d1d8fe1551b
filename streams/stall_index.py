"""An index of open leads for the stall timer: which leads may have crossed a threshold by now, without
walking every lead on every tick, and the open / stalled / pipeline-value gauges, kept as leads change."""

from __future__ import annotations

import heapq
from collections import Counter, defaultdict
from dataclasses import dataclass
from typing import Iterable

from crm_pulse.streams.leads import UNASSIGNED, StallPolicy, ThresholdFn, current_stage, idle_since, is_open


@dataclass(frozen=True, slots=True)
class OpenLead:
    stage: str
    idle_since: int
    level: int
    threshold: int | None
    rule: str | None
    rep: str
    value: float


class StallIndex:
    def __init__(self, policy: StallPolicy):
        self.policy = policy
        self.open: dict[str, OpenLead] = {}
        # Min-heaps with lazy deletion: an entry is live only while it matches `open`. Unstalled leads are
        # ordered by idle time per stage (the stage's threshold may change between ticks); stalled ones by
        # when they escalate (their threshold is fixed once stalled).
        self._unstalled: dict[str, list[tuple[int, str]]] = defaultdict(list)
        self._stalled: list[tuple[int, str]] = []
        self.open_by_stage: Counter[str] = Counter()
        self.value_by_stage: Counter[str] = Counter()
        self.stalled_by_rep_stage: Counter[tuple[str, str]] = Counter()

    def rebuild(self, leads: Iterable[tuple[str, dict]]) -> None:
        self.__init__(self.policy)
        for lead_id, lead in leads:
            self.update(lead_id, lead)

    def update(self, lead_id: str, lead: dict) -> None:
        self.discard(lead_id)
        if not is_open(lead, self.policy):
            return
        entry = OpenLead(current_stage(lead), idle_since(lead), lead["stall_level"], lead["stall_threshold"],
                         lead["stall_rule"], lead["rep"] or UNASSIGNED, lead.get("quote_amount") or 0)  # fmt: skip
        self.open[lead_id] = entry
        self._count(entry, 1)
        if entry.level == 0:
            heapq.heappush(self._unstalled[entry.stage], (entry.idle_since, lead_id))
        elif entry.level == 1:
            heapq.heappush(self._stalled, (self._escalates_at(entry), lead_id))
        if self._heap_size() > 2 * len(self.open) + 1024:
            self._compact()

    def discard(self, lead_id: str) -> None:
        if (old := self.open.pop(lead_id, None)) is not None:
            self._count(old, -1)

    def due(self, now_ms: int, threshold: ThresholdFn) -> list[str]:
        """Leads whose stall level `now_ms` raises, each once: the caller raises them (and `update`s them)."""
        found = []
        for stage, heap in self._unstalled.items():
            limit, _ = threshold(stage)
            while heap and heap[0][0] < now_ms - limit:
                since, lead_id = heapq.heappop(heap)
                entry = self.open.get(lead_id)
                if entry and (entry.level, entry.stage, entry.idle_since) == (0, stage, since):
                    found.append(lead_id)
        while self._stalled and self._stalled[0][0] < now_ms:
            due_at, lead_id = heapq.heappop(self._stalled)
            entry = self.open.get(lead_id)
            if entry and entry.level == 1 and self._escalates_at(entry) == due_at:
                found.append(lead_id)
        return found

    @staticmethod
    def _escalates_at(entry: OpenLead) -> int:
        return entry.idle_since + 2 * entry.threshold

    def _count(self, entry: OpenLead, sign: int) -> None:
        for counter, key, amount in ((self.open_by_stage, entry.stage, 1), (self.value_by_stage, entry.stage, entry.value),
                                     (self.stalled_by_rep_stage, (entry.rep, entry.stage), 1 if entry.level else 0)):  # fmt: skip
            counter[key] += sign * amount
            if not counter[key]:
                del counter[key]

    def _heap_size(self) -> int:
        return len(self._stalled) + sum(len(heap) for heap in self._unstalled.values())

    def _compact(self) -> None:
        """Drop the heaps' dead entries (leads that changed since they were pushed)."""
        self._unstalled = defaultdict(list)
        self._stalled = []
        for lead_id, entry in self.open.items():
            if entry.level == 0:
                self._unstalled[entry.stage].append((entry.idle_since, lead_id))
            elif entry.level == 1:
                self._stalled.append((self._escalates_at(entry), lead_id))
        for heap in (*self._unstalled.values(), self._stalled):
            heapq.heapify(heap)
