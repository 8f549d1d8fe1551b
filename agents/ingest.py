"""Validate every raw CRM event; bad ones go to the dead-letter topic with the reason, good ones onward."""

from __future__ import annotations

import base64
import logging
import time

from agents.app import app, clock, dlq_topic, family_topics, input_topic, settings
from agents.loops import BATCH_MAX_EVENTS, BATCH_WITHIN_SECONDS, part_of
from agents.metrics import EVENTS_INVALID, EVENTS_RECEIVED
from schemas.events import ms_to_iso
from schemas.validate import InvalidEvent, parse_event
from streams.routing import FAMILY_OF_TYPE

log = logging.getLogger(__name__)


def dead_letter(error: InvalidEvent, message) -> dict:
    return {
        "schema_version": 1,
        "reason": error.reason,
        "error": error.detail,
        "source": {"topic": message.topic, "partition": message.partition, "offset": message.offset},
        "key_base64": base64.b64encode(message.key).decode() if message.key is not None else None,
        "original_base64": base64.b64encode(message.value or b"").decode(),
        "dead_lettered_at": ms_to_iso(int(time.time() * 1000)),
    }


@app.agent(input_topic)
async def ingest(stream):
    async for events in stream.take_events(BATCH_MAX_EVENTS, BATCH_WITHIN_SECONDS):
        last_valid = {}  # input partition → its last valid event in the batch
        for event in events:
            EVENTS_RECEIVED.inc()
            try:
                crm_event = parse_event(event.value)
                if clock.is_late(event.message.partition, crm_event.occurred_at):
                    raise InvalidEvent(
                        "late", f"occurred_at {ms_to_iso(crm_event.occurred_at)} is more than the grace period "
                        f"behind the latest event of its partition"
                    )
            except InvalidEvent as error:
                EVENTS_INVALID.labels(error.reason).inc()
                log.warning("dead-lettered %s/%s@%s: %s", event.message.topic, event.message.partition,
                            event.message.offset, error)  # fmt: skip
                await dlq_topic.send(key=event.key, value=dead_letter(error, event.message))
                continue
            partition = event.message.partition
            clock.observe(partition, crm_event.occurred_at)
            last_valid[partition] = event
            # Its input position lets entities tell a re-read after a crash from a new event.
            forwarded = {"event": crm_event.model_dump(by_alias=True), "source": partition,
                         "offset": event.message.offset, "watermark": clock.partition_watermark(partition)}  # fmt: skip
            await family_topics[FAMILY_OF_TYPE[crm_event.type]].send(key=crm_event.key, value=forwarded)
        # Once per batch and partition, as part of the partition's last event (the table is keyed by it).
        for partition, event in last_valid.items():
            with part_of(event):
                clock.save(partition)
            await broadcast_watermark(partition)


async def broadcast_watermark(source: int) -> None:
    """Tell every partition of the family topics how far this input partition has got: stall checks and
    id pruning behind the re-keying hop wait until they have heard from every input partition
    (`streams.clock.UpstreamWatermark`), also those whose events all went elsewhere (as when producers key
    by the same entity, or a partition carries no event of a family)."""
    watermark = {"source": source, "watermark": clock.partition_watermark(source)}
    for topic in family_topics.values():
        for partition in range(settings.partitions):
            await topic.send(partition=partition, value=watermark)
