"""The ceiling: a plain aiokafka consumer that reads a topic from the beginning and decodes every value
with orjson, nothing else. Assigned its partitions directly (no group join). Prints one JSON line."""

from __future__ import annotations

import argparse
import asyncio
import sys
import time

import orjson
from aiokafka import AIOKafkaConsumer, TopicPartition


async def read(bootstrap: str, topic: str, partitions: int, expected: int, timeout: float) -> dict:
    consumer = AIOKafkaConsumer(
        bootstrap_servers=bootstrap, enable_auto_commit=False,
        max_partition_fetch_bytes=8 << 20, fetch_max_bytes=64 << 20,
    )  # fmt: skip
    await consumer.start()
    try:
        consumer.assign([TopicPartition(topic, p) for p in range(partitions)])
        await consumer.seek_to_beginning()
        events, first, last = 0, None, None
        deadline = time.monotonic() + timeout
        while events < expected and time.monotonic() < deadline:
            batch = await consumer.getmany(timeout_ms=500, max_records=50_000)
            if batch:
                first = first or time.time()  # from the first records in hand: no connection set-up
            for records in batch.values():
                for record in records:
                    orjson.loads(record.value)
                events += len(records)
            last = time.time() if batch else last
    finally:
        await consumer.stop()
    return {"events": events, "first_at": first, "last_at": last, "complete": events >= expected}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--bootstrap", required=True)
    parser.add_argument("--topic", required=True)
    parser.add_argument("--partitions", type=int, required=True)
    parser.add_argument("--events", type=int, required=True)
    parser.add_argument("--timeout", type=float, required=True)
    args = parser.parse_args()
    result = asyncio.run(read(args.bootstrap, args.topic, args.partitions, args.events, args.timeout))
    sys.stdout.write(orjson.dumps(result).decode() + "\n")


if __name__ == "__main__":
    main()
