"""Real components for integration tests: a real broker and `crm-pulse worker` processes.

The broker is the one `crm-pulse` embeds, chosen by the same setting: Tansu by default,
`CRM_PULSE_EMBEDDED_BROKER=kafka` for Apache Kafka (`make test` runs the integration suite on both)."""

from __future__ import annotations

import itertools
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import orjson
import pytest
from kafka import KafkaConsumer, KafkaProducer, TopicPartition
from prometheus_client.parser import text_string_to_metric_families

from crm_pulse.broker import free_port, start_embedded
from crm_pulse.generator import SyntheticCrm

_names = itertools.count(1)
BROKER_KIND = os.environ.get("CRM_PULSE_EMBEDDED_BROKER", "tansu")
on_tansu_only = pytest.mark.skipif(BROKER_KIND != "tansu", reason="about Tansu (the run on Apache Kafka has its own)")
on_kafka_only = pytest.mark.skipif(BROKER_KIND != "kafka", reason="needs Apache Kafka (CRM_PULSE_EMBEDDED_BROKER=kafka)")


@pytest.fixture(scope="session")
def broker():
    embedded = start_embedded(BROKER_KIND)
    yield embedded
    embedded.stop()


class Worker:
    """One `crm-pulse worker` process with its own app id and topics on the shared broker."""

    def __init__(self, broker, tmp_path: Path, **overrides: str):
        n = next(_names)
        self.broker, self.tmp_path = broker, tmp_path
        self.bootstrap = [broker.url.removeprefix("kafka://")]
        self.port = free_port()
        self.env = {
            **os.environ,
            "CRM_PULSE_BROKER": broker.url,
            "CRM_PULSE_APP_ID": f"it-{n}-{os.getpid()}",
            "CRM_PULSE_INPUT_TOPIC": f"it-{n}-events",
            "CRM_PULSE_ALERTS_TOPIC": f"it-{n}-alerts",
            "CRM_PULSE_DLQ_TOPIC": f"it-{n}-dlq",
            "CRM_PULSE_METRICS_PORT": str(self.port),
            "CRM_PULSE_NOTIFY_METRICS_PORT": str(free_port()),
            "CRM_PULSE_DATA_DIR": str(tmp_path / f"data-{n}"),
            "CRM_PULSE_CLOCK": "event",
            "CRM_PULSE_STALL_SCAN_SECONDS": "0.5",
            "CRM_PULSE_PARTITIONS": "1",
            **overrides,
        }
        self.partitions = int(self.env["CRM_PULSE_PARTITIONS"])
        self.log_path = tmp_path / f"worker-{n}.log"
        self.process: subprocess.Popen | None = None
        self.producer = KafkaProducer(bootstrap_servers=self.bootstrap, linger_ms=5)

    def sibling(self) -> "Worker":
        """A second worker of the same app (same group, topics and tables), with its own port and disk."""
        own = ("CRM_PULSE_METRICS_PORT", "CRM_PULSE_DATA_DIR")
        shared = {k: v for k, v in self.env.items() if k.startswith("CRM_PULSE_") and k not in own}
        return Worker(self.broker, self.tmp_path, **shared)

    def topic(self, role: str) -> str:
        return self.env[f"CRM_PULSE_{role.upper()}_TOPIC"]

    def start(self) -> "Worker":
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "crm_pulse.cli", "worker"], env=self.env, stdout=log, stderr=log
            )
        self.wait_for(lambda m: ("crm_events_received_total", ()) in m, what="/metrics to be served")
        return self

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.process.kill()
        self.producer.close()

    def send(self, *events: dict | bytes, key: bytes | None = None) -> None:
        for event in events:
            if isinstance(event, bytes):
                self.producer.send(self.topic("input"), key=key, value=event)
            else:
                self.producer.send(self.topic("input"), key=SyntheticCrm.key(event), value=orjson.dumps(event))
        self.producer.flush()

    def metrics(self) -> dict[tuple, float]:
        """{(sample name, sorted label items): value} from the worker's /metrics."""
        with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/metrics", timeout=5) as response:
            text = response.read().decode()
        return {
            (sample.name, tuple(sorted(sample.labels.items()))): sample.value
            for family in text_string_to_metric_families(text)
            for sample in family.samples
        }

    def get_json(self, path: str) -> tuple[int, dict]:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}{path}", timeout=5) as response:
                return response.status, orjson.loads(response.read())
        except urllib.error.HTTPError as error:
            return error.code, orjson.loads(error.read())

    def wait_for(self, predicate, what: str, timeout: float = 60.0, explain=None):
        """The worker's metrics once `predicate` holds for them; on timeout, `explain` (if given) says
        from the last metrics what is missing, instead of all of them."""
        deadline = time.monotonic() + timeout
        last = None
        while time.monotonic() < deadline:
            assert self.process.poll() is None, f"worker exited: {self.log_path.read_text()[-3000:]}"
            try:
                last = self.metrics()
                if predicate(last):
                    return last
            except OSError:
                pass
            time.sleep(0.3)
        detail = explain(last) if explain and last is not None else f"last metrics: {last}"
        raise AssertionError(f"timed out waiting for {what}; {detail}")

    def wait_until_settled(self, what: str, timeout: float) -> dict:
        """Until every topic the worker reads is committed up to its end offset: nothing in flight."""
        return self.wait_for(lambda m: bool(end_offsets(m)) and not unsettled(m), what, timeout,
                             explain=lambda m: f"not committed to their end (committed, end): {unsettled(m)}")  # fmt: skip

    def wait_until_group_settled(self, what: str, timeout: float) -> None:
        """Until the app's consumer group, every worker of it, has committed every topic it reads up to its end,
        as the broker tells: a worker's own metrics know the end offsets only of partitions it has fetched
        from, so one just given partitions with a backlog looks settled before it has read them."""
        deadline = time.monotonic() + timeout
        while lag := group_lag(self):
            assert self.process.poll() is None, f"worker exited: {self.log_path.read_text()[-3000:]}"
            assert time.monotonic() < deadline, f"timed out waiting for {what}; (committed, end): {lag}"
            time.sleep(0.3)

    def read_all(self, role: str, timeout: float = 60.0) -> list:
        """Every record of the alerts or DLQ topic up to its end offsets, and on Tansu, whose end offsets can
        stop short of a partition's last batch, until a poll finds nothing more."""
        consumer = KafkaConsumer(bootstrap_servers=self.bootstrap, enable_auto_commit=False)
        partitions = [TopicPartition(self.topic(role), p) for p in range(self.partitions)]
        consumer.assign(partitions)
        consumer.seek_to_beginning()
        ends = consumer.end_offsets(partitions)
        records = []
        deadline = time.monotonic() + timeout
        try:
            while True:
                assert time.monotonic() < deadline, f"read {len(records)} records of {role}, not to its end {ends}"
                polled = [record for batch in consumer.poll(timeout_ms=1000).values() for record in batch]
                records.extend(polled)
                if not polled and all(consumer.position(tp) >= end for tp, end in ends.items()):
                    return records
        finally:
            consumer.close()

    def read(self, role: str, count: int, timeout: float = 60.0) -> list:
        """The first `count` records of the alerts or DLQ topic, read with assign() (no group join)."""
        consumer = KafkaConsumer(bootstrap_servers=self.bootstrap, consumer_timeout_ms=500)
        consumer.assign([TopicPartition(self.topic(role), p) for p in range(self.partitions)])
        consumer.seek_to_beginning()
        records = []
        deadline = time.monotonic() + timeout
        while len(records) < count and time.monotonic() < deadline:
            for batch in consumer.poll(timeout_ms=500).values():
                records.extend(batch)
        consumer.close()
        assert len(records) >= count, f"expected {count} records on {role}, got {len(records)}"
        return records


def group_lag(worker: Worker) -> dict[str, tuple]:
    """{"topic/partition": (committed, end)} of each partition with records the app's group has not committed
    to its end: the input topic and the app's internal topics (changelogs are only read to restore tables)."""
    app_id = worker.env["CRM_PULSE_APP_ID"]
    # Never subscribes, so it joins no group: `group_id` only names the group whose commits it asks for.
    consumer = KafkaConsumer(bootstrap_servers=worker.bootstrap, group_id=app_id, enable_auto_commit=False)
    try:
        topics = [t for t in consumer.topics() if t == worker.topic("input")
                  or (t.startswith(f"{app_id}-") and not t.endswith("-changelog") and "__assignor" not in t)]  # fmt: skip
        ends = consumer.end_offsets([TopicPartition(t, p) for t in topics for p in consumer.partitions_for_topic(t)])
        committed = {tp: consumer.committed(tp) for tp, end in ends.items() if end}
    finally:
        consumer.close()
    return {f"{tp.topic}/{tp.partition}": (offset, ends[tp])
            for tp, offset in committed.items() if (offset or 0) < ends[tp]}  # fmt: skip


def end_offsets(metrics: dict) -> dict:
    """{labels: end offset} of each partition the worker reads (changelogs, only read to restore tables and
    never committed, are not shown)."""
    return {labels: v for (name, labels), v in metrics.items() if name == "crm_consumer_end_offset"}


def unsettled(metrics: dict) -> dict[str, tuple]:
    """{"topic/partition": (committed offset, end offset)} of each partition read but not committed to its end."""
    committed = {labels: v for (name, labels), v in metrics.items()
                 if name == "crm_consumer_committed_offset"}  # fmt: skip
    return {f"{dict(labels)['topic']}/{dict(labels)['partition']}": (committed.get(labels), end)
            for labels, end in end_offsets(metrics).items() if committed.get(labels) != end}  # fmt: skip


@pytest.fixture
def start_worker(broker, tmp_path):
    workers = []

    def start(sibling_of: Worker | None = None, **overrides: str) -> Worker:
        worker = (sibling_of.sibling() if sibling_of else Worker(broker, tmp_path, **overrides)).start()
        workers.append(worker)
        return worker

    yield start
    for worker in workers:
        worker.stop()
