"""The reference the pipeline is held to: a Faust app with the worker's broker settings and raw input
values, whose one agent only decodes each event with orjson. With BENCH_WORK=validate the agent instead
validates each event as the worker's `ingest` does (pydantic, then the dict it forwards): the most any
pipeline that validates events in a Faust agent could reach.

Run as `python -m bench.bare_faust` with BENCH_BROKER, BENCH_APP_ID, BENCH_TOPIC, BENCH_PARTITIONS,
BENCH_EVENTS (how many to expect), BENCH_DATA_DIR and BENCH_RESULT (a JSON file, rewritten every second
and when the last event is in: events so far and the wall-clock times of the first and latest one).
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import faust
import orjson

from crm_pulse.schemas.validate import parse_event

app = faust.App(
    os.environ["BENCH_APP_ID"],
    broker=os.environ["BENCH_BROKER"],
    # As the worker's app: the defaults make a group join take ~30 s.
    broker_session_timeout=6,
    broker_heartbeat_interval=1,
    datadir=os.environ["BENCH_DATA_DIR"],
    topic_partitions=int(os.environ["BENCH_PARTITIONS"]),
    key_serializer="raw",
    value_serializer="raw",
    web_enabled=False,
    autodiscover=False,
)
topic = app.topic(os.environ["BENCH_TOPIC"], key_serializer="raw", value_serializer="raw")
expected = int(os.environ["BENCH_EVENTS"])
result = Path(os.environ["BENCH_RESULT"])
seen = {"events": 0, "first_at": None, "last_at": None}


def report() -> None:
    partial = result.with_suffix(".tmp")
    partial.write_bytes(orjson.dumps({**seen, "complete": seen["events"] >= expected}))
    partial.replace(result)



def validate(value: bytes) -> dict:
    return parse_event(value).model_dump(by_alias=True)


work = {"decode": orjson.loads, "validate": validate}[os.environ.get("BENCH_WORK", "decode")]


@app.agent(topic)
async def decode(stream):
    async for value in stream:
        work(value)
        now = time.time()
        seen["first_at"] = seen["first_at"] or now
        seen["last_at"] = now
        seen["events"] += 1
        if seen["events"] == expected:
            report()


@app.timer(1.0)
async def progress():
    report()


if __name__ == "__main__":
    faust.Worker(app, loglevel="warning", quiet=True).execute_from_commandline()
