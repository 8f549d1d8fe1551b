"""The two loops every agent is made of: entity agents apply each event once, aggregate agents apply each
delta once. Both read the entity's or aggregate's state, and the caller writes it back when done."""

from __future__ import annotations

from typing import AsyncIterator

from agents.app import settings
from agents.metrics import EVENTS_DUPLICATE
from streams.routing import already_applied, first_seen

DEDUPE_HORIZON_MS = int(settings.dedupe_horizon_seconds * 1000)


async def first_seen_events(stream, types: frozenset[str], table, new=dict, upstream=None) -> AsyncIterator:
    """(event, key, value, state) for every event of `types` whose event_id the entity has not applied;
    `upstream` (an UpstreamWatermark) follows the watermarks forwarded with every event, of any type."""
    async for event in stream.events():
        forwarded = event.value
        if upstream is not None:
            upstream.observe(event.message.partition, forwarded["source"], forwarded["watermark"])
        value = forwarded["event"]
        if value["type"] not in types:
            continue
        state = table.get(event.key) or new()
        if not first_seen(state, value, DEDUPE_HORIZON_MS):
            EVENTS_DUPLICATE.labels(value["type"]).inc()
            continue
        yield event, event.key, value, state


async def unapplied_deltas(stream, table) -> AsyncIterator:
    """(key, delta, state) for every delta the aggregate has not applied yet (re-sent after a crash)."""
    async for key, delta in stream.items():
        state = table[key]
        if not already_applied(state, delta):
            yield key, delta, state
