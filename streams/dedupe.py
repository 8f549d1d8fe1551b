"""Applying each event and each delta once: what an entity or an aggregate records of what it has applied."""

from __future__ import annotations


def first_seen(entity: dict, event: dict, source: int, offset: int, forget_before_ms: int | None) -> bool:
    """Record in the entity's state that it applied the event read at `offset` of input partition `source`;
    False if it did already.

    Two ways an event comes back. After a crash or a hand-over, ingest re-reads its input from the last
    commit: the same input message, at a position the entity has passed on that partition (an exact test,
    since one partition's events reach an entity in order). A producer that sends an event twice makes a
    new message with the same event_id: ids are kept until they are older than `forget_before_ms` (None:
    keep all). The caller passes the slowest input partition's latest event time less the dedupe horizon
    (at least the grace period): by then a duplicate is dead-lettered as late by whichever partition it
    comes through, as every one has read that far.
    """
    read = entity.setdefault("read", {})
    if offset <= read.get(str(source), -1):
        return False
    seen = entity.setdefault("seen", {})
    if event["event_id"] in seen:
        return False
    read[str(source)] = offset
    at = event["occurred_at"]
    if forget_before_ms is None or at >= forget_before_ms:
        seen[event["event_id"]] = at
    if forget_before_ms is None:
        return True
    # Ids are kept in arrival order, nearly event-time order: forget from the oldest on, stopping at the
    # first id still inside the horizon (an out-of-order id behind it is kept a little longer, never less).
    forgotten = []
    for event_id, seen_at in seen.items():
        if seen_at >= forget_before_ms:
            break
        forgotten.append(event_id)
    for event_id in forgotten:
        del seen[event_id]
    return True


def already_applied(state: dict, origin: str, offset: int, seq: int) -> bool:
    """Idempotence for re-sent deltas: each names its origin (an entity agent and its input partition), the
    input offset that caused it and its sequence number among that input's deltas. An aggregate records,
    atomically with its value, the highest (offset, seq) applied per origin; a replay after a crash re-sends
    the same ids, in the same order."""
    marks = state.setdefault("applied", {})
    position = [offset, seq]
    if origin in marks and position <= marks[origin]:
        return True
    marks[origin] = position
    return False
