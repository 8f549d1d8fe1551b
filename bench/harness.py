"""What every phase uses: an embedded broker (Tansu or Apache Kafka), worker processes seen only from
outside (environment, `/metrics`, `/proc`), topics, producing, synthetic events and the progress display."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import math
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import AsyncIterator, Callable, Iterable, Iterator

import aiohttp
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRecord, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import GroupCoordinatorNotAvailableError
from prometheus_client.parser import text_string_to_metric_families
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

from crm_pulse.broker import free_port, start_embedded
from crm_pulse.generator import SyntheticCrm

START_MS = 1_767_225_600_000  # 2026-01-01T00:00:00Z: the synthetic CRM's first day
DAY_MS = 86_400_000
REPO = Path(__file__).resolve().parent.parent

Metrics = dict[tuple[str, frozenset], float]


class Reporter:
    """A rich progress display: one bar for the phases, one for the current step."""

    def __init__(self, phases: int):
        self.console = Console()
        self.progress = Progress(
            SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
            TimeElapsedColumn(), console=self.console, refresh_per_second=4,
        )  # fmt: skip
        self.phases = self.progress.add_task("phases", total=phases)
        self.current = self.progress.add_task("", total=None)

    def __enter__(self) -> "Reporter":
        self.progress.start()
        return self

    def __exit__(self, *exc) -> None:
        self.progress.stop()

    def step(self, description: str, total: float | None = None) -> None:
        self.progress.reset(self.current, total=total, description=description)

    def update(self, completed: float, description: str | None = None) -> None:
        fields = {"description": description} if description else {}
        self.progress.update(self.current, completed=completed, **fields)

    def phase_done(self) -> None:
        self.progress.advance(self.phases)

    def log(self, message: str) -> None:
        self.progress.console.log(message)


@dataclass(frozen=True)
class App:
    """One crm-pulse application: its own app id (consumer group, internal topics) and own topics."""

    app_id: str
    partitions: int

    @property
    def input_topic(self) -> str:
        return f"{self.app_id}-events"

    @property
    def alerts_topic(self) -> str:
        return f"{self.app_id}-alerts"

    @property
    def dlq_topic(self) -> str:
        return f"{self.app_id}-dlq"

    def changelog(self, table: str) -> str:
        return f"{self.app_id}-{table}-changelog"


class Worker:
    """One `crm-pulse worker` process (python -m crm_pulse.cli worker), configured only by environment; or,
    with `command` "gateway", the webhook gateway of the app's topics."""

    def __init__(self, broker_url: str, app: App, workdir: Path, source: Path, command: str = "worker",
                 **overrides: str):  # fmt: skip
        self.app, self.source, self.command = app, source, command
        self.port = free_port()
        self.name = f"{app.app_id}-w{self.port}"
        self.log_path = workdir / f"{self.name}.log"
        # Inherited CRM_PULSE_* settings would make the figures depend on the shell they were run from.
        inherited = {k: v for k, v in os.environ.items() if not k.startswith("CRM_PULSE_")}
        self.env = {
            **inherited,
            "CRM_PULSE_BROKER": broker_url,
            "CRM_PULSE_APP_ID": app.app_id,
            "CRM_PULSE_INPUT_TOPIC": app.input_topic,
            "CRM_PULSE_ALERTS_TOPIC": app.alerts_topic,
            "CRM_PULSE_DLQ_TOPIC": app.dlq_topic,
            "CRM_PULSE_PARTITIONS": str(app.partitions),
            "CRM_PULSE_METRICS_PORT": str(self.port),
            "CRM_PULSE_DATA_DIR": str(workdir / self.name),
            "CRM_PULSE_CLOCK": "event",
            "CRM_PULSE_LOG_LEVEL": "warning",
            **overrides,
        }
        self.process: subprocess.Popen | None = None
        self.metrics_status: int | None = None  # of the latest /metrics request answered
        self.started_at = 0.0
        self.url = f"http://127.0.0.1:{self.port}"

    def start(self) -> "Worker":
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(
                # From `source`: `python -m` puts the working directory first on the import path.
                [sys.executable, "-m", "crm_pulse.cli", self.command], env=self.env, cwd=self.source, stdout=log,
                stderr=log,
            )
        self.started_at = time.monotonic()
        return self

    def check_alive(self) -> None:
        if self.process.poll() is not None:
            raise RuntimeError(f"worker {self.name} exited with {self.process.returncode}:\n{self.log_tail()}")

    def log_tail(self, chars: int = 2000) -> str:
        return self.log_path.read_text(errors="replace")[-chars:] if self.log_path.exists() else ""

    async def metrics(self, session: aiohttp.ClientSession) -> Metrics | None:
        """Every sample of /metrics, or None while the web server does not serve it."""
        self.check_alive()
        try:
            async with session.get(f"{self.url}/metrics", timeout=aiohttp.ClientTimeout(total=30)) as response:
                self.metrics_status = response.status
                if response.status != 200:
                    return None
                text = await response.text()
        except (aiohttp.ClientError, asyncio.TimeoutError):
            return None
        return {
            (sample.name, frozenset(sample.labels.items())): sample.value
            for family in text_string_to_metric_families(text)
            for sample in family.samples
        }

    async def wait_for(self, session, predicate: Callable[[Metrics], bool], timeout: float, every: float = 0.25):
        """The first /metrics for which `predicate` holds, or None after `timeout` seconds."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            metrics = await self.metrics(session)
            if metrics is not None and predicate(metrics):
                return metrics
            await asyncio.sleep(every)
        return None

    async def get_json(self, session, path: str):
        self.check_alive()
        try:
            async with session.get(f"{self.url}{path}", timeout=aiohttp.ClientTimeout(total=30)) as response:
                return await response.json() if response.status == 200 else None
        except (aiohttp.ClientError, asyncio.TimeoutError):
            return None

    def memory_mib(self) -> dict[str, float]:
        return memory_mib(self.process.pid)

    def stop(self) -> None:
        if self.process:
            stop_process(self.process)


def memory_mib(pid: int) -> dict[str, float]:
    """A process's resident set now (VmRSS) and at its peak (VmHWM), in MiB."""
    fields = {}
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            name, _, value = line.partition(":")
            if name in ("VmRSS", "VmHWM"):
                fields[name] = round(int(value.split()[0]) / 1024, 1)
    return {"rss_mib": fields["VmRSS"], "peak_rss_mib": fields["VmHWM"]}


def stop_process(process: subprocess.Popen, timeout: float = 20) -> None:
    """SIGTERM (a graceful shutdown leaves the consumer group at once), SIGKILL if that hangs."""
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def total(metrics: Metrics, name: str, **labels: str) -> float:
    """The sum of the samples of `name` whose labels include `labels`."""
    wanted = set(labels.items())
    return sum(v for (n, ls), v in metrics.items() if n == name and wanted <= ls)


def applied(metrics: Metrics) -> float:
    """Input events the worker has finished with: applied to state, or dropped as duplicate or invalid."""
    return sum(
        total(metrics, name)
        for name in ("crm_events_processed_total", "crm_events_duplicate_total", "crm_events_invalid_total")
    )


class Bench:
    """One phase's world on one kind of broker ("tansu" or "kafka"): a fresh embedded broker (so phases
    cannot slow each other down), an HTTP session for /metrics and a directory for logs and data."""

    _apps = itertools.count(1)

    def __init__(self, reporter: Reporter, workdir: Path, tag: str, worker_source: Path, broker_kind: str):
        self.reporter, self.workdir, self.tag, self.worker_source = reporter, workdir, tag, worker_source
        self.broker_kind = broker_kind
        self.broker = None
        self.session: aiohttp.ClientSession | None = None
        self.workers: list[Worker] = []

    @property
    def on_tansu(self) -> bool:
        return self.broker_kind == "tansu"

    async def __aenter__(self) -> "Bench":
        self.reporter.step(f"starting the embedded {self.broker_kind} broker")
        self.broker = start_embedded(self.broker_kind)
        self.bootstrap = self.broker.url.removeprefix("kafka://")
        self.session = aiohttp.ClientSession()
        if not self.on_tansu:
            try:
                await self._create_offsets_topic()
            except BaseException:
                await self.__aexit__()
                raise
        return self

    async def __aexit__(self, *exc) -> None:
        for worker in self.workers:
            worker.stop()
        await self.session.close()
        self.broker.stop()

    def app(self, name: str, partitions: int) -> App:
        return App(f"{self.tag}-{name}-{next(self._apps)}", partitions)

    def worker(self, app: App, command: str = "worker", **overrides: str) -> Worker:
        worker = Worker(self.broker.url, app, self.workdir, self.worker_source, command, **overrides)
        self.workers.append(worker)
        return worker

    @contextlib.asynccontextmanager
    async def _admin(self) -> AsyncIterator[AIOKafkaAdminClient]:
        admin = AIOKafkaAdminClient(bootstrap_servers=self.bootstrap)
        await admin.start()
        try:
            yield admin
        finally:
            await admin.close()

    async def _create_offsets_topic(self, timeout: float = 60) -> None:
        """Kafka creates __consumer_offsets (50 partitions) once a group first asks for its coordinator: the
        broker pays that here, not the first worker a phase times."""
        deadline = time.monotonic() + timeout
        async with self._admin() as admin:
            while True:
                try:
                    await admin.find_coordinator(f"{self.tag}-warm-up")
                    return
                except GroupCoordinatorNotAvailableError:
                    if time.monotonic() > deadline:
                        raise
                    await asyncio.sleep(0.1)

    async def create_topic(self, name: str, partitions: int, timeout: float = 30, configs: dict | None = None) -> None:
        """Created, and each partition led: Kafka elects the leaders a moment after it answers, and until
        then the first producer to the topic logs errors and retries."""
        deadline = time.monotonic() + timeout
        async with self._admin() as admin:
            await admin.create_topics([NewTopic(name, partitions, 1, topic_configs=configs or {})])
            while not [t for t in await admin.describe_topics([name])
                       if not t["error_code"] and len(t["partitions"]) == partitions
                       and all(p["leader"] >= 0 for p in t["partitions"])]:  # fmt: skip
                if time.monotonic() > deadline:
                    raise TimeoutError(f"topic {name} has no leader for each partition after {timeout} s")
                await asyncio.sleep(0.1)

    async def producer(self, **options) -> AIOKafkaProducer:
        producer = AIOKafkaProducer(bootstrap_servers=self.bootstrap, max_request_size=8 << 20, **options)
        await producer.start()
        return producer

    async def read_topic(self, topic: str, partitions: int) -> AsyncIterator[ConsumerRecord]:
        """Every record of a topic, from its beginning to its end offsets; on Tansu, whose end offsets can
        stop short of a partition's last batch, until a poll finds nothing instead."""
        consumer = AIOKafkaConsumer(bootstrap_servers=self.bootstrap, enable_auto_commit=False)
        await consumer.start()
        try:
            consumer.assign([TopicPartition(topic, p) for p in range(partitions)])
            await consumer.seek_to_beginning()
            ends = await consumer.end_offsets(consumer.assignment())
            while self.on_tansu or [tp for tp, end in ends.items() if await consumer.position(tp) < end]:
                batch = await consumer.getmany(timeout_ms=1000)
                if self.on_tansu and not batch:
                    return
                for records in batch.values():
                    for record in records:
                        yield record
        finally:
            await consumer.stop()

    async def produce(self, topic: str, records: Iterable[tuple[bytes, bytes, int | None]], count: int,
                      what: str, **options) -> None:  # fmt: skip
        """Send (key, value, partition or None for the default murmur2 partitioner) records, acknowledged."""
        producer = await self.producer(linger_ms=20, max_batch_size=1 << 20, **options)
        self.reporter.step(what, total=count)
        try:
            pending = []
            for sent, (key, value, partition) in enumerate(records, 1):
                pending.append(await producer.send(topic, value=value, key=key, partition=partition))
                if len(pending) >= 20_000:
                    await asyncio.gather(*pending)
                    pending.clear()
                    self.reporter.update(sent)
            await asyncio.gather(*pending)
            self.reporter.update(count)
        finally:
            await producer.stop()


def synthetic_events(count: int, seed: int, **crm) -> Iterator[dict]:
    """`count` events of the synthetic CRM, in event-time order (asked for an hour at a time: `until`
    plans every lead up to the time it is given)."""
    crm_model = SyntheticCrm(START_MS, seed=seed, **crm)
    at = START_MS
    produced = 0
    while True:
        at += DAY_MS // 24
        for event in crm_model.until(at):
            yield event
            produced += 1
            if produced == count:
                return


def percentile(values: list[float], q: float) -> float | None:
    """Nearest-rank percentile (q in 0..100): a value that was actually observed."""
    if not values:
        return None
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q / 100 * len(ordered)) - 1)]


def rate(events: float, seconds: float) -> float | None:
    return round(events / seconds, 1) if seconds > 0 else None
