"""Security against a real Apache Kafka broker (issue 16): SCRAM-SHA-512 over TLS (SASL_SSL) and mutual TLS, with
ACLs (StandardAuthorizer) that give each principal only what its role needs, and what the user is told when the
password, the rights or the CA are wrong. The Tansu run has test_security.py (Tansu serves neither).

One broker serves the module. Its listeners:
- SASL_SSL: SCRAM-SHA-512 users created when its storage is formatted, over TLS with a certificate from a CA
  made here (PEM files read by Kafka itself: no keystore tool);
- MTLS: TLS that requires a client certificate from that CA; the principal is the certificate's CN;
- PLAINTEXT (KafkaBroker always has one): its principal, User:ANONYMOUS, has no ACL and is no super user, so
  it may do nothing;
- CONTROLLER, and the broker's own inter-broker traffic on MTLS: mutual TLS with the broker's certificate,
  whose CN is a super user. (A PLAINTEXT controller listener would have needed User:ANONYMOUS as a super user:
  the broker registers with its controller before any ACL can exist. Then PLAINTEXT clients, too, would
  have been super users.)
"""

from __future__ import annotations

import csv
import datetime
import ipaddress
import logging
import re
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from kafka import KafkaAdminClient, KafkaProducer
from kafka.admin import (ACL, ACLFilter, ACLOperation, ACLPermissionType, ACLResourcePatternType, ResourcePattern,
                         ResourcePatternFilter, ResourceType)  # fmt: skip
from kafka.errors import KafkaTimeoutError, TopicAuthorizationFailedError

from crm_pulse.broker import BrokerUnusable, log_in
from crm_pulse.config import Settings
from crm_pulse.importer import pseudonymise
from crm_pulse.kafka import KafkaBroker

from .conftest import Worker, on_kafka_only
from .test_alert_consumers import Webhook

pytestmark = [pytest.mark.integration, on_kafka_only]

ROOT = Path(__file__).resolve().parents[2]
ADMIN, WORKER, IMPORTER, READER, NO_ALERTS = (
    "crm-pulse-admin", "crm-pulse-worker", "crm-pulse-importer", "crm-pulse-alerts", "crm-pulse-no-alerts")  # fmt: skip
# Distinctive, so that a leak anywhere is found by substring.
PASSWORDS = {user: f"{user[10:]}-S3cret-7c41q" for user in (ADMIN, WORKER, IMPORTER, READER, NO_ALERTS)}
BROKER_CN = "kafka-broker"
EXIT_SECONDS = 15
T0 = 1_767_225_600_000  # 2026-01-01T00:00:00Z


# --- the broker ------------------------------------------------------------------------------------------


def _certificate(cn: str, issuer: tuple | None = None, *, ca: bool = False, usages=(), ip: str | None = None):
    """(certificate, key): an EC P-256 key certified for a day, by `issuer` (certificate, key) or by itself."""
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])
    now = datetime.datetime.now(datetime.timezone.utc)
    builder = (
        x509.CertificateBuilder().subject_name(subject).public_key(key.public_key())
        .issuer_name(issuer[0].subject if issuer else subject).serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )  # fmt: skip
    if ca:
        builder = builder.add_extension(x509.KeyUsage(
            digital_signature=False, content_commitment=False, key_encipherment=False, data_encipherment=False,
            key_agreement=False, key_cert_sign=True, crl_sign=True, encipher_only=False, decipher_only=False,
        ), critical=True)  # fmt: skip
    if usages:
        builder = builder.add_extension(x509.ExtendedKeyUsage(list(usages)), critical=False)
    if ip:
        builder = builder.add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address(ip))]),
                                        critical=False)  # fmt: skip
    return builder.sign(issuer[1] if issuer else key, hashes.SHA256()), key


def _pem(certificate) -> bytes:
    return certificate.public_bytes(serialization.Encoding.PEM)


def _key_pem(key) -> bytes:
    # Kafka reads PEM keys in PKCS#8 only.
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())  # fmt: skip


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> Path:
    """ca.pem; broker.pem (key, certificate for 127.0.0.1, CA: what Kafka serves); worker.pem and worker.key
    (a client certificate for CN=crm-pulse-worker); rogue-ca.pem, a CA that certified none of them."""
    pki = tmp_path_factory.mktemp("pki")
    ca = _certificate("crm-pulse test CA", ca=True)
    # The broker's certificate is also its client certificate towards its own controller listener.
    broker = _certificate(BROKER_CN, ca, usages=[ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH],
                          ip="127.0.0.1")  # fmt: skip
    worker = _certificate(WORKER, ca, usages=[ExtendedKeyUsageOID.CLIENT_AUTH])
    (pki / "ca.pem").write_bytes(_pem(ca[0]))
    (pki / "broker.pem").write_bytes(_key_pem(broker[1]) + _pem(broker[0]) + _pem(ca[0]))
    (pki / "worker.pem").write_bytes(_pem(worker[0]))
    (pki / "worker.key").write_bytes(_key_pem(worker[1]))
    (pki / "rogue-ca.pem").write_bytes(_pem(_certificate("crm-pulse rogue CA", ca=True)[0]))
    return pki


@pytest.fixture(scope="module")
def kafka(pki):
    broker = KafkaBroker(
        listeners={"SASL_SSL": "SASL_SSL", "MTLS": "SSL"},
        scram_users={"SCRAM-SHA-512": PASSWORDS},
        properties={
            # Replaces KafkaBroker's map, which has CONTROLLER:PLAINTEXT (see the module doc).
            "listener.security.protocol.map": "PLAINTEXT:PLAINTEXT,SASL_SSL:SASL_SSL,MTLS:SSL,CONTROLLER:SSL",
            "inter.broker.listener.name": "MTLS",
            "ssl.keystore.type": "PEM",
            "ssl.keystore.location": str(pki / "broker.pem"),
            "ssl.truststore.type": "PEM",
            "ssl.truststore.location": str(pki / "ca.pem"),
            "listener.name.mtls.ssl.client.auth": "required",
            "listener.name.controller.ssl.client.auth": "required",
            # CN=crm-pulse-worker → User:crm-pulse-worker
            "ssl.principal.mapping.rules": "RULE:^CN=([^,]+)$/$1/,DEFAULT",
            "listener.name.sasl_ssl.sasl.enabled.mechanisms": "SCRAM-SHA-512",
            "listener.name.sasl_ssl.scram-sha-512.sasl.jaas.config":
                "org.apache.kafka.common.security.scram.ScramLoginModule required;",
            "authorizer.class.name": "org.apache.kafka.metadata.authorizer.StandardAuthorizer",
            # No User:ANONYMOUS: the controller listener authenticates the broker by its certificate.
            "super.users": f"User:{ADMIN};User:{BROKER_CN}",
        },
    ).start()  # fmt: skip
    yield broker
    broker.stop()


def sasl(kafka, pki: Path, user: str, password: str | None = None) -> dict:
    """kafka-python options for `user` on the SASL_SSL listener."""
    return {"bootstrap_servers": [f"127.0.0.1:{kafka.ports['SASL_SSL']}"], "security_protocol": "SASL_SSL",
            "sasl_mechanism": "SCRAM-SHA-512", "sasl_plain_username": user,
            "sasl_plain_password": password or PASSWORDS[user], "ssl_cafile": str(pki / "ca.pem")}  # fmt: skip


def sasl_env(kafka, pki: Path, user: str, password: str | None = None, cafile: Path | None = None) -> dict:
    """The CRM_PULSE_* variables for `user` on the SASL_SSL listener."""
    return {"CRM_PULSE_BROKER": kafka.url_of("SASL_SSL"), "CRM_PULSE_SECURITY_PROTOCOL": "SASL_SSL",
            "CRM_PULSE_SASL_MECHANISM": "SCRAM-SHA-512", "CRM_PULSE_SASL_USERNAME": user,
            "CRM_PULSE_SASL_PASSWORD": password or PASSWORDS[user],
            "CRM_PULSE_SSL_CAFILE": str(cafile or pki / "ca.pem")}  # fmt: skip


@pytest.fixture(scope="module")
def admin(kafka, pki):
    client = KafkaAdminClient(**sasl(kafka, pki, ADMIN))
    yield client
    client.close()


def allow(user: str, resource: ResourceType, name: str, *operations: ACLOperation, prefixed: bool = False) -> list[ACL]:
    pattern_type = ACLResourcePatternType.PREFIXED if prefixed else ACLResourcePatternType.LITERAL
    pattern = ResourcePattern(resource, name, pattern_type)
    return [ACL(f"User:{user}", "*", operation, ACLPermissionType.ALLOW, pattern) for operation in operations]


EVERY_ACL = ACLFilter(None, None, ACLOperation.ANY, ACLPermissionType.ANY,
                      ResourcePatternFilter(ResourceType.ANY, None, ACLResourcePatternType.ANY))  # fmt: skip


def grant(admin: KafkaAdminClient, acls: list[ACL]) -> None:
    """Create the ACLs, and return once the broker's authorizer applies them: it learns them from the metadata
    log after the controller committed them."""
    created = admin.create_acls(acls)
    assert created["failed"] == [], created
    deadline = time.monotonic() + 10
    while not set(acls) <= set(admin.describe_acls(EVERY_ACL)[0]):
        assert time.monotonic() < deadline, "the broker did not apply the new ACLs within 10 s"
        time.sleep(0.05)


def mtls_env(kafka, pki: Path) -> dict:
    """The CRM_PULSE_* variables for the worker's certificate on the MTLS listener."""
    return {"CRM_PULSE_BROKER": kafka.url_of("MTLS"), "CRM_PULSE_SECURITY_PROTOCOL": "SSL",
            "CRM_PULSE_SSL_CAFILE": str(pki / "ca.pem"), "CRM_PULSE_SSL_CERTFILE": str(pki / "worker.pem"),
            "CRM_PULSE_SSL_KEYFILE": str(pki / "worker.key")}  # fmt: skip


def secured_worker(kafka, pki: Path, admin: KafkaAdminClient, tmp_path: Path, user: str, security: dict | None = None,
                   alerts=ACLOperation.WRITE) -> Worker:  # fmt: skip
    """A Worker (conftest) at debug log level, logging in with `security` (default: `user` on SASL_SSL), whose
    topics the admin created beforehand and whose principal `user` got the ACLs a worker needs, with `alerts`
    as its right on the alerts topic. Its producer, the CRM, is the importer principal (the worker may not
    write its own input)."""
    worker = Worker(kafka, tmp_path, CRM_PULSE_LOG_LEVEL="debug", CRM_PULSE_STALL_STAGE_DAYS='{"engaging": 2}',
                    CRM_PULSE_GRACE_SECONDS="3600", **(security or sasl_env(kafka, pki, user)))  # fmt: skip
    topics = {role: worker.topic(role) for role in ("input", "alerts", "dlq")}
    admin.create_topics({name: {"num_partitions": 1, "replication_factor": 1} for name in topics.values()})
    app = worker.env["CRM_PULSE_APP_ID"]
    grant(admin, [
        *allow(user, ResourceType.TOPIC, topics["input"], ACLOperation.READ),
        # Faust's group, internal topics and changelogs are all named after the app id.
        *allow(user, ResourceType.GROUP, app, ACLOperation.READ, prefixed=True),
        *allow(user, ResourceType.TOPIC, app, ACLOperation.CREATE, ACLOperation.READ, ACLOperation.WRITE,
               prefixed=True),
        *allow(user, ResourceType.TOPIC, topics["alerts"], alerts),
        *allow(user, ResourceType.TOPIC, topics["dlq"], ACLOperation.WRITE),
        # The importer writes the input, and checks that the other two topics exist (it would create them).
        *allow(IMPORTER, ResourceType.TOPIC, topics["input"], ACLOperation.WRITE),
        *allow(IMPORTER, ResourceType.TOPIC, topics["alerts"], ACLOperation.DESCRIBE),
        *allow(IMPORTER, ResourceType.TOPIC, topics["dlq"], ACLOperation.DESCRIBE),
        # `alerts tail` reads the alerts; `alerts notify` also commits in its group.
        *allow(READER, ResourceType.TOPIC, topics["alerts"], ACLOperation.READ),
        *allow(READER, ResourceType.GROUP, f"{app}-alerts-notify", ACLOperation.READ),
        # ... and keeps its sent-set and dead letters in topics of its own.
        *allow(READER, ResourceType.TOPIC, f"{app}-notify-", ACLOperation.CREATE, ACLOperation.READ,
               ACLOperation.WRITE, ACLOperation.DESCRIBE, prefixed=True),
    ])  # fmt: skip
    # conftest's producer is on PLAINTEXT, where User:ANONYMOUS may not even get a producer id.
    worker.producer.close()
    worker.producer = KafkaProducer(linger_ms=5, **sasl(kafka, pki, IMPORTER))
    return worker


def crm_pulse(env: dict, *args: str, timeout: float = 120) -> tuple[subprocess.CompletedProcess, float]:
    """A `crm-pulse` command's result, and the seconds it took."""
    started = time.monotonic()
    result = subprocess.run([sys.executable, "-m", "crm_pulse.cli", *args], env=env, cwd=ROOT, capture_output=True,
                            text=True, timeout=timeout)  # fmt: skip
    return result, time.monotonic() - started


# A log record, as crm_pulse.cli formats them, below ERROR.
LOG_RECORD = re.compile(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} (DEBUG|INFO|WARNING) ")


def said(result: subprocess.CompletedProcess) -> list[str]:
    """The lines of stderr that are neither log records (a busy machine gets kafka-python's warnings about slow
    tasks, for one) nor the import's progress bars."""
    return [line for line in result.stderr.splitlines()
            if not LOG_RECORD.match(line) and not line.startswith(("reading ", "publishing "))]  # fmt: skip


def failed_logins(kafka) -> int:
    return kafka.log_path.read_text().count("Failed authentication")


def processed(metrics: dict) -> dict[str, float]:
    return {dict(labels)["type"]: v for (name, labels), v in metrics.items()
            if name == "crm_events_processed_total" and v}  # fmt: skip


def m(name: str, **labels: str) -> tuple:
    return name, tuple(sorted(labels.items()))


def http_text(worker: Worker, path: str) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{worker.port}{path}", timeout=5) as response:
        return response.read().decode()


def assert_no_password(*texts: str) -> None:
    for password in PASSWORDS.values():
        assert [line for text in texts for line in text.splitlines() if password in line] == []


# --- the tests -------------------------------------------------------------------------------------------

# A Maven-style export (mappings/maven-crm.toml): O1 and O2 close a day after engaging, O3 stays engaging (2-day
# threshold here), O4 has no date (rejected), O5 moves event time to 6 January: O3 has stalled on the 3rd and
# escalated on the 5th.
EXPORT = [
    ["O1", "Ann Smith", "GTX", "Acme", "Won", "01-01-26", "02-01-26", "1000"],
    ["O2", "Bob Jones", "GTX", "Acme", "Lost", "01-01-26", "02-01-26", "0"],
    ["O3", "Cara Diaz", "GTX", "Acme", "Engaging", "01-01-26", "", ""],
    ["O4", "Ann Smith", "GTX", "", "Prospecting", "", "", ""],
    ["O5", "Bob Jones", "GTX", "Acme", "Won", "06-01-26", "06-01-26", "500"],
]
CARA = "rep-" + pseudonymise("Cara Diaz")
MAPPING = ROOT / "mappings" / "maven-crm.toml"


def write_export(tmp_path: Path) -> Path:
    export = tmp_path / "export.csv"
    with open(export, "w", newline="") as f:
        csv.writer(f).writerows([["opportunity_id", "sales_agent", "product", "account", "deal_stage", "engage_date",
                                  "close_date", "close_value"], *EXPORT])  # fmt: skip
    return export


def test_worker_import_tail_and_notify_over_sasl_ssl_with_least_privilege(kafka, pki, admin, tmp_path):
    worker = secured_worker(kafka, pki, admin, tmp_path, WORKER).start()
    try:
        imported, _ = crm_pulse({**worker.env, **sasl_env(kafka, pki, IMPORTER)}, "import", str(write_export(tmp_path)),
                                "--mapping", str(MAPPING), "--rejects", str(tmp_path / "rejects.csv"))  # fmt: skip
        assert imported.returncode == 0, imported.stderr[-3000:]
        assert [row[0] for row in csv.reader(open(tmp_path / "rejects.csv"))] == ["line", "5"]

        stalled = m("crm_alerts_emitted_total", type="lead.stalled")
        escalated = m("crm_alerts_emitted_total", type="lead.stall_escalated")
        revenue = m("crm_won_revenue", window="all")
        metrics = worker.wait_for(
            lambda got: sum(processed(got).values()) == 7 and got.get(escalated) == 1 and got.get(revenue) == 1500,
            what="7 imported events, O3's escalation and the aggregates",
        )
        assert processed(metrics) == {"lead.created": 4, "deal.won": 2, "deal.lost": 1}
        assert metrics[m("crm_win_rate_ratio", window="all")] == pytest.approx(2 / 3)
        assert metrics[stalled] == 1

        reader = {**worker.env, **sasl_env(kafka, pki, READER)}
        tail, _ = crm_pulse(reader, "alerts", "tail", "--from-beginning", "--no-follow")
        assert tail.returncode == 0, tail.stderr[-3000:]
        assert tail.stdout.splitlines() == [
            f"2026-01-03T00:00:00.000Z lead.stalled rep={CARA} lead=O3 stage=engaging idle=2.0d threshold=2.0d "
            "rule=stage_threshold",
            f"2026-01-05T00:00:00.000Z lead.stall_escalated rep={CARA} lead=O3 stage=engaging idle=4.0d "
            "threshold=2.0d rule=stage_threshold",
        ]  # fmt: skip
        # The dead letters keep personal data: the alerts' reader may not read them.
        reader_of_dlq = {**reader, "CRM_PULSE_ALERTS_TOPIC": worker.topic("dlq"), "CRM_PULSE_LOG_LEVEL": "info"}
        denied, _ = crm_pulse(reader_of_dlq, "alerts", "tail", "--no-follow")
        assert denied.returncode == 1
        assert said(denied) == [f"crm-pulse: topic {worker.topic('dlq')} does not exist on {kafka.url_of('SASL_SSL')}, "
                                f"or User:{READER} may not read it"]  # fmt: skip

        hook = Webhook()
        try:
            notify, _ = crm_pulse(reader, "alerts", "notify", "--webhook-url", hook.url, "--from-beginning",
                                  "--max-idle", "3")  # fmt: skip
        finally:
            hook.close()
        assert notify.returncode == 0, notify.stderr[-3000:]
        assert "notify stopped: posted=2 failed=0 duplicate=0 invalid=0" in notify.stderr
        assert [(status, body["text"]) for status, body in hook.requests] == [
            (200, f"Lead O3 (account Acme) stalled in stage engaging: idle 2.0d, threshold 2.0d, rep {CARA}"),
            (200, f"Lead O3 (account Acme) still stalled in stage engaging (escalated): idle 4.0d, threshold 2.0d, "
                  f"rep {CARA}"),
        ]

        status, kpis = worker.get_json("/kpis")
        assert status == 200
        assert {s["labels"]["window"]: s["value"] for s in kpis["kpis"]["crm_won_revenue"]}["all"] == 1500
        assert_no_password(worker.log_path.read_text(), http_text(worker, "/metrics"), http_text(worker, "/kpis"),
                           *(r.stdout + r.stderr for r in (imported, tail, notify)))  # fmt: skip
        # Not vacuous: the debug log tells of the logins (the log-in check's, then Faust's clients'), user and all.
        assert worker.log_path.read_text().count(f"Authenticated as {WORKER} via SCRAM-SHA-512") >= 2
    finally:
        worker.stop()


def test_a_wrong_password_is_one_line_and_one_failed_login_per_command(kafka, pki, admin, tmp_path):
    worker = secured_worker(kafka, pki, admin, tmp_path, WORKER)
    wrong = "Wr0ng-pw-5d1e"
    port = kafka.ports["SASL_SSL"]
    commands = {
        "worker": (WORKER, ["worker"]),
        "import": (IMPORTER, ["import", str(write_export(tmp_path)), "--mapping", str(MAPPING),
                              "--rejects", str(tmp_path / "rejects.csv")]),
        "alerts tail": (READER, ["alerts", "tail", "--no-follow"]),
        "alerts notify": (READER, ["alerts", "notify", "--webhook-url", "http://127.0.0.1:9/never", "--max-idle", "1"]),
    }  # fmt: skip
    for name, (user, args) in commands.items():
        before = failed_logins(kafka)
        result, seconds = crm_pulse({**worker.env, **sasl_env(kafka, pki, user, password=wrong),
                                     "CRM_PULSE_LOG_LEVEL": "info"}, *args)  # fmt: skip
        assert result.returncode == 1, (name, result.stderr[-3000:])
        assert seconds < EXIT_SECONDS, name
        assert said(result) == [
            f"crm-pulse: authentication to 127.0.0.1:{port} failed (SASL_SSL, SCRAM-SHA-512, user {user}): "
            "check CRM_PULSE_SASL_USERNAME and CRM_PULSE_SASL_PASSWORD"
        ], (name, result.stderr[-3000:])
        # The broker writes its line a moment after it answered.
        deadline = time.monotonic() + 5
        while failed_logins(kafka) == before and time.monotonic() < deadline:
            time.sleep(0.1)
        assert failed_logins(kafka) - before == 1, name
        assert wrong not in result.stdout + result.stderr


def test_a_principal_that_may_not_write_the_alerts_topic_is_told_so_at_start(kafka, pki, admin, tmp_path):
    # It may see the alerts topic, so the worker need not create it, but not write it.
    worker = secured_worker(kafka, pki, admin, tmp_path, NO_ALERTS, alerts=ACLOperation.DESCRIBE)
    result, seconds = crm_pulse({**worker.env, "CRM_PULSE_LOG_LEVEL": "info"}, "worker")
    assert result.returncode == 1 and seconds < EXIT_SECONDS
    assert said(result) == [
        f"crm-pulse: User:{NO_ALERTS} may not write topic {worker.topic('alerts')} on {kafka.url_of('SASL_SSL')} "
        "(allowed: DESCRIBE): grant it WRITE"
    ], result.stderr[-3000:]

    # A dead-letter topic it can neither see nor create.
    unknown = f"{worker.topic('dlq')}-elsewhere"
    result, _ = crm_pulse({**worker.env, "CRM_PULSE_LOG_LEVEL": "info", "CRM_PULSE_DLQ_TOPIC": unknown}, "worker")
    assert result.returncode == 1
    assert said(result) == [
        f"crm-pulse: User:{NO_ALERTS} may not create topic {unknown} on {kafka.url_of('SASL_SSL')} "
        "(TopicAuthorizationFailedError): create it beforehand, or grant CREATE"
    ], result.stderr[-3000:]


def test_a_server_certificate_from_another_ca_is_refused(kafka, pki, admin, tmp_path, caplog):
    rogue = pki / "rogue-ca.pem"
    worker = secured_worker(kafka, pki, admin, tmp_path, WORKER)
    refusal = re.compile(rf"crm-pulse: certificate verification of 127\.0\.0\.1:{kafka.ports['SASL_SSL']} failed "
                         rf"\(.*certificate.*\) against {re.escape(str(rogue))}: check CRM_PULSE_SSL_CAFILE")
    result, seconds = crm_pulse({**worker.env, **sasl_env(kafka, pki, WORKER, cafile=rogue)}, "worker")
    assert result.returncode == 1 and seconds < EXIT_SECONDS
    # At debug level (the worker's here) the line comes after the traceback of how it came about.
    assert refusal.fullmatch(result.stderr.splitlines()[-1]), result.stderr[-3000:]
    assert "ssl.SSLCertVerificationError" in result.stderr

    reader = {**worker.env, **sasl_env(kafka, pki, READER, cafile=rogue), "CRM_PULSE_LOG_LEVEL": "info"}
    result, seconds = crm_pulse(reader, "alerts", "tail", "--no-follow")
    assert result.returncode == 1 and seconds < EXIT_SECONDS
    assert len(said(result)) == 1 and refusal.fullmatch(said(result)[0]), result.stderr[-3000:]

    # kafka-python's own TLS refuses the certificate too, though it says why only in its log.
    caplog.set_level(logging.WARNING, logger="kafka")
    with pytest.raises(KafkaTimeoutError, match="Unable to bootstrap"):
        KafkaAdminClient(**{**sasl(kafka, pki, ADMIN), "ssl_cafile": str(rogue)}, bootstrap_timeout_ms=2000)
    assert any("CERTIFICATE_VERIFY_FAILED" in message for message in caplog.messages)


def test_mutual_tls_the_certificate_is_the_principal(kafka, pki, admin, tmp_path):
    # The ACLs name User:crm-pulse-worker: only the CN of the worker's certificate can be that principal here.
    worker = secured_worker(kafka, pki, admin, tmp_path, WORKER, security=mtls_env(kafka, pki)).start()
    try:
        worker.send(
            {"event_id": "m1", "type": "lead.created", "occurred_at": T0, "lead_id": "L1",
             "payload": {"source": "web"}},
            {"event_id": "m2", "type": "deal.won", "occurred_at": T0 + 3_600_000, "lead_id": "L1",
             "payload": {"amount": 70}},
        )  # fmt: skip
        revenue = m("crm_won_revenue", window="all")
        # The aggregates trail the per-lead agent by one internal topic.
        metrics = worker.wait_for(lambda got: sum(processed(got).values()) == 2 and got.get(revenue) == 70,
                                  what="2 events over mutual TLS, and their revenue")  # fmt: skip
        assert processed(metrics) == {"lead.created": 1, "deal.won": 1}
    finally:
        worker.stop()

    # Without a certificate the broker ends every TLS handshake: the client never gets in.
    before = failed_logins(kafka)
    no_certificate = Settings(broker=kafka.url_of("MTLS"), security_protocol="SSL", ssl_cafile=str(pki / "ca.pem"))
    unanswered = rf"^no broker answered at 127\.0\.0\.1:{kafka.ports['MTLS']} within 2 s \(SSL\)"
    with pytest.raises(BrokerUnusable, match=unanswered):
        log_in(no_certificate, timeout=2)
    assert failed_logins(kafka) > before


def test_the_plaintext_listener_grants_nothing(kafka, pki, admin):
    admin.create_topics({"plaintext-probe": {"num_partitions": 1, "replication_factor": 1}})
    assert "plaintext-probe" in admin.list_topics()
    anonymous = KafkaAdminClient(bootstrap_servers=[f"127.0.0.1:{kafka.port}"])
    try:
        assert anonymous.list_topics() == []
        assert anonymous.describe_cluster()["authorized_operations"] == []
        with pytest.raises(TopicAuthorizationFailedError):
            anonymous.create_topics({"plaintext-made": {"num_partitions": 1, "replication_factor": 1}})
    finally:
        anonymous.close()
    producer = KafkaProducer(bootstrap_servers=[f"127.0.0.1:{kafka.port}"], enable_idempotence=False, max_block_ms=5000)
    try:
        with pytest.raises(TopicAuthorizationFailedError):
            producer.send("plaintext-probe", b"x").get(timeout=10)
    finally:
        producer.close()
