"""The peer phase: the same lead job (stage dwell, win rate, stall alerts keyed by rep) on Quix Streams
(bench/peers/quix_job.py), measured beside the project's pipeline and the bare Faust agent on the same
broker, the same events and the same latency input, in one run.

- Throughput: the throughput phase's events, read by the bare Faust agent, the Quix job (as is, then
  validating each event as `ingest` does) and one crm-pulse worker in turn; the Quix job's rate is its input
  events counted per second from its first to its last, as the bare agent's. Its KPI totals must then equal
  a batch computation over the same events (won, lost, and count and sum of each stage's dwell): a mismatch
  fails the phase.
- Latency: the latency phase's input and alert probes, through a crm-pulse worker and then through the Quix
  job; event → alert runs from handing a probe's activity to the producer to its `lead.stall_cleared`
  arriving at a consumer of the alerts topic.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time

import orjson
from aiokafka import AIOKafkaConsumer, TopicPartition

from bench.harness import DAY_MS, REPO, Bench, memory_mib, rate, stop_process, synthetic_events
from bench.latency import CRM as LATENCY_CRM
from bench.latency import Feed, paced_run, phase_latency, read_alerts, send_paced, summarize, wait_for_probes
from bench.peers.lead_job import batch, win_rate
from bench.throughput import bare_faust, events, pipeline
from crm_pulse.generator import SyntheticCrm

# On Tansu, which holds a fetch its full wait, the Quix consumer asks for the worker's wait there (20 ms);
# on Kafka both keep their client's default.
FETCH_MAX_WAIT_MS = "20"


async def create_topic(bench: Bench, name: str, partitions: int) -> None:
    """Quix derives its changelog and repartition topics' retention from the input topic's `retention.ms`,
    which Tansu reports only when it was set at creation: there it is set to Kafka's default, 7 days."""
    configs = {"retention.ms": str(7 * DAY_MS)} if bench.on_tansu else None
    await bench.create_topic(name, partitions, configs=configs)


class QuixJob:
    """One `python -m bench.peers.quix_job` process, seen through its result file."""

    def __init__(self, bench: Bench, label: str, topic: str, alerts_topic: str, expected: int,
                 work: str = "fold"):  # fmt: skip
        self.app_id = bench.app(label, 0).app_id
        self.result = bench.workdir / f"{self.app_id}.json"
        env = {**os.environ, "BENCH_BOOTSTRAP": bench.bootstrap, "BENCH_APP_ID": self.app_id, "BENCH_TOPIC": topic,
               "BENCH_ALERTS_TOPIC": alerts_topic, "BENCH_EVENTS": str(expected),
               "BENCH_STATE_DIR": str(bench.workdir / self.app_id), "BENCH_RESULT": str(self.result),
               "BENCH_WORK": work, "BENCH_FETCH_MAX_WAIT_MS": FETCH_MAX_WAIT_MS if bench.on_tansu else ""}  # fmt: skip
        self.log_path = bench.workdir / f"{self.app_id}.log"
        with open(self.log_path, "wb") as log:
            self.process = subprocess.Popen([sys.executable, "-m", "bench.peers.quix_job"], env=env, cwd=REPO,
                                            stdout=log, stderr=log)  # fmt: skip

    def seen(self) -> dict:
        if self.process.poll() is not None:
            raise RuntimeError(f"the Quix job exited with {self.process.returncode}:\n"
                               f"{self.log_path.read_text(errors='replace')[-2000:]}")  # fmt: skip
        if not self.result.exists():
            return {"events": 0, "first_at": None, "last_at": None, "complete": False, "kpis": {}}
        return orjson.loads(self.result.read_bytes())

    def stop(self) -> None:
        stop_process(self.process)


async def quix_throughput(bench: Bench, topic: str, alerts_topic: str, expected: int, want: dict,
                          timeout: float, work: str = "fold") -> dict:  # fmt: skip
    job = QuixJob(bench, f"quix-{work}", topic, alerts_topic, expected, work)
    bench.reporter.step(f"Quix Streams job ({work})", total=expected)
    deadline, startup_deadline = None, time.monotonic() + 120
    try:
        seen = job.seen()
        while not seen["complete"]:
            await asyncio.sleep(0.5)
            seen = job.seen()
            bench.reporter.update(seen["events"])
            now = time.monotonic()
            if seen["first_at"] and deadline is None:
                deadline = now + timeout  # from the first event, as for the other contenders
            if (deadline and now > deadline) or (deadline is None and now > startup_deadline):
                break
        # The KPI totals come through a repartition topic, after the last input event.
        bench.reporter.step("Quix Streams job: its KPI totals")
        settle = time.monotonic() + 60
        while seen["complete"] and seen["kpis"] != want and time.monotonic() < settle:
            await asyncio.sleep(0.5)
            seen = job.seen()
        settled_after = round(time.time() - seen["last_at"], 1) if seen["kpis"] == want else None
        memory = memory_mib(job.process.pid)
    finally:
        job.stop()
    if seen["complete"] and seen["kpis"] != want:
        raise AssertionError(f"the Quix job's KPI totals {seen['kpis']} differ from the batch computation's {want}")
    seconds = (seen["last_at"] - seen["first_at"]) if seen["first_at"] else 0
    return {"events": seen["events"], "seconds": round(seconds, 3), "complete": seen["complete"],
            "events_per_s": rate(seen["events"] - 1, seconds), "kpis_match_batch": seen["kpis"] == want,
            "kpis_settled_seconds_after_last_event": settled_after, "win_rate": win_rate(seen["kpis"]),
            "memory": memory}  # fmt: skip


async def quix_latency(bench: Bench, config) -> dict:
    """The latency phase's measurement of event → alert, with the Quix job in the worker's place."""
    topic, alerts_topic = f"{bench.tag}-quix-latency-events", f"{bench.tag}-quix-latency-alerts"
    for name in (topic, alerts_topic):
        await create_topic(bench, name, config.partitions)
    job = QuixJob(bench, "quix-latency", topic, alerts_topic, 0)
    count = int(config.latency_rate * (config.latency_seconds + config.latency_warmup_seconds)) + 10_000
    background = ((SyntheticCrm.key(e), orjson.dumps(e), e["occurred_at"])
                  for e in synthetic_events(count, **LATENCY_CRM))  # fmt: skip
    feed = Feed(background, 1 / config.alert_probes_per_s, 1 / config.gauge_probes_per_s)
    producer = await bench.producer(linger_ms=0)
    consumer = AIOKafkaConsumer(bootstrap_servers=bench.bootstrap, enable_auto_commit=False,
                                **({"fetch_max_wait_ms": 10} if bench.on_tansu else {}))  # fmt: skip
    await consumer.start()
    consumer.assign([TopicPartition(alerts_topic, p) for p in range(config.partitions)])
    await consumer.seek_to_beginning()
    reader = asyncio.create_task(read_alerts(consumer, feed.alert_probes))
    try:
        bench.reporter.step("Quix latency: warm-up", total=config.latency_warmup_seconds)
        await send_paced(producer, topic, feed, config.latency_rate, config.latency_warmup_seconds, bench.reporter)
        bench.reporter.step("Quix latency: draining the warm-up")
        deadline = time.monotonic() + config.latency_drain
        alert_probes = [p for p in feed.probes if p.kind == "alert"]
        while job.seen()["events"] < feed.sent or not all(p.seen_at for p in alert_probes if p.sent_at):
            if time.monotonic() > deadline:
                raise TimeoutError(f"the Quix job did not catch up with the warm-up within {config.latency_drain} s")
            await asyncio.sleep(0.5)

        bench.reporter.step(f"Quix latency: {config.latency_rate:,.0f} events/s", total=config.latency_seconds)
        first_measured = len(feed.probes)
        achieved = await send_paced(producer, topic, feed, config.latency_rate, config.latency_seconds,
                                    bench.reporter)  # fmt: skip
        backlog = feed.sent - job.seen()["events"]
        measured = [p for p in feed.probes[first_measured:] if p.sent_at and p.kind == "alert"]
        await wait_for_probes(bench.reporter, "Quix latency: waiting for the last probes", measured,
                              config.latency_drain)  # fmt: skip
        ended_at = time.time()
        memory = memory_mib(job.process.pid)
    finally:
        reader.cancel()
        job.stop()
        await consumer.stop()
        await producer.stop()
    # No split by record timestamps as the latency phase's: Quix gives an output record its input's timestamp.
    return {
        **paced_run(config, achieved, feed, backlog),
        "alert": summarize(measured, ended_at),
        "memory": memory,
    }


def ratio(a: float | None, b: float | None, digits: int = 3) -> float | None:
    return round(a / b, digits) if a and b else None


async def phase_peer(bench: Bench, config) -> dict:
    records = events(config.throughput_events)
    want = batch(orjson.loads(value) for _key, value, _partition in records)
    topic, alerts_topic = f"{bench.tag}-peer-events", f"{bench.tag}-peer-alerts"
    for name in (topic, alerts_topic):
        await create_topic(bench, name, config.partitions)
    await bench.produce(topic, records, len(records), "peer: producing the events")
    bare = await bare_faust(bench, topic, config.partitions, len(records), config.throughput_timeout)
    bench.reporter.log(f"bare Faust: {bare['events_per_s'] or 0:,.0f} events/s")
    quix = await quix_throughput(bench, topic, alerts_topic, len(records), want, config.throughput_timeout)
    bench.reporter.log(f"Quix Streams: {quix['events_per_s'] or 0:,.0f} events/s, KPI totals as the batch's: "
                       f"{quix['kpis_match_batch']}")  # fmt: skip
    validating = await quix_throughput(bench, topic, alerts_topic, len(records), want, config.throughput_timeout,
                                       "validate")  # fmt: skip
    bench.reporter.log(f"Quix Streams validating: {validating['events_per_s'] or 0:,.0f} events/s")
    full = await pipeline(bench, records, 1, config.partitions, config.throughput_timeout, "pipeline")
    bench.reporter.log(f"pipeline: {full['events_per_s'] or 0:,.0f} events/s")
    for worker in bench.workers:
        worker.stop()  # idle, but the latency runs get the cores to themselves

    project_latency = await phase_latency(bench, config)
    for worker in bench.workers:
        worker.stop()
    bench.reporter.log(f"pipeline: event → alert p99 {project_latency['alert']['p99_ms']} ms")
    peer_latency = await quix_latency(bench, config)
    bench.reporter.log(f"Quix Streams: event → alert p99 {peer_latency['alert']['p99_ms']} ms")

    quix_rate, pipeline_rate, bare_rate = quix["events_per_s"], full["events_per_s"], bare["events_per_s"]
    validating_rate = validating["events_per_s"]
    alert = {name: latency["alert"] for name, latency in (("pipeline", project_latency), ("quix", peer_latency))}
    figures = {
        "quix_events_per_s": quix_rate,
        "pipeline_events_per_s": pipeline_rate,
        "bare_faust_events_per_s": bare_rate,
        "quix_to_bare_faust_ratio": ratio(quix_rate, bare_rate),
        "pipeline_to_quix_ratio": ratio(pipeline_rate, quix_rate),
        "pipeline_to_bare_faust_ratio": ratio(pipeline_rate, bare_rate),
        "quix_validating_events_per_s": validating_rate,
        "quix_validating_to_bare_faust_ratio": ratio(validating_rate, bare_rate),
        "pipeline_to_quix_validating_ratio": ratio(pipeline_rate, validating_rate),
        **{f"{name}_event_to_alert_p{q}_ms": alert[name][f"p{q}_ms"] for name in alert for q in (50, 99)},
        "pipeline_to_quix_alert_p99_ratio": ratio(alert["pipeline"]["p99_ms"], alert["quix"]["p99_ms"]),
        "quix_kpis_match_batch": quix["kpis_match_batch"] and validating["kpis_match_batch"],
    }
    lower_bounds = [f"{name}_event_to_alert_p{q}_ms" for name in alert for q in (50, 99)
                    if alert[name][f"p{q}_is_lower_bound"]]  # fmt: skip
    return {"events": len(records), "partitions": config.partitions, "figures": figures,
            "lower_bounds": lower_bounds, "batch_kpis": want, "bare_faust": bare, "quix": quix,
            "quix_validating": validating, "pipeline": full, "pipeline_latency": project_latency,
            "quix_latency": peer_latency}  # fmt: skip
