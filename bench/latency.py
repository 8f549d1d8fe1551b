"""End-to-end latency at a steady input rate: event produced → alert on the alerts topic, and event
produced → its value visible on /metrics.

The input is the synthetic CRM's traffic sent at a fixed rate, with probe events in its place now and then:

- alert probes: a lead created at the stream's current event time, and once the stream's event time is
  3 days further (past the 2-day threshold of stage "new"), a `lead.activity` for it. That activity
  reveals the stall and clears it at once, so it raises a `lead.stall_cleared` alert: latency = the
  alert's arrival at a consumer of the alerts topic − the moment the activity was handed to the producer.
  (The `lead.stalled` may come earlier from the stall timer; the clearing can only come from the event.)
- gauge probes: a `marketing.spend` of 1 for campaign "bench-probe", so probe k is visible once
  `crm_campaign_spend{campaign="bench-probe",window="all"}` reaches k. /metrics is scraped while a probe
  is outstanding; latency = the end of the first scrape showing it − the moment it was handed to the
  producer, an overestimate by at most one pause between scrapes plus a scrape. The pause is `gauge_poll`,
  longer when that would keep the worker busy with scrapes (4 × the last scrape) or when the probe has
  waited long already (10% of its age): polling must not slow down the worker it measures.
"""

from __future__ import annotations

import asyncio
import itertools
import time

import orjson
from aiokafka import AIOKafkaConsumer, TopicPartition

from bench.harness import DAY_MS, Bench, applied, percentile, synthetic_events, total
from crm_pulse.generator import SyntheticCrm

PROBE_GAP_MS = 3 * DAY_MS
GAUGE = ("crm_campaign_spend", {"campaign": "bench-probe", "window": "all"})
# The synthetic CRM's defaults (24 leads a day): at 1,000 events/s its event time moves ~2.7 days a
# second, so an alert probe's two events are ~1 s apart.
CRM = {"seed": 11}


class Probe:
    def __init__(self, kind: str, n: int):
        self.kind, self.n = kind, n  # for a gauge probe, n is also the gauge's value once it is in
        self.lead_id = f"bench-probe-{n:06d}"
        self.created_at_ms: int | None = None  # alert probes: event time of the lead's creation
        self.sent_at: float | None = None  # wall clock when the measured event was handed to the producer
        self.delivery = None  # the producer's future for the measured event
        self.seen_at: float | None = None
        self.alert_timestamp_ms: int | None = None


class Feed:
    """Chooses each next input event: a due probe event, else the next background event."""

    def __init__(self, background, alert_every: float, gauge_every: float):
        self.background = background
        self.now_ms = None  # the event time of the latest background event sent
        self.alert_every, self.gauge_every = alert_every, gauge_every
        self.next_alert = self.next_gauge = 0.0
        self.alert_numbers, self.gauge_numbers = itertools.count(1), itertools.count(1)
        self.waiting: list[Probe] = []  # alert probes created, their activity not sent yet
        self.probes: list[Probe] = []
        self.alert_probes: dict[str, Probe] = {}
        self.sent = 0

    def next(self, accept_probes: bool) -> tuple[tuple[bytes, bytes], Probe | None]:
        now = time.monotonic()
        if self.waiting and self.now_ms - self.waiting[0].created_at_ms >= PROBE_GAP_MS:
            probe = self.waiting.pop(0)
            return self._lead_event(probe, "lead.activity", {"kind": "call", "direction": "outbound"}), probe
        if accept_probes and self.now_ms is not None and now >= self.next_alert:
            self.next_alert = now + self.alert_every
            probe = Probe("alert", next(self.alert_numbers))
            probe.created_at_ms = self.now_ms
            self.waiting.append(probe)
            self.probes.append(probe)
            self.alert_probes[probe.lead_id] = probe
            return self._lead_event(probe, "lead.created", {"source": "web", "stage": "new"}), None
        if accept_probes and self.now_ms is not None and now >= self.next_gauge:
            self.next_gauge = now + self.gauge_every
            probe = Probe("gauge", next(self.gauge_numbers))
            self.probes.append(probe)
            event = {"event_id": f"bench-gauge-{probe.n:06d}", "type": "marketing.spend",
                     "occurred_at": self.now_ms, "payload": {"campaign": GAUGE[1]["campaign"], "amount": 1,
                     "purpose": "acquisition"}}  # fmt: skip
            return (b"bench-probe", orjson.dumps(event)), probe
        key, value, at = next(self.background)
        self.now_ms = at
        return (key, value), None

    def _lead_event(self, probe: Probe, kind: str, payload: dict) -> tuple[bytes, bytes]:
        event = {"event_id": f"{probe.lead_id}-{kind}", "type": kind, "occurred_at": self.now_ms,
                 "lead_id": probe.lead_id, "rep_id": "rep-probe", "payload": payload}  # fmt: skip
        return probe.lead_id.encode(), orjson.dumps(event)


async def send_paced(producer, topic: str, feed: Feed, rate: float, seconds: float, reporter) -> float:
    """Send `rate` events a second for `seconds`; probes stop early enough for their activity to follow."""
    start = time.monotonic()
    sent = 0
    while (elapsed := time.monotonic() - start) < seconds:
        for _ in range(int(elapsed * rate) + 1 - sent):
            (key, value), probe = feed.next(accept_probes=elapsed < seconds - 2)
            if probe:
                probe.sent_at = time.time()
            future = await producer.send(topic, key=key, value=value)
            if probe:
                probe.delivery = future
            sent += 1
        reporter.update(elapsed)
        await asyncio.sleep(0.002)
    feed.sent += sent
    return sent / (time.monotonic() - start)


async def wait_for_probes(reporter, step: str, measured: list[Probe], drain: float) -> None:
    """Until every measured probe has been seen, or `drain` seconds."""
    reporter.step(step, total=len(measured))
    deadline = time.monotonic() + drain
    while time.monotonic() < deadline and not all(p.seen_at for p in measured):
        reporter.update(sum(1 for p in measured if p.seen_at))
        await asyncio.sleep(0.2)


async def read_alerts(consumer: AIOKafkaConsumer, probes: dict[str, Probe]) -> None:
    while True:
        batch = await consumer.getmany(timeout_ms=100)
        arrived = time.time()
        for record in (r for records in batch.values() for r in records):
            alert = orjson.loads(record.value)
            probe = probes.get(alert.get("lead_id"))
            if probe and alert.get("type") == "lead.stall_cleared" and probe.seen_at is None:
                probe.seen_at, probe.alert_timestamp_ms = arrived, record.timestamp


async def poll_gauge(bench: Bench, worker, feed: Feed, poll: float, scrapes: list[float]) -> None:
    while True:
        outstanding = [p for p in feed.probes if p.kind == "gauge" and p.sent_at and p.seen_at is None]
        pause = poll
        if outstanding:
            began = time.monotonic()
            metrics = await worker.metrics(bench.session)
            scraped = time.time()
            scrapes.append(time.monotonic() - began)
            value = total(metrics, GAUGE[0], **GAUGE[1]) if metrics else 0
            for probe in outstanding:
                if value >= probe.n:
                    probe.seen_at = scraped
            pause = max(poll, 4 * scrapes[-1], 0.1 * (scraped - outstanding[0].sent_at))
        await asyncio.sleep(pause)


async def hop_timestamps(bench: Bench, topic: str, partitions: int, probes: dict[str, Probe]) -> dict[str, int]:
    """Per alert probe, the record timestamp of the `ingest` message that carried its activity to the lead
    agent (set by the worker's producer when `ingest` sent it), read back once the run is over."""
    sent_at: dict[str, int] = {}
    async for record in bench.read_topic(topic, partitions):
        for key, _source, _offset, event in orjson.loads(record.value)["events"]:
            if key in probes and event["type"] == "lead.activity":
                sent_at[key] = record.timestamp
    return sent_at


def split_by_hop(alerts: list[Probe], relayed_at: dict[str, int], input_at: dict[str, int]) -> dict:
    """Alert latency by record timestamps, cut where `ingest` hands the event to the lead agent."""
    hops = {"input_to_ingest_output_ms": [], "ingest_output_to_alert_ms": []}
    for probe in alerts:
        if probe.alert_timestamp_ms and probe.lead_id in relayed_at:
            hops["input_to_ingest_output_ms"].append(relayed_at[probe.lead_id] - input_at[probe.lead_id])
            hops["ingest_output_to_alert_ms"].append(probe.alert_timestamp_ms - relayed_at[probe.lead_id])
    return {"method": "record timestamps: probe (bench producer), its event on <app id>-lead-events "
                      "(ingest's producer), its alert (the lead agent's producer)",
            **{f"{hop}_p{q}": percentile(values, q) for hop, values in hops.items() for q in (50, 99)}}


def paced_run(config, achieved: float, feed: Feed, backlog: int, rate: float | None = None) -> dict:
    """What a paced latency run sent (at `rate`, else the configured one), and what was still queued when
    sending ended."""
    return {
        "rate_target": rate or config.latency_rate,
        "rate_achieved": round(achieved, 1),
        "seconds": config.latency_seconds,
        "events_sent": feed.sent,
        "backlog_at_end_of_sending": int(backlog),
    }


def summarize(probes: list[Probe], ended_at: float) -> dict:
    """Percentiles over every probe; one never seen counts as the time waited for it, a lower bound, and
    a percentile that such a probe can reach is flagged as a lower bound too."""
    seen = [(p.seen_at - p.sent_at) * 1000 for p in probes if p.seen_at]
    waited = [(ended_at - p.sent_at) * 1000 for p in probes if not p.seen_at]
    out = {"probes": len(probes), "seen": len(seen)}
    for q in (50, 99):
        value = percentile(seen + waited, q)
        out[f"p{q}_ms"] = round(value, 1) if value is not None else None
        out[f"p{q}_is_lower_bound"] = any(w <= value for w in waited) if value is not None else False
    out["max_ms"] = round(max(seen + waited), 1) if probes else None
    return out


async def phase_latency(bench: Bench, config) -> dict:
    """At the live rate, then (`peak`), on a fresh worker, at the peak rate."""
    live = await measure(bench, config, config.latency_rate, "latency")
    if config.latency_peak_rate:
        live["peak"] = await measure(bench, config, config.latency_peak_rate, "latency-peak")
    return live


async def measure(bench: Bench, config, rate: float, name: str) -> dict:
    app = bench.app(name, config.partitions)
    for topic in (app.input_topic, app.alerts_topic):
        await bench.create_topic(topic, config.partitions)
    worker = bench.worker(app, CRM_PULSE_STALL_SCAN_SECONDS=str(config.latency_scan_seconds)).start()
    bench.reporter.step("latency: starting the worker")
    if await worker.wait_for(bench.session, lambda m: True, timeout=120) is None:
        raise TimeoutError(f"the worker served no /metrics within 120 s (HTTP {worker.metrics_status})")

    count = int(rate * (config.latency_seconds + config.latency_warmup_seconds)) + 10_000
    background = ((SyntheticCrm.key(e), orjson.dumps(e), e["occurred_at"]) for e in synthetic_events(count, **CRM))
    feed = Feed(background, 1 / config.alert_probes_per_s, 1 / config.gauge_probes_per_s)
    producer = await bench.producer(linger_ms=0)
    # Tansu holds a fetch its full wait though records arrive meanwhile; Kafka answers as they arrive.
    consumer = AIOKafkaConsumer(bootstrap_servers=bench.bootstrap, enable_auto_commit=False,
                                **({"fetch_max_wait_ms": 10} if bench.on_tansu else {}))  # fmt: skip
    await consumer.start()
    consumer.assign([TopicPartition(app.alerts_topic, p) for p in range(config.partitions)])
    await consumer.seek_to_beginning()
    scrapes: list[float] = []
    tasks = [asyncio.create_task(read_alerts(consumer, feed.alert_probes)),
             asyncio.create_task(poll_gauge(bench, worker, feed, config.gauge_poll, scrapes))]  # fmt: skip
    try:
        # Warm-up: group join, topic metadata and the first alert are paid for before the measurement.
        bench.reporter.step("latency: warm-up", total=config.latency_warmup_seconds)
        await send_paced(producer, app.input_topic, feed, rate, config.latency_warmup_seconds, bench.reporter)
        bench.reporter.step("latency: draining the warm-up")
        drained = await worker.wait_for(
            bench.session, lambda m: applied(m) >= feed.sent and all(p.seen_at for p in feed.probes if p.sent_at),
            timeout=config.latency_drain, every=1,
        )  # fmt: skip
        if drained is None:
            unseen = [p.kind for p in feed.probes if p.sent_at and not p.seen_at]
            raise TimeoutError(f"the worker did not catch up with the warm-up within {config.latency_drain} s: "
                               f"{applied(await worker.metrics(bench.session)):,.0f} of {feed.sent:,} events done, "
                               f"probes unseen: {unseen}")  # fmt: skip

        bench.reporter.step(f"latency: {rate:,.0f} events/s", total=config.latency_seconds)
        first_measured = len(feed.probes)
        achieved = await send_paced(producer, app.input_topic, feed, rate, config.latency_seconds, bench.reporter)
        at_end = await worker.metrics(bench.session)
        backlog = feed.sent - applied(at_end)

        measured = [p for p in feed.probes[first_measured:] if p.sent_at]
        await wait_for_probes(bench.reporter, "latency: waiting for the last probes", measured, config.latency_drain)
        ended_at = time.time()
    finally:
        for task in tasks:
            task.cancel()
        await consumer.stop()
        await producer.stop()

    alerts = [p for p in measured if p.kind == "alert"]
    gauges = [p for p in measured if p.kind == "gauge"]
    input_at = {p.lead_id: (await p.delivery).timestamp for p in alerts}
    by_timestamps = [p.alert_timestamp_ms - input_at[p.lead_id] for p in alerts if p.alert_timestamp_ms]
    relayed_at = await hop_timestamps(bench, f"{app.app_id}-lead-events", config.partitions, feed.alert_probes)
    return {
        **paced_run(config, achieved, feed, backlog, rate),
        "alert": summarize(alerts, ended_at),
        "alert_by_record_timestamps": {
            "method": "alert record timestamp − probe record timestamp (both set by their producers, ms)",
            "p50_ms": percentile(by_timestamps, 50), "p99_ms": percentile(by_timestamps, 99),
        },  # fmt: skip
        "alert_by_hop": split_by_hop(alerts, relayed_at, input_at),
        "gauge": summarize(gauges, ended_at),
        "gauge_poll_seconds": config.gauge_poll,
        "scrape_seconds_mean": round(sum(scrapes) / len(scrapes), 4) if scrapes else None,
        "scrape_seconds_max": round(max(scrapes), 4) if scrapes else None,
        "memory": worker.memory_mib(),
    }
