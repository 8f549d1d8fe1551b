"""Apache Kafka on this machine: the broker's jars from Maven Central (deploy/kafka/pom.xml, fetched once into
.kafka/), KRaft storage formatted once per log directory, and one combined broker+controller process on
loopback. `make kafka` and the test fixtures both use `KafkaBroker`."""

from __future__ import annotations

import shutil
import signal
import subprocess
import tempfile
import time
import xml.etree.ElementTree as ElementTree
from pathlib import Path

from crm_pulse.broker import dies_with_this_process, free_port
from crm_pulse.config import kafka_cache

ROOT = Path(__file__).resolve().parents[1]
POM = ROOT / "deploy" / "kafka" / "pom.xml"
# Ignored by git; the jars of each version live in their own folder, so a version bump downloads anew.
CACHE = kafka_cache(ROOT / ".kafka")
LOG4J = ROOT / "deploy" / "kafka" / "log4j2.properties"
READY_LINE = "Kafka Server started"


class KafkaUnavailable(RuntimeError):
    """The broker could not be fetched or started; the message says why and what to do."""


def kafka_version() -> str:
    """The pinned version: the pom's `kafka.version` property, the one place it is written."""
    ns = {"m": "http://maven.apache.org/POM/4.0.0"}
    return ElementTree.parse(POM).getroot().findtext("m:properties/m:kafka.version", namespaces=ns)


def kafka_libs() -> Path:
    """The folder of the broker's jars, fetched with Maven the first time."""
    libs = CACHE / kafka_version() / "libs"
    if (libs / ".complete").exists():
        return libs
    if not shutil.which("mvn"):
        raise KafkaUnavailable("Apache Kafka's jars are fetched with Maven, and `mvn` is not on PATH: install Maven")
    staging = Path(tempfile.mkdtemp(prefix="libs-", dir=CACHE.mkdir(parents=True, exist_ok=True) or CACHE))
    fetched = subprocess.run(
        ["mvn", "-q", "-B", "-f", str(POM), "dependency:copy-dependencies", f"-DoutputDirectory={staging}"],
        capture_output=True, text=True,
    )  # fmt: skip
    if fetched.returncode != 0:
        shutil.rmtree(staging, ignore_errors=True)
        tail = (fetched.stdout + fetched.stderr).strip().splitlines()[-5:]
        raise KafkaUnavailable(f"Maven could not fetch Apache Kafka {kafka_version()}: " + " | ".join(tail))
    (staging / ".complete").touch()
    libs.parent.mkdir(parents=True, exist_ok=True)
    staging.rename(libs)  # atomic: a run that dies midway leaves no half-filled folder behind
    return libs


class KafkaBroker:
    """A single-node Apache Kafka (KRaft, broker and controller in one JVM) on 127.0.0.1.

    `listeners` maps extra listener names to their security protocol (SASL_SSL, SSL); each gets a port of
    its own in `ports`. `properties` are added to server.properties, and `scram_users` ({mechanism: {user:
    password}}) are written into the storage when it is formatted, so they exist from the first start. A
    given `log_dir` outlives `stop()`: `start()` again serves the same log on the same ports. Without one,
    the broker keeps its log in a temporary directory that `stop()` deletes."""

    def __init__(self, log_dir: Path | None = None, listeners: dict[str, str] | None = None,
                 properties: dict[str, str] | None = None, scram_users: dict[str, dict[str, str]] | None = None,
                 heap: str = "768m"):  # fmt: skip
        self._own_dir = log_dir is None
        self.home = Path(log_dir or tempfile.mkdtemp(prefix="crm-pulse-kafka-"))
        self.home.mkdir(parents=True, exist_ok=True)
        self.listeners = {"PLAINTEXT": "PLAINTEXT", **(listeners or {})}
        self.ports = {name: free_port() for name in self.listeners}
        self.controller_port = free_port()
        self.properties, self.scram_users, self.heap = properties or {}, scram_users or {}, heap
        self.log_path = self.home / "broker.log"
        self.process: subprocess.Popen | None = None

    @property
    def port(self) -> int:
        return self.ports["PLAINTEXT"]

    @property
    def url(self) -> str:
        return f"kafka://127.0.0.1:{self.port}"

    def url_of(self, listener: str) -> str:
        return f"kafka://127.0.0.1:{self.ports[listener]}"

    def _server_properties(self) -> Path:
        listeners = ",".join(f"{name}://127.0.0.1:{port}" for name, port in self.ports.items())
        protocols = ",".join(f"{name}:{protocol}" for name, protocol in self.listeners.items())
        config = {
            "process.roles": "broker,controller",
            "node.id": "1",
            "controller.quorum.voters": f"1@127.0.0.1:{self.controller_port}",
            "controller.listener.names": "CONTROLLER",
            "listeners": f"{listeners},CONTROLLER://127.0.0.1:{self.controller_port}",
            "advertised.listeners": listeners,
            "listener.security.protocol.map": f"{protocols},CONTROLLER:PLAINTEXT",
            "inter.broker.listener.name": "PLAINTEXT",
            "log.dirs": str(self.home / "log"),
            # One node: the internal topics cannot have more replicas than that.
            "offsets.topic.replication.factor": "1",
            "transaction.state.log.replication.factor": "1",
            "transaction.state.log.min.isr": "1",
            "share.coordinator.state.topic.replication.factor": "1",
            "share.coordinator.state.topic.min.isr": "1",
            # Kafka waits 3 s for more members before a new group's first rebalance; a lone worker need not.
            "group.initial.rebalance.delay.ms": "0",
            # A broker that shuts down while no client listens still ends within seconds.
            "controlled.shutdown.max.retries": "1",
            **self.properties,
        }
        path = self.home / "server.properties"
        path.write_text("".join(f"{key}={value}\n" for key, value in config.items()))
        return path

    def _java(self, main: str, *args: str) -> list[str]:
        return ["java", f"-Xmx{self.heap}", "-XX:+UseG1GC", "-Djava.awt.headless=true",
                f"-Dlog4j2.configurationFile={LOG4J}", "-cp", f"{kafka_libs()}/*", main, *args]  # fmt: skip

    def _format(self, properties: Path) -> None:
        if (self.home / "log" / "meta.properties").exists():
            return
        scram = [arg for mechanism, users in self.scram_users.items() for user, password in users.items()
                 for arg in ("--add-scram", f"{mechanism}=[name={user},password={password}]")]  # fmt: skip
        cluster_id = subprocess.run(self._java("kafka.tools.StorageTool", "random-uuid"),
                                    capture_output=True, text=True, check=True).stdout.split()[-1]  # fmt: skip
        formatted = subprocess.run(
            self._java("kafka.tools.StorageTool", "format", "-t", cluster_id, "-c", str(properties), *scram),
            capture_output=True, text=True,
        )  # fmt: skip
        if formatted.returncode != 0:
            raise KafkaUnavailable(f"formatting Kafka's storage in {self.home} failed: {formatted.stderr.strip()[-500:]}")

    def start(self, timeout: float = 90.0) -> "KafkaBroker":
        properties = self._server_properties()
        self._format(properties)
        offset = self.log_path.stat().st_size if self.log_path.exists() else 0
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(
                self._java("kafka.Kafka", str(properties)), stdout=log, stderr=subprocess.STDOUT,
                start_new_session=True,  # Ctrl-C reaches whoever started it, who stops it after its clients
                **dies_with_this_process(),
            )  # fmt: skip
        deadline = time.monotonic() + timeout
        while READY_LINE not in self._log_since(offset):
            if self.process.poll() is not None:
                raise KafkaUnavailable(f"Apache Kafka exited with {self.process.returncode} while starting; "
                                       f"its log ({self.log_path}) ends: {self._log_since(offset)[-1500:]}")  # fmt: skip
            if time.monotonic() > deadline:
                self.kill()
                raise KafkaUnavailable(f"Apache Kafka did not start within {timeout:.0f} s; see {self.log_path}")
            time.sleep(0.2)
        return self

    def _log_since(self, offset: int) -> str:
        with open(self.log_path, "rb") as log:
            log.seek(offset)
            return log.read().decode(errors="replace")

    def stop(self, timeout: float = 60.0) -> None:
        """SIGTERM: a controlled shutdown that flushes and closes the log, then the process ends."""
        if self.process and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.kill()
        if self._own_dir:
            shutil.rmtree(self.home, ignore_errors=True)

    def kill(self) -> None:
        """SIGKILL: the broker dies as in a power loss, mid-write; a later start recovers the log."""
        if self.process and self.process.poll() is None:
            self.process.kill()
            self.process.wait(10)


def serve(log_dir: Path | None = None) -> int:
    """`make kafka`: a broker until Ctrl-C or SIGTERM."""
    signal.signal(signal.SIGTERM, signal.default_int_handler)  # stop as on Ctrl-C
    broker = KafkaBroker(log_dir=log_dir)
    try:
        print(f"starting Apache Kafka {kafka_version()} (KRaft) with its log in {broker.home} …", flush=True)
        broker.start()
        print(broker.url, flush=True)
        while broker.process.poll() is None:
            time.sleep(0.5)
        print(f"Apache Kafka exited with {broker.process.returncode}; see {broker.log_path}", flush=True)
        return 1
    except KeyboardInterrupt:
        print("stopping Apache Kafka …", flush=True)
        return 0
    finally:
        broker.stop()
