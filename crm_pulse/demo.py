"""`crm-pulse demo`: embedded broker, a worker process and synthetic CRM traffic in compressed time,
with a live terminal summary of the KPIs the worker exports. Ctrl-C stops everything it started."""

from __future__ import annotations

import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

import orjson
from kafka import KafkaConsumer, KafkaProducer, TopicPartition
from prometheus_client.parser import text_string_to_metric_families
from rich.console import Console
from rich.live import Live
from rich.table import Table

from crm_pulse.broker import bind_error, client_security, dies_with_this_process, ensure_topics, free_port, start_embedded
from crm_pulse.config import Settings, worker_environment
from crm_pulse.generator import SyntheticCrm

# (sample name, label shown); windowed KPIs show their 30-day window.
SUMMARY = (
    ("crm_events_processed_total", "events processed"),
    ("crm_events_invalid_total", "events dead-lettered (one a minute on purpose)"),
    ("crm_leads_open", "open leads"),
    ("crm_leads_stalled", "stalled leads"),
    ("crm_alerts_emitted_total", "alerts emitted"),
    ("crm_stage_dwell_mean_seconds", "mean stage dwell, 30d (h)"),
    ("crm_win_rate_ratio", "win rate, 30d"),
    ("crm_churn_ratio", "churn, 30d"),
    ("crm_retention_ratio", "retention, 30d"),
    ("crm_customers_active", "active customers"),
)


def scrape(url: str) -> dict[str, list]:
    with urllib.request.urlopen(url, timeout=2) as response:
        text = response.read().decode()
    return {
        family.name: [(sample.name, sample.labels, sample.value) for sample in family.samples]
        for family in text_string_to_metric_families(text)
    }


def summarise(metrics: dict[str, list], name: str) -> float | None:
    """Sum of a metric's samples in the 30d window; ratios and means are averaged (over stages)."""
    family = name.removesuffix("_total")
    samples = [
        value for sample, labels, value in metrics.get(family, [])
        if sample == name and labels.get("window", "30d") == "30d"
    ]  # fmt: skip
    if not samples:
        return None
    if name.endswith(("_ratio", "_seconds")):
        value = sum(samples) / len(samples)
        return value / 3600 if name.endswith("_seconds") else value
    return sum(samples)


def traffic(settings: Settings, speed: float, stop: threading.Event) -> None:
    """Publish the synthetic CRM in compressed time, plus one garbage message a minute for the DLQ."""
    producer = KafkaProducer(bootstrap_servers=settings.bootstrap_servers, linger_ms=20, **client_security(settings))
    sim_start = int(time.time() * 1000)
    crm = SyntheticCrm(sim_start)
    real_start = time.monotonic()
    last_garbage = 0.0
    while not stop.is_set():
        elapsed = time.monotonic() - real_start
        for event in crm.until(sim_start + int(elapsed * speed * 1000)):
            producer.send(settings.input_topic, key=crm.key(event), value=orjson.dumps(event))
        if elapsed - last_garbage >= 60 or not last_garbage:
            producer.send(settings.input_topic, key=b"garbage", value=b"{not json")
            last_garbage = elapsed or 1e-9
        producer.flush(timeout=5)
        stop.wait(0.2)
    producer.close(timeout=5)


def count_alerts(settings: Settings, counts: dict, stop: threading.Event) -> None:
    consumer = KafkaConsumer(bootstrap_servers=settings.bootstrap_servers, **client_security(settings))
    consumer.assign([TopicPartition(settings.alerts_topic, p) for p in range(settings.partitions)])
    consumer.seek_to_beginning()
    while not stop.is_set():
        for records in consumer.poll(timeout_ms=500).values():
            for record in records:
                alert = orjson.loads(record.value)
                counts[alert["type"]] = counts.get(alert["type"], 0) + 1
    consumer.close()


def render(metrics: dict, alerts: dict, url: str) -> Table:
    table = Table(title=f"crm-pulse demo — metrics at {url} — Ctrl-C to stop", show_header=True)
    table.add_column("KPI")
    table.add_column("value", justify="right")
    for name, label in SUMMARY:
        value = summarise(metrics, name)
        table.add_row(label, "–" if value is None else f"{value:,.3f}".rstrip("0").rstrip("."))
    for kind, n in sorted(alerts.items()):
        table.add_row(f"on crm-alerts: {kind}", str(n))
    return table


def _interrupt(signum, frame):
    raise KeyboardInterrupt


def run_demo(settings: Settings, speed: float, seconds: float | None) -> int:
    # Ctrl-C, or a supervisor's SIGTERM: clean up. SIGINT explicitly too, since a process started in the
    # background of a non-interactive shell inherits it ignored.
    signal.signal(signal.SIGINT, _interrupt)
    signal.signal(signal.SIGTERM, _interrupt)
    console = Console()
    kind = settings.embedded_broker
    name = {"tansu": "Tansu", "kafka": "Apache Kafka"}[kind]
    if kind == "kafka":
        console.print("starting the embedded Apache Kafka broker (the first run fetches its jars with Maven)…")
    port = settings.metrics_port
    if bind_error(settings.metrics_host, port) is not None:  # another demo, say: take a free port instead
        port = free_port()
        console.print(f"port {settings.metrics_port} is taken: the worker serves on {port} instead")
    broker = start_embedded(kind)
    settings = settings.model_copy(update={"broker": broker.url, "broker_kind": kind, "clock": "event", "metrics_port": port})
    ensure_topics(settings)
    base = f"http://{settings.metrics_host}:{port}"
    url = f"{base}/metrics"
    console.print(f"embedded {name} broker at [bold]{broker.url}[/]; starting the worker…")
    chosen = settings.model_fields_set  # what the user set: the demo's own defaults give way to it
    env = worker_environment(
        broker=broker.url, broker_kind=kind, clock="event", metrics_port=str(port),
        stall_scan_seconds="1", log_level="warning",
        # Synthetic events arrive in order: a short grace period lets stall checks follow closely.
        grace_seconds=str(settings.grace_seconds if "grace_seconds" in chosen else 21600),
        # Synthetic leads spend 0.3-1.8 days per stage: tight thresholds make some rot within the minute.
        stall_stage_days=orjson.dumps(settings.stall_stage_days if "stall_stage_days" in chosen
                                      else {"new": 1.5, "qualified": 2, "proposal": 2, "negotiation": 2.5}).decode(),
        data_dir=tempfile.mkdtemp(prefix="crm-pulse-demo-"),
    )  # fmt: skip
    # Own session: on Ctrl-C the demo stops the worker first, then the broker it still needs to shut down.
    worker = subprocess.Popen([sys.executable, "-m", "crm_pulse.cli", "worker"], env=env, start_new_session=True,
                              **dies_with_this_process())  # fmt: skip
    stop = threading.Event()
    alerts: dict[str, int] = {}
    threads = [
        threading.Thread(target=traffic, args=(settings, speed, stop), daemon=True),
        threading.Thread(target=count_alerts, args=(settings, alerts, stop), daemon=True),
    ]
    for thread in threads:
        thread.start()
    script = Path(sys.executable).with_name("crm-pulse")  # the one installed beside this Python (the venv's)
    command = str(script) if script.exists() else f"{sys.executable} -m crm_pulse.cli"
    topic = "" if settings.alerts_topic == Settings.model_fields["alerts_topic"].default else f"CRM_PULSE_ALERTS_TOPIC={settings.alerts_topic} "
    console.print(
        f"worker pid {worker.pid}\n"
        f"  Prometheus metrics  [bold]{url}[/]\n"
        f"  KPIs as JSON        [bold]{base}/kpis[/]  (and {base}/leads/stalled)\n"
        f"  alerts, in another terminal:\n"
        f"    CRM_PULSE_BROKER={broker.url} {topic}{command} alerts tail --from-beginning\n"
        f"Time is simulated: {speed / 3600:g} h of CRM events per real second, and the worker's clock is the events' "
        f"own (\"now\" in /kpis is simulated time). One malformed message a minute is sent on purpose: it is "
        f"dead-lettered.",
        highlight=False, soft_wrap=True,
    )
    deadline = None if seconds is None else time.monotonic() + seconds
    try:
        with Live(console=console, refresh_per_second=1) as live:
            while deadline is None or time.monotonic() < deadline:
                if worker.poll() is not None:
                    console.print(f"[red]worker exited with {worker.returncode}[/]")
                    return 1
                try:
                    live.update(render(scrape(url), alerts, url))
                except OSError:
                    pass  # not serving yet
                time.sleep(2)
    except KeyboardInterrupt:
        pass
    finally:
        stop.set()
        for thread in threads:
            thread.join(5)
        worker.send_signal(signal.SIGTERM)
        try:
            worker.wait(20)
        except subprocess.TimeoutExpired:
            worker.kill()
        broker.stop()
        console.print("stopped the traffic generator, the worker and the embedded broker")
    return 0
