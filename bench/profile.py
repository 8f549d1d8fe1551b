"""Profile: where a pipeline event's time goes, and what each input event makes the worker write.

One worker processes a backlog while py-spy samples it. A sample of the event loop's thread goes to the
category of the deepest frame on its stack that belongs to one (so asyncio's own frames count toward the code
that scheduled them, and a changelog send toward the producer, not the table write that caused it); a stack
with none is the event loop's. Afterwards the end offsets of every topic of the app, less those before the
backlog, say how many records the worker produced per input event: a changelog record is a table write."""

from __future__ import annotations

import asyncio
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

from kafka import KafkaConsumer, TopicPartition

from bench.harness import REPO, Bench, applied, rate
from bench.throughput import events

# (category, path fragments of its frames), checked in this order for each frame from the leaf up.
CATEGORIES = (
    ("produce (changelog and internal topics)", ("/aiokafka/producer/", "/aiokafka/record/",
                                                 "/faust/transport/producer.py", "/faust/topics.py")),
    ("metrics (prometheus-client, Faust sensors)", ("/prometheus_client/", "/faust/sensors/")),
    ("validation (schemas/, pydantic)", (f"{REPO}/schemas/", "/pydantic/")),
    ("KPI folds (streams/)", (f"{REPO}/streams/",)),
    ("table reads and writes (Faust tables)", ("/faust/tables/", "/faust/stores/", "/mode/utils/collections.py")),
    ("Faust stream, agent and ack bookkeeping", ("/faust/streams.py", "/faust/transport/consumer.py",
                                                 "/faust/agents/", "/faust/transport/conductor.py",
                                                 "/faust/events.py", "/faust/channels.py", "/mode/utils/queues.py")),
    ("agents/ (the pipeline's own wiring)", (f"{REPO}/agents/",)),
    ("fetch (aiokafka consumer)", ("/aiokafka/consumer/", "/aiokafka/conn.py", "/aiokafka/client.py")),
)
EVENT_LOOP = "event loop and the rest"
MAIN_THREAD = "MainThread"


def category(frames: list[str]) -> str:
    """The category of the deepest frame (the last) that belongs to one."""
    for frame in reversed(frames):
        for name, fragments in CATEGORIES:
            if any(fragment in frame for fragment in fragments):
                return name
    return EVENT_LOOP


def shares(raw: str) -> dict:
    """From py-spy's raw output (`thread (id): name;frame;frame count` per line, with --threads): each
    category's share of the main thread's samples, and the samples of every thread."""
    per_thread: Counter = Counter()
    main: Counter = Counter()
    for line in raw.splitlines():
        stack, _, count = line.rpartition(" ")
        thread, *frames = stack.split(";")
        name = thread.partition(": ")[2]
        per_thread[name] += int(count)
        if name == MAIN_THREAD and frames:
            main[category(frames)] += int(count)
    total = sum(main.values())
    return {
        "main_thread_samples": total,
        "main_thread_shares": {name: round(n / total, 4) for name, n in main.most_common()} if total else {},
        "samples_by_thread": dict(per_thread.most_common()),
    }


def end_offsets(bootstrap: str, prefix: str) -> dict[str, int]:
    """{topic: records in it (the sum of its partitions' end offsets)} for every topic named `prefix`…
    (kafka-python: its `topics()` fetches every topic's metadata, which aiokafka's consumer keeps only for
    the topics it reads)."""
    consumer = KafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False)
    try:
        partitions = [TopicPartition(topic, p) for topic in sorted(consumer.topics()) if topic.startswith(prefix)
                      for p in consumer.partitions_for_topic(topic) or ()]  # fmt: skip
        ends = consumer.end_offsets(partitions) if partitions else {}
    finally:
        consumer.close()
    totals: Counter = Counter()
    for tp, end in ends.items():
        totals[tp.topic] += end
    return dict(totals)


def py_spy() -> str:
    """py-spy from the bench extra, beside this interpreter when the venv is not on PATH."""
    beside = Path(sys.executable).parent / "py-spy"
    found = shutil.which("py-spy") or (str(beside) if beside.exists() else None)
    if found is None:
        raise RuntimeError("py-spy is not installed: pip install -e '.[bench]'")
    return found


async def phase_profile(bench: Bench, config) -> dict:
    records = events(config.profile_events)
    app = bench.app("profile", config.partitions)
    await bench.create_topic(app.input_topic, config.partitions)
    worker = bench.worker(app).start()
    bench.reporter.step("profile: starting the worker")
    if await worker.wait_for(bench.session, lambda m: True, timeout=120) is None:
        raise TimeoutError(f"{worker.name} served no /metrics within 120 s (HTTP {worker.metrics_status})")
    warmup = min(1000, len(records) // 10)
    await bench.produce(app.input_topic, records[:warmup], warmup, "profile: warm-up events")
    if await worker.wait_for(bench.session, lambda m: applied(m) >= warmup, timeout=120) is None:
        raise TimeoutError("profile: the warm-up events were not processed within 120 s")
    before = await asyncio.to_thread(end_offsets, bench.bootstrap, app.app_id)

    samples = bench.workdir / f"{app.app_id}.py-spy.txt"
    spy = subprocess.Popen(
        [py_spy(), "record", "--pid", str(worker.process.pid), "--threads", "--full-filenames", "--format", "raw",
         "--rate", str(config.profile_rate), "--output", str(samples)],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )  # fmt: skip
    backlog = len(records) - warmup
    await bench.produce(app.input_topic, records[warmup:], backlog, "profile: producing the backlog")
    started = time.monotonic()
    bench.reporter.step("profile: processing the backlog under py-spy", total=len(records))
    done = warmup
    while done < len(records) and time.monotonic() - started < config.throughput_timeout:
        await asyncio.sleep(1)
        metrics = await worker.metrics(bench.session)
        done = applied(metrics) if metrics else done
        bench.reporter.update(done)
    seconds = time.monotonic() - started
    spy.send_signal(signal.SIGINT)  # py-spy writes its samples on SIGINT
    _, errors = spy.communicate(timeout=60)
    if not samples.exists():
        raise RuntimeError(f"py-spy wrote no samples: {errors.decode(errors='replace')[-500:]}")
    after = await asyncio.to_thread(end_offsets, bench.bootstrap, app.app_id)
    worker.stop()

    measured = done - warmup
    written = {topic.removeprefix(f"{app.app_id}-"): after[topic] - before.get(topic, 0)
               for topic in after if topic != app.input_topic}  # fmt: skip
    per_event = {topic: round(n / measured, 4) for topic, n in sorted(written.items()) if n} if measured else {}
    changelogs = {t: n for t, n in per_event.items() if t.endswith("-changelog")}
    return {
        "events": int(measured),
        "seconds": round(seconds, 3),
        "events_per_s_under_py_spy": rate(measured, seconds),
        "complete": done >= len(records),
        "sample_rate_hz": config.profile_rate,
        **shares(samples.read_text()),
        "records_per_input_event": per_event,
        "table_writes_per_input_event": round(sum(changelogs.values()), 4),
        "records_produced_per_input_event": round(sum(per_event.values()), 4),
    }
