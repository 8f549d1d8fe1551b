"""SASL and TLS settings from the environment reach both Kafka clients: the options aiokafka gets through
Faust (`agents.app._credentials`) and those kafka-python gets (`crm_pulse.broker.client_security`).
The embedded broker can neither serve TLS nor authenticate SASL clients (tests/integration/test_security.py
shows what reaches a real broker); this checks every protocol and mechanism the settings accept."""

import ssl

import pytest
from faust.transport.drivers.aiokafka import credentials_to_aiokafka_auth

from crm_pulse.agents.app import _credentials
from crm_pulse.broker import client_security
from crm_pulse.config import Settings

PASSWORD = "s3cr3t-Pa55"


@pytest.mark.parametrize("mechanism", ["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"])
@pytest.mark.parametrize("protocol", ["SASL_PLAINTEXT", "SASL_SSL"])
def test_sasl_settings_reach_aiokafka_and_kafka_python(monkeypatch, protocol, mechanism):
    for name, value in {"SECURITY_PROTOCOL": protocol, "SASL_MECHANISM": mechanism,
                        "SASL_USERNAME": "crm-pulse", "SASL_PASSWORD": PASSWORD}.items():  # fmt: skip
        monkeypatch.setenv(f"CRM_PULSE_{name}", value)
    settings = Settings()
    aiokafka = credentials_to_aiokafka_auth(_credentials(settings))
    assert (aiokafka["security_protocol"], aiokafka["sasl_mechanism"]) == (protocol, mechanism)
    assert (aiokafka["sasl_plain_username"], aiokafka["sasl_plain_password"]) == ("crm-pulse", PASSWORD)
    assert isinstance(aiokafka["ssl_context"], ssl.SSLContext) == (protocol == "SASL_SSL")
    assert client_security(settings) == {"security_protocol": protocol, "sasl_mechanism": mechanism,
                                         "sasl_plain_username": "crm-pulse", "sasl_plain_password": PASSWORD}  # fmt: skip
    assert PASSWORD not in repr(settings)


def test_tls_settings_reach_both_clients_even_with_a_leftover_sasl_mechanism(monkeypatch):
    monkeypatch.setenv("CRM_PULSE_SECURITY_PROTOCOL", "SSL")
    monkeypatch.setenv("CRM_PULSE_SASL_MECHANISM", "PLAIN")  # ignored: the protocol decides
    settings = Settings()
    aiokafka = credentials_to_aiokafka_auth(_credentials(settings))
    assert aiokafka["security_protocol"] == "SSL" and "sasl_mechanism" not in aiokafka
    assert isinstance(aiokafka["ssl_context"], ssl.SSLContext)
    assert client_security(settings) == {"security_protocol": "SSL"}


def test_plaintext_has_no_credentials():
    settings = Settings(security_protocol="PLAINTEXT")
    assert _credentials(settings) is None
    assert client_security(settings) == {"security_protocol": "PLAINTEXT"}
