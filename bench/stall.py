"""A worker with a million open leads in a RocksDB store: its cold start (the `leads` table restored from
the changelog into an empty data dir), its restart on that data dir, the stall scan over them, its memory.

Pushing a million leads through the pipeline would take longer than the rest of the benchmark, so the
table's changelog topic is written directly, in the worker's own format, which is learnt and checked
first: a worker of the same app is sent a few sample leads' events, and the records it writes to
`<app_id>-leads-changelog` must equal what `streams.leads` builds from the same events (key encoding,
partition and value). The million leads are then copies of 10,000 such built leads under their own ids.
Workers here use the wall clock, as live ones do: the scan compares every lead with now.

The worker with the leads starts on an empty data dir (cold start: every key comes from the changelog),
is stopped gracefully and started again on the same data dir (restart: only the changelog's tail beyond
the RocksDB files is read), as a production restart is; the scan and memory are those of the restarted one.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import statistics
import time

import aiohttp
import orjson
from kafka.partitioner.default import murmur2

from bench.harness import DAY_MS, App, Bench, Worker, applied, stop_process, total
from crm_pulse.config import Settings
from crm_pulse.generator import CAMPAIGNS, SOURCES, STAGES
from crm_pulse.streams.leads import apply_lead_event, check_stall, new_lead
from crm_pulse.streams.dedupe import first_seen

SETTINGS = Settings(stall_p90_min_samples=1_000_000_000)
STALLED_SHARE = 0.05
TEMPLATES = 10_000
SAMPLES = 16
SCAN_METRIC = "crm_stall_scan_duration_seconds"
LOOP_STALL_SECONDS = 0.1
# A graceful stop flushes and closes a million keys' RocksDB stores: more than the harness's default wait.
STOP_TIMEOUT = 120


def worker_env(bench: Bench) -> dict[str, str]:
    # Stall thresholds that p90 dwell times cannot lower: the sample leads' few stage exits must not make
    # the worker judge them by other thresholds than the copies were built with.
    env = {"CRM_PULSE_CLOCK": "wall", "CRM_PULSE_STALL_P90_MIN_SAMPLES": "1000000000", "CRM_PULSE_STORE": "rocksdb://"}
    if bench.on_tansu:
        # Tansu under-reports end offsets, which Faust's check takes for a RocksDB store ahead of its
        # changelog. Workers turn the check off there themselves; a --worker-ref from before 233a822 does not.
        env["CRM_PULSE_RECOVERY_CONSISTENCY_CHECK"] = "false"
    return env


def threshold(stage: str) -> tuple[int, str]:
    return SETTINGS.stall_policy.threshold(stage, None, 0)


START_PROBE_KEY = b"bench-start"


def lead_events(lead_id: str, rng: random.Random, now_ms: int) -> list[dict]:
    """An open lead's events: created, moved up to a random stage, a quote from "proposal" on, maybe an
    activity. Idle for 5-50% of its stage's threshold, or 1.2-1.6 times it for a share already stalled."""
    stage = rng.randrange(len(STAGES))
    limit = threshold(STAGES[stage])[0]
    idle = int(limit * (rng.uniform(1.2, 1.6) if rng.random() < STALLED_SHARE else rng.uniform(0.05, 0.5)))
    last = now_ms - idle
    activity = rng.random() < 0.5
    entered = last - rng.randrange(DAY_MS) if activity else last
    created = entered - stage * rng.randrange(DAY_MS, 3 * DAY_MS)
    envelope = {"lead_id": lead_id, "rep_id": f"rep-{rng.randrange(40):02d}", "team_id": "team-a", "pipeline": "default"}

    def event(n: int, kind: str, at: int, payload: dict) -> dict:
        return {"event_id": f"{lead_id}-{n}", "type": kind, "occurred_at": at, **envelope, "payload": payload}

    events = [event(0, "lead.created", created, {"source": rng.choice(SOURCES), "campaign": rng.choice(CAMPAIGNS),
                                                 "score": rng.randint(0, 100), "stage": STAGES[0]})]  # fmt: skip
    for n in range(1, stage + 1):
        at = created + n * (entered - created) // stage
        events.append(event(n, "lead.stage_changed", at, {"from": STAGES[n - 1], "to": STAGES[n]}))
        if STAGES[n] == "proposal":
            events.append(event(10, "quote.sent", at, {"quote_id": f"{lead_id}-q", "amount": rng.randint(500, 25_000)}))
    if activity:
        events.append(event(20, "lead.activity", last, {"kind": "call", "direction": "outbound"}))
    return events


def build_lead(lead_id: str, events: list[dict], now_ms: int, positions: list[tuple[int, int]]) -> dict:
    """The table value a worker holds after these events, read at these (input partition, offset)
    positions, and a stall scan at `now_ms`."""
    lead = new_lead()
    for event, (source, offset) in zip(events, positions):
        first_seen(lead, event, source, offset, None)
        apply_lead_event(lead, event, lead_id, SETTINGS.stall_policy, threshold)
    check_stall(lead, lead_id, now_ms, SETTINGS.stall_policy, threshold)
    return orjson.loads(orjson.dumps(lead))


def partition_of(data: bytes, partitions: int) -> int:
    """The default (murmur2) partitioner's choice, as Faust's and kafka-python's producers make it."""
    return (murmur2(data) & 0x7FFFFFFF) % partitions


async def read_topic(bench: Bench, topic: str, partitions: int) -> dict[bytes, tuple[int, bytes]]:
    """{key: (partition, latest value)} of a whole topic."""
    return {record.key: (record.partition, record.value) async for record in bench.read_topic(topic, partitions)}


def learn_format(written: dict[bytes, tuple[int, bytes]], expected: dict[str, dict], partitions: int) -> dict:
    """How the worker writes a lead to its changelog: the key's encoding, which bytes pick the
    partition, and whether its values equal the built ones. Raises if the samples fit no known way."""
    encodings = {"json": orjson.dumps, "utf-8": str.encode}
    for name, encode in encodings.items():
        if all(encode(lead_id) in written for lead_id in expected):
            break
    else:
        raise RuntimeError(f"the sample leads are not in the changelog under any of {list(encodings)} keys")
    records = {lead_id: written[encode(lead_id)] for lead_id in expected}
    rules = {"encoded key": encode, "lead id": str.encode}
    def fits(data) -> bool:
        return all(partition_of(data(lead_id), partitions) == p for lead_id, (p, _) in records.items())

    rule = next((r for r, data in rules.items() if fits(data)), None)
    if rule is None:
        raise RuntimeError("the sample leads' changelog partitions follow no known partitioner")
    mismatched = sorted(lead_id for lead_id, (_, value) in records.items() if orjson.loads(value) != expected[lead_id])
    return {"key_encoding": name, "partitioned_by": rule, "values_equal": not mismatched, "mismatched": mismatched,
            "encode": encode, "partition_data": rules[rule]}  # fmt: skip


async def calibrate(bench: Bench, app: App, config) -> dict:
    """Start an empty worker (its time to the first event is the baseline for recovery), send it the
    sample leads' events, and learn the changelog format from what it writes."""
    rng = random.Random(3)
    now_ms = int(time.time() * 1000)
    samples = {f"bench-sample-{j:03d}": [] for j in range(SAMPLES)}
    for lead_id in samples:
        samples[lead_id] = lead_events(lead_id, rng, now_ms)
    # In event-time order: an event more than the grace period behind its partition's latest is dead-lettered.
    ordered = sorted((e for events in samples.values() for e in events), key=lambda e: e["occurred_at"])
    records = [(e["lead_id"].encode(), orjson.dumps(e), None) for e in ordered]
    worker = bench.worker(app, **worker_env(bench), CRM_PULSE_STALL_SCAN_SECONDS="1")
    startup = await start_until_first_event(bench, worker, config.recovery_timeout, "empty tables",
                                            occurred_at=ordered[0]["occurred_at"])  # fmt: skip
    if not startup["complete"]:
        raise TimeoutError(f"an empty worker handled no event within {config.recovery_timeout} s "
                           f"(/metrics: HTTP {worker.metrics_status})")  # fmt: skip
    await bench.produce(app.input_topic, records, len(records), "stall: sample leads for the format check")
    # Where each event lands in the input topic: after the start probe, by the default partitioner.
    next_offset = {p: int(p == partition_of(START_PROBE_KEY, app.partitions)) for p in range(app.partitions)}
    positions = {lead_id: [] for lead_id in samples}
    for event in ordered:
        source = partition_of(event["lead_id"].encode(), app.partitions)
        positions[event["lead_id"]].append((source, next_offset[source]))
        next_offset[source] += 1
    expected = {lead_id: build_lead(lead_id, events, now_ms, positions[lead_id]) for lead_id, events in samples.items()}
    bench.reporter.step("stall: reading the sample leads back from the changelog")
    deadline = time.monotonic() + 60
    while True:
        await asyncio.sleep(1)
        written = await read_topic(bench, app.changelog("leads"), app.partitions)
        try:
            found = learn_format(written, expected, app.partitions)
        except RuntimeError:
            if time.monotonic() > deadline:
                raise
            continue
        # The stall timer's levels reach the changelog a scan later than the events.
        if found["values_equal"] or time.monotonic() > deadline:
            break
    worker.stop()
    return {"startup": startup, "format": found, "samples": SAMPLES}


async def start_until_first_event(bench: Bench, worker: Worker, timeout: float, what: str,
                                  occurred_at: int | None = None) -> dict:  # fmt: skip
    """Start the worker and send it one event at once: the worker handles it once its tables are
    recovered, it has joined its group and its agents run. Seconds from the process start to that."""
    occurred_at = occurred_at or int(time.time() * 1000)
    probe = {"event_id": f"bench-start-{worker.port}", "type": "marketing.spend", "occurred_at": occurred_at,
             "payload": {"campaign": "bench-start", "amount": 1, "purpose": "acquisition"}}  # fmt: skip
    worker.start()
    await bench.produce(worker.app.input_topic, [(START_PROBE_KEY, orjson.dumps(probe), None)], 1, "start probe")
    bench.reporter.step(f"stall: starting a worker with {what}")
    up = ready = None
    deadline = worker.started_at + timeout
    while ready is None and time.monotonic() < deadline:
        metrics = await worker.metrics(bench.session)
        now = time.monotonic() - worker.started_at
        if metrics is not None:
            up = up or now
            ready = now if applied(metrics) >= 1 else None
        bench.reporter.update(0, f"stall: starting a worker with {what}: {now:,.0f} s")
        await asyncio.sleep(0.25)
    return {
        "seconds_to_metrics": round(up, 2) if up else None,
        "seconds_to_first_event": round(ready, 2) if ready else None,
        "complete": ready is not None,
        "waited_seconds": round(time.monotonic() - worker.started_at, 2),
    }


async def seed(bench: Bench, app: App, config, found: dict) -> dict:
    """`config.leads` open leads written to the leads changelog as the worker writes them."""
    rng = random.Random(5)
    now_ms = int(time.time() * 1000)
    templates = []
    for j in range(min(TEMPLATES, config.leads)):
        lead_id = f"bench-lead-{j:07d}"
        events = lead_events(lead_id, rng, now_ms)
        # Offsets of a few million events: read marks as large as a real backlog's.
        positions = [(partition_of(lead_id.encode(), app.partitions), 1_000_000 + n) for n in range(len(events))]
        lead = build_lead(lead_id, events, now_ms, positions)
        templates.append((lead_id.encode(), orjson.dumps(lead)))
    encode, partition_data = found["encode"], found["partition_data"]
    last_of: dict[int, tuple] = {}

    def records():
        for i in range(config.leads):
            template_id, value = templates[i % len(templates)]
            lead_id = f"bench-lead-{i:07d}"
            # Same-length ids, so the copy differs from its template only in the id.
            value = value.replace(template_id, lead_id.encode())
            partition = partition_of(partition_data(lead_id), app.partitions)
            last_of[partition] = (encode(lead_id), value, partition)
            yield last_of[partition]

    started = time.monotonic()
    await bench.produce(app.changelog("leads"), records(), config.leads, f"stall: writing {config.leads:,} leads")
    # Tansu reports a partition's end offset as the last batch's first offset + 1, and recovery reads up
    # to it: there, end each partition with a batch of one record (a lead written again, as it was).
    if bench.on_tansu:
        for record in last_of.values():
            await bench.produce(app.changelog("leads"), [record], 1, "stall: closing the partitions")
    stalled = sum(1 for _, value in templates if orjson.loads(value)["stall_level"])
    return {"leads": config.leads, "templates": len(templates), "stalled_share": round(stalled / len(templates), 4),
            "seconds": round(time.monotonic() - started, 1)}  # fmt: skip


def open_leads(metrics) -> float:
    return total(metrics, "crm_leads_open")


async def loop_stalls(bench: Bench, worker: Worker, stalls: list[float]) -> None:
    """Requests to a path the worker does not serve (answered at once when its event loop is free), one
    after another: one that takes long waited for something that held the loop, such as a stall scan."""
    while True:
        began = time.monotonic()
        # Only the time counts: a refused or failed request took as long as the loop made it take.
        with contextlib.suppress(aiohttp.ClientError, asyncio.TimeoutError):
            async with bench.session.get(f"{worker.url}/bench-loop-probe") as response:
                await response.read()
        took = time.monotonic() - began
        if took > LOOP_STALL_SECONDS:
            stalls.append(round(took, 3))
        await asyncio.sleep(0.02)


async def measure_scans(bench: Bench, worker: Worker, config, expected_open: int) -> dict:
    """Once a scan has counted every seeded lead as open: `scan_ticks` stall scan ticks, timed by the
    worker's scan histogram (_sum/_count), or, by a worker without one, by how long each held its event
    loop; and the worker's memory meanwhile."""
    bench.reporter.step("stall: waiting for the first full scan")
    first = await worker.wait_for(bench.session, lambda m: open_leads(m) >= expected_open, config.scan_timeout, 1)
    if first is None:
        last = await worker.metrics(bench.session)
        raise TimeoutError(f"no scan counted {expected_open:,} open leads within {config.scan_timeout} s "
                           f"(last: {open_leads(last) if last else 'no /metrics'})")  # fmt: skip
    histogram = any(name == f"{SCAN_METRIC}_count" for name, _ in first)
    bench.reporter.step(f"stall: {config.scan_ticks} scan ticks", total=config.scan_ticks)
    stalls: list[float] = []
    probe = asyncio.create_task(loop_stalls(bench, worker, stalls))
    rss = []
    last = first
    began = time.monotonic()
    while time.monotonic() - began < config.scan_timeout:
        await asyncio.sleep(config.scan_interval)
        rss.append(worker.memory_mib()["rss_mib"])
        last = (await worker.metrics(bench.session) or last) if histogram else last
        ticks = total(last, f"{SCAN_METRIC}_count") - total(first, f"{SCAN_METRIC}_count") if histogram else len(stalls)
        bench.reporter.update(ticks)
        if ticks >= config.scan_ticks:
            break
    probe.cancel()
    if histogram:
        seconds = total(last, f"{SCAN_METRIC}_sum") - total(first, f"{SCAN_METRIC}_sum")
        per_tick = round(seconds / ticks, 4) if ticks else None
    else:
        per_tick = statistics.median(stalls) if stalls else None
    return {
        "open_leads": int(open_leads(last)),
        "scan_interval_seconds": config.scan_interval,
        "ticks": int(ticks),
        "seconds_per_tick": per_tick,
        "method": f"{SCAN_METRIC}: (sum after − before) / (count after − before)" if histogram
        else f"median event-loop stall > {LOOP_STALL_SECONDS} s seen by HTTP requests (no {SCAN_METRIC})",
        "loop_stalls_seconds": stalls,
        "memory": {**worker.memory_mib(), "max_sampled_rss_mib": max(rss)},
    }


async def phase_stall(bench: Bench, config) -> dict:
    app = bench.app("stall", config.partitions)
    await bench.create_topic(app.input_topic, config.partitions)
    calibration = await calibrate(bench, app, config)
    found = calibration["format"]
    bench.reporter.log(f"changelog format: keys {found['key_encoding']}, partitioned by {found['partitioned_by']}, "
                       f"values equal to streams.leads: {found['values_equal']}")  # fmt: skip
    seeded = await seed(bench, app, config, found)
    expected_open = config.leads + SAMPLES

    # One data dir for both starts: the restart finds what the cold start wrote.
    env = {**worker_env(bench), "CRM_PULSE_STALL_SCAN_SECONDS": str(config.scan_interval),
           "CRM_PULSE_DATA_DIR": str(bench.workdir / f"{app.app_id}-data")}  # fmt: skip
    result = {
        "partitions": config.partitions,
        "store": env["CRM_PULSE_STORE"],
        "format_check": {k: v for k, v in found.items() if k not in ("encode", "partition_data")},
        "startup_empty": calibration["startup"],
        "seed": seeded,
        "cold_start": None,
        "stop": None,
        "restart": None,
        "scan": None,
    }
    worker = bench.worker(app, **env)
    cold = result["cold_start"] = await start_until_first_event(
        bench, worker, config.recovery_timeout, f"{config.leads:,} leads, empty data dir")  # fmt: skip
    if not recovered(bench, worker, cold, config, "cold start"):
        return result
    bench.reporter.step("stall: stopping the worker (SIGTERM)")
    began = time.monotonic()
    stop_process(worker.process, STOP_TIMEOUT)
    code = worker.process.returncode
    result["stop"] = {"seconds": round(time.monotonic() - began, 2), "returncode": code, "graceful": code != -9}
    if code == -9:
        bench.reporter.log(f"[red]the worker ignored SIGTERM for {STOP_TIMEOUT} s and was killed[/red]: "
                           "the restart recovers from a crash")  # fmt: skip

    worker = bench.worker(app, **env)
    restart = result["restart"] = await start_until_first_event(
        bench, worker, config.recovery_timeout, f"{config.leads:,} leads, kept data dir")  # fmt: skip
    if not recovered(bench, worker, restart, config, "restart"):
        return result
    scans = result["scan"] = await measure_scans(bench, worker, config, expected_open)
    bench.reporter.log(f"stall scan: {scans['seconds_per_tick']} s per tick, RSS {scans['memory']['rss_mib']} MiB")
    return result


def recovered(bench: Bench, worker: Worker, start: dict, config, what: str) -> bool:
    """Whether the start handled its first event; if not, the memory of the worker still recovering."""
    if start["complete"]:
        bench.reporter.log(f"{what} with {config.leads:,} leads: first event after {start['seconds_to_first_event']} s")
        return True
    start["memory"] = worker.memory_mib()
    bench.reporter.log(f"[red]no event handled within {config.recovery_timeout} s of the {what} with "
                       f"{config.leads:,} leads[/red] (/metrics: HTTP {worker.metrics_status})")  # fmt: skip
    return False
