"""The peer job on Quix Streams: crm-pulse's lead path (stage dwell, won and lost deals, stall alerts keyed
by rep) as a stateful Quix app, its state per lead in RocksDB with Quix's changelog topics.

    input ─► lead events only ─► fold per lead (state: the lead) ─┬─► alerts topic, keyed by rep
                                                                   └─► group_by KPI (repartition topic)
                                                                        ─► [count, sum] per KPI (state)

With BENCH_WORK=validate, each event is first validated as the worker's `ingest` does (pydantic, then the
dict it forwards), as bench/bare_faust.py's validating agent: what the job costs with the project's input
checks.

Run as `python -m bench.peers.quix_job` with BENCH_BOOTSTRAP, BENCH_APP_ID (consumer group), BENCH_TOPIC,
BENCH_ALERTS_TOPIC, BENCH_EVENTS (input events to expect, 0 for none), BENCH_FETCH_MAX_WAIT_MS (the
consumer's fetch.wait.max.ms, empty for librdkafka's default), BENCH_STATE_DIR and BENCH_RESULT: a
JSON file, rewritten twice a second, as bench/bare_faust.py's (events so far, the wall-clock times of the
first and latest, `complete`) plus `kpis`, the aggregate step's {kpi: [count, sum]}.
"""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import orjson
from quixstreams import Application, State

from bench.peers.lead_job import fold, is_lead_event, new_lead
from crm_pulse.schemas.validate import parse_event

app = Application(
    broker_address=os.environ["BENCH_BOOTSTRAP"],
    consumer_group=os.environ["BENCH_APP_ID"],
    auto_offset_reset="earliest",
    state_dir=os.environ["BENCH_STATE_DIR"],
    loglevel="WARNING",
    consumer_extra_config={"fetch.wait.max.ms": int(w)} if (w := os.environ["BENCH_FETCH_MAX_WAIT_MS"]) else None,
)
validating = os.environ.get("BENCH_WORK") == "validate"
# Validating, the job decodes the raw value once, in `parse_event`, as `ingest` does.
events = app.topic(os.environ["BENCH_TOPIC"], key_deserializer="str",
                   value_deserializer="bytes" if validating else "json")  # fmt: skip
alerts = app.topic(os.environ["BENCH_ALERTS_TOPIC"], key_serializer="str", value_serializer="json")
expected = int(os.environ["BENCH_EVENTS"])
result = Path(os.environ["BENCH_RESULT"])
seen = {"events": 0, "first_at": None, "last_at": None}
kpis: dict[str, list[int]] = {}


def validate(value: bytes) -> dict:
    return parse_event(value).model_dump(by_alias=True)


def count(_event: dict) -> None:
    now = time.time()
    seen["first_at"] = seen["first_at"] or now
    seen["last_at"] = now
    seen["events"] += 1


def fold_lead(event: dict, state: State) -> list[dict]:
    lead = state.get("lead") or new_lead()
    out = fold(lead, event)
    state.set("lead", lead)
    return out


def total(record: dict, state: State) -> None:
    count_sum = state.get("total") or [0, 0]
    count_sum = [count_sum[0] + 1, count_sum[1] + record["value"]]
    state.set("total", count_sum)
    kpis[record["kpi"]] = count_sum


def report() -> None:
    # A thread, not a step: the last aggregate updates arrive after the last input event.
    while True:
        partial = result.with_suffix(".tmp")
        partial.write_bytes(orjson.dumps({**seen, "complete": 0 < expected <= seen["events"], "kpis": kpis}))
        partial.replace(result)
        time.sleep(0.5)


sdf = app.dataframe(events)
if validating:
    sdf = sdf.apply(validate)
sdf = sdf.update(count).filter(is_lead_event).apply(fold_lead, stateful=True, expand=True)
sdf.filter(lambda out: "type" in out).to_topic(alerts, key=lambda alert: alert["rep_id"])
sdf.filter(lambda out: "kpi" in out).group_by(lambda record: record["kpi"], name="kpi").update(total, stateful=True)

if __name__ == "__main__":
    threading.Thread(target=report, daemon=True).start()
    app.run()
