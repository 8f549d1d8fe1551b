"""Throughput: the full pipeline against a decode-only Faust agent and a raw aiokafka reader over the same
events, and the pipeline with one worker against two."""

from __future__ import annotations

import asyncio
import functools
import os
import subprocess
import sys
import time

import orjson

from bench.harness import REPO, Bench, Worker, applied, rate, stop_process, synthetic_events, total
from crm_pulse.generator import SyntheticCrm

# A mid-sized CRM: 500 new leads a day over 40 reps, ~5,900 events per simulated day.
CRM = {"seed": 7, "reps": 40, "leads_per_day": 500}
# A scrape computes every KPI gauge on the worker's event loop: often enough for ~1% resolution over
# the window, rarely enough not to slow the worker down.
SCRAPE_SECONDS = 1.0


@functools.cache
def events(count: int) -> list[tuple[bytes, bytes, None]]:
    """The synthetic CRM's first `count` events as (key, value, default partition) records."""
    return [(SyntheticCrm.key(e), orjson.dumps(e), None) for e in synthetic_events(count, **CRM)]


async def raw_reader(bench: Bench, topic: str, partitions: int, expected: int, timeout: float) -> dict:
    bench.reporter.step("raw aiokafka reader")
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "bench.raw_reader", "--bootstrap", bench.bootstrap, "--topic", topic,
        "--partitions", str(partitions), "--events", str(expected), "--timeout", str(timeout),
        cwd=REPO, stdout=subprocess.PIPE,
    )  # fmt: skip
    out, _ = await process.communicate()
    result = orjson.loads(out)
    seconds = (result["last_at"] - result["first_at"]) if result["first_at"] else 0
    return {"events": result["events"], "seconds": round(seconds, 3), "complete": result["complete"],
            "events_per_s": rate(result["events"], seconds)}  # fmt: skip


async def bare_faust(bench: Bench, topic: str, partitions: int, expected: int, timeout: float,
                     work: str = "decode") -> dict:  # fmt: skip
    app_id = bench.app(f"bare-faust-{work}", partitions).app_id
    result_path = bench.workdir / f"{app_id}.json"
    env = {**os.environ, "BENCH_BROKER": bench.broker.url, "BENCH_APP_ID": app_id, "BENCH_TOPIC": topic,
           "BENCH_PARTITIONS": str(partitions), "BENCH_EVENTS": str(expected),
           "BENCH_DATA_DIR": str(bench.workdir / app_id), "BENCH_RESULT": str(result_path), "BENCH_WORK": work}  # fmt: skip
    bench.reporter.step(f"bare Faust agent ({work} only)", total=expected)
    with open(bench.workdir / f"{app_id}.log", "wb") as log:
        process = subprocess.Popen([sys.executable, "-m", "bench.bare_faust"], env=env, cwd=REPO, stdout=log, stderr=log)
    seen = {"events": 0, "first_at": None, "last_at": None, "complete": False}
    deadline = None
    startup_deadline = time.monotonic() + 120
    try:
        while not seen["complete"] and process.poll() is None:
            await asyncio.sleep(0.5)
            if result_path.exists():
                seen = orjson.loads(result_path.read_bytes())
            bench.reporter.update(seen["events"])
            now = time.monotonic()
            if seen["first_at"] and deadline is None:
                deadline = now + timeout  # the cap counts from the first event, like the other contenders
            if (deadline and now > deadline) or (deadline is None and now > startup_deadline):
                break
    finally:
        stop_process(process)
    seconds = (seen["last_at"] - seen["first_at"]) if seen["first_at"] else 0
    return {"events": seen["events"], "seconds": round(seconds, 3), "complete": seen["complete"],
            "events_per_s": rate(seen["events"] - 1, seconds)}  # fmt: skip


async def _scrape(bench: Bench, workers: list[Worker]) -> list:
    return await asyncio.gather(*(worker.metrics(bench.session) for worker in workers))


def internal_backlog(scraped: list, app_id: str) -> dict[str, int]:
    """Per internal topic (re-keyed events, deltas), messages its agents have not committed yet: how far
    each stage after `ingest` is behind. From the workers' consumer offsets (approximate on Tansu, whose end
    offsets can stop short of a partition's last batch)."""
    backlog: dict[str, int] = {}
    for metrics in scraped:
        committed = {labels: v for (name, labels), v in metrics.items()
                     if name == "crm_consumer_committed_offset"}  # fmt: skip
        for (name, labels), end in metrics.items():
            topic = dict(labels).get("topic", "")
            if name == "crm_consumer_end_offset" and topic.startswith(f"{app_id}-") \
                    and topic != f"{app_id}-events" and not topic.endswith("-changelog"):  # fmt: skip
                suffix = topic.removeprefix(f"{app_id}-")
                backlog[suffix] = backlog.get(suffix, 0) + int(end - committed.get(labels, 0))
    return backlog


async def wait_for_assignment(bench: Bench, workers: list[Worker], partitions: int, timeout: float) -> list:
    """Until the workers hold disjoint sets of partitions covering all of them, twice in a row."""
    deadline = time.monotonic() + timeout
    previous = None
    while time.monotonic() < deadline:
        bodies = await asyncio.gather(*(w.get_json(bench.session, "/kpis") for w in workers))
        held = [sorted(body["partitions"]) if body else [] for body in bodies]
        flat = [p for h in held for p in h]
        if all(held) and sorted(flat) == list(range(partitions)) and held == previous:
            return held
        previous = held
        await asyncio.sleep(1)
    return held


async def pipeline(bench: Bench, records: list, workers: int, partitions: int, timeout: float, label: str) -> dict:
    """`workers` crm-pulse workers of one app, joined and warmed up before the input arrives (a worker
    joining mid-run would rebalance the partitions under the measurement); then a backlog is produced and
    events finished per second are counted on /metrics while the backlog lasts, or for `timeout` s."""
    app = bench.app(label, partitions)
    await bench.create_topic(app.input_topic, partitions)
    group = [bench.worker(app).start() for _ in range(workers)]
    bench.reporter.step(f"{label}: starting {workers} worker(s)")
    for worker in group:
        if await worker.wait_for(bench.session, lambda m: True, timeout=120) is None:
            raise TimeoutError(f"{worker.name} served no /metrics within 120 s (HTTP {worker.metrics_status})")
    assignment = await wait_for_assignment(bench, group, partitions, timeout=120) if workers > 1 else None

    warmup = min(1000, len(records) // 10)
    await bench.produce(app.input_topic, records[:warmup], warmup, f"{label}: warm-up events")
    bench.reporter.step(f"{label}: waiting for the warm-up events", total=warmup)
    deadline = time.monotonic() + 120
    while sum(applied(m) for m in await _scrape(bench, group) if m) < warmup:
        if time.monotonic() > deadline:
            raise TimeoutError(f"{label}: the warm-up events were not processed within 120 s")
        await asyncio.sleep(SCRAPE_SECONDS)

    backlog = len(records) - warmup
    await bench.produce(app.input_topic, records[warmup:], backlog, f"{label}: producing the backlog")
    at_start = [m for m in await _scrape(bench, group) if m]
    start_at, start_done = time.monotonic(), sum(applied(m) for m in at_start)
    bench.reporter.step(f"{label}: processing the backlog", total=len(records))
    end_at, done, scraped, scrape_seconds = start_at, start_done, [], []
    while done < len(records) and end_at - start_at < timeout:
        await asyncio.sleep(SCRAPE_SECONDS)
        began = time.monotonic()
        scraped = [m for m in await _scrape(bench, group) if m]
        end_at, done = time.monotonic(), sum(applied(m) for m in scraped)
        scrape_seconds.append(end_at - began)
        bench.reporter.update(done, f"{label}: {rate(done - start_done, end_at - start_at) or 0:,.0f} events/s")
    seconds = end_at - start_at
    return {
        "workers": workers,
        "partitions": partitions,
        "events_produced": len(records),
        "events_done": int(done),
        "events_measured": int(done - start_done),
        "seconds": round(seconds, 3),
        "complete": done >= len(records),
        "events_per_s": rate(done - start_done, seconds),
        "scrape_seconds_mean": round(sum(scrape_seconds) / len(scrape_seconds), 4) if scrape_seconds else None,
        "per_worker_events": [int(applied(m)) for m in scraped],
        "per_worker_received": [int(total(m, "crm_events_received_total")) for m in scraped],
        "internal_backlog_at_end": internal_backlog(scraped, app.app_id),
        "assignment": assignment,
        # A rebalance inside the window would make the figure a mix of two assignments.
        "rebalances_in_window": int(sum(total(m, "crm_consumer_rebalances_total") for m in scraped)
                                    - sum(total(m, "crm_consumer_rebalances_total") for m in at_start)),
        "memory": [worker.memory_mib() for worker in group],
    }


async def phase_throughput(bench: Bench, config) -> dict:
    records = events(config.throughput_events)
    topic = f"{bench.tag}-throughput-events"
    await bench.create_topic(topic, config.partitions)
    await bench.produce(topic, records, len(records), "throughput: producing the events")
    raw = await raw_reader(bench, topic, config.partitions, len(records), config.throughput_timeout)
    bench.reporter.log(f"raw aiokafka: {raw['events_per_s']:,.0f} events/s")
    bare = await bare_faust(bench, topic, config.partitions, len(records), config.throughput_timeout)
    bench.reporter.log(f"bare Faust: {bare['events_per_s'] or 0:,.0f} events/s")
    validating = await bare_faust(bench, topic, config.partitions, len(records), config.throughput_timeout, "validate")
    bench.reporter.log(f"validating Faust: {validating['events_per_s'] or 0:,.0f} events/s")
    full = await pipeline(bench, records, 1, config.partitions, config.throughput_timeout, "pipeline")
    bench.reporter.log(f"pipeline: {full['events_per_s'] or 0:,.0f} events/s")
    return {"events": len(records), "partitions": config.partitions, "crm": CRM,
            "raw_aiokafka": raw, "bare_faust": bare, "validating_faust": validating, "pipeline": full}  # fmt: skip


async def phase_scale_out(bench: Bench, config) -> dict:
    records = events(config.throughput_events)
    one = await pipeline(bench, records, 1, config.scale_partitions, config.scale_timeout, "one-worker")
    bench.reporter.log(f"one worker: {one['events_per_s'] or 0:,.0f} events/s")
    for worker in bench.workers:
        worker.stop()  # the two-worker run gets both cores
    two = await pipeline(bench, records, 2, config.scale_partitions, config.scale_timeout, "two-workers")
    bench.reporter.log(f"two workers: {two['events_per_s'] or 0:,.0f} events/s")
    return {"events": len(records), "partitions": config.scale_partitions, "one_worker": one, "two_workers": two}
