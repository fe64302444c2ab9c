"""The Kafka security settings, and the one place that turns them into client configs."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import faust
import pytest

from chargify_stream.base.errors import ConfigError
from chargify_stream.base.kafka_config import (
    aiokafka_config,
    describe,
    faust_credentials,
    librdkafka_config,
)
from chargify_stream.base.settings import load_settings
from tests.stages import run_cli

SCRAM = {
    "kafka_bootstrap_servers": "b1:9096,b2:9096",
    "kafka_security_protocol": "SASL_SSL",
    "kafka_sasl_mechanism": "SCRAM-SHA-512",
    "kafka_sasl_username": "pipeline",
    "kafka_sasl_password": "s3cret",
}


def test_plaintext_is_the_default_and_adds_nothing_but_the_protocol() -> None:
    settings = load_settings()
    assert librdkafka_config(settings, **{"group.id": "g"}) == {
        "bootstrap.servers": settings.kafka_bootstrap_servers,
        "security.protocol": "plaintext",
        "group.id": "g",
    }
    assert faust_credentials(settings) is None
    assert aiokafka_config(settings)["security_protocol"] == "PLAINTEXT"
    assert "ssl_context" not in aiokafka_config(settings)


def test_scram_over_tls_reaches_every_client_library(tmp_path: Path) -> None:
    ca = tmp_path / "ca.pem"
    ca.write_text(_a_ca_certificate(tmp_path))
    settings = load_settings(**SCRAM, kafka_ssl_ca_location=str(ca))
    assert librdkafka_config(settings, acks="all") == {
        "bootstrap.servers": "b1:9096,b2:9096",
        "security.protocol": "sasl_ssl",
        "sasl.mechanism": "SCRAM-SHA-512",
        "sasl.username": "pipeline",
        "sasl.password": "s3cret",
        "ssl.ca.location": str(ca),
        "acks": "all",
    }
    aio = aiokafka_config(settings)
    assert aio["bootstrap_servers"] == ["b1:9096", "b2:9096"]
    assert (aio["security_protocol"], aio["sasl_mechanism"]) == ("SASL_SSL", "SCRAM-SHA-512")
    assert (aio["sasl_plain_username"], aio["sasl_plain_password"]) == ("pipeline", "s3cret")
    assert aio["ssl_context"].check_hostname
    credentials = faust_credentials(settings)
    assert isinstance(credentials, faust.SASLCredentials)
    assert credentials.protocol.value == "SASL_SSL"
    assert credentials.mechanism.value == "SCRAM-SHA-512"
    assert credentials.ssl_context is not None and credentials.ssl_context.check_hostname
    assert "s3cret" not in describe(settings) + repr(credentials)


def test_sasl_without_tls_and_tls_without_sasl() -> None:
    plain = load_settings(**{**SCRAM, "kafka_security_protocol": "SASL_PLAINTEXT"})
    assert librdkafka_config(plain)["security.protocol"] == "sasl_plaintext"
    assert "ssl.ca.location" not in librdkafka_config(plain)
    credentials = faust_credentials(plain)
    assert credentials.protocol.value == "SASL_PLAINTEXT" and credentials.ssl_context is None

    tls = load_settings(kafka_security_protocol="ssl")
    assert librdkafka_config(tls) == {
        "bootstrap.servers": tls.kafka_bootstrap_servers,
        "security.protocol": "ssl",
    }
    assert isinstance(faust_credentials(tls), faust.SSLCredentials)


@pytest.mark.parametrize(
    ("values", "named"),
    [
        ({"kafka_security_protocol": "TLS"}, "KAFKA_SECURITY_PROTOCOL"),
        ({"kafka_security_protocol": "SASL_SSL"}, "KAFKA_SASL_MECHANISM"),
        ({**SCRAM, "kafka_sasl_mechanism": "GSSAPI"}, "KAFKA_SASL_MECHANISM"),
        ({**SCRAM, "kafka_sasl_password": ""}, "KAFKA_SASL_PASSWORD"),
        ({**SCRAM, "kafka_sasl_username": ""}, "KAFKA_SASL_USERNAME"),
        ({"kafka_sasl_mechanism": "PLAIN"}, "KAFKA_SECURITY_PROTOCOL"),
        ({"kafka_ssl_ca_location": "/etc/hostname"}, "KAFKA_SSL_CA_LOCATION"),
        ({**SCRAM, "kafka_ssl_ca_location": "/no/such/ca.pem"}, "KAFKA_SSL_CA_LOCATION"),
    ],
)
def test_a_bad_combination_fails_at_start_naming_the_variable(
    values: dict[str, Any], named: str
) -> None:
    with pytest.raises(ConfigError, match=named):
        load_settings(**values)


def test_the_password_is_masked_by_config_and_handed_to_child_processes() -> None:
    settings = load_settings(**SCRAM)
    assert settings.masked()["kafka_sasl_password"] == "******"
    env = settings.as_env()
    assert env["KAFKA_SASL_PASSWORD"] == "s3cret"
    assert env["KAFKA_SASL_MECHANISM"] == "SCRAM-SHA-512"
    assert load_settings(**{k.lower(): v for k, v in env.items()}) == settings
    # No mechanism: handed on as empty, which reads back as none.
    plain = load_settings().as_env()
    assert plain["KAFKA_SASL_MECHANISM"] == ""
    assert load_settings(**{k.lower(): v for k, v in plain.items()}).kafka_sasl_mechanism is None


def test_config_command_never_prints_the_password() -> None:
    shown = run_cli(load_settings(**SCRAM), "config")
    assert shown.returncode == 0, shown.stderr
    assert "s3cret" not in shown.stdout + shown.stderr
    assert "pipeline" in shown.stdout  # the user name is not a secret


def test_up_refuses_security_settings_it_cannot_honour(tmp_path: Path) -> None:
    from chargify_stream.local.up import run

    with pytest.raises(ConfigError, match="KAFKA_SECURITY_PROTOCOL"):
        run(load_settings(**SCRAM), data_dir=str(tmp_path))


def _a_ca_certificate(tmp_path: Path) -> str:
    from chargify_stream.local.kafka import make_certificates

    ca, _ = make_certificates(tmp_path / "tls")
    return ca.read_text()


def test_every_client_in_the_package_connects_through_kafka_config() -> None:
    # A client built from a bare "bootstrap.servers" cannot reach a cluster that needs TLS
    # or SASL (tests/integration/test_sasl.py finds that too, but slowly): each stage and
    # command takes its connection from chargify_stream.base.kafka_config.
    root = Path(__file__).resolve().parents[2]
    allowed = {
        "chargify_stream/base/kafka_config.py",  # the one place
        "chargify_stream/base/kafka_admin.py",  # bare bootstrap servers given by a test or bench
        "chargify_stream/local/kafka.py",  # the local broker's own readiness check
        "ingest/publisher.py",  # takes its connection from ingest/server.py as **config
    }
    offenders = []
    for folder in ("chargify_stream", "ingest", "processors", "sink"):
        for path in sorted((root / folder).rglob("*.py")):
            name = path.relative_to(root).as_posix()
            text = path.read_text()
            if name not in allowed and '"bootstrap.servers"' in text:
                offenders.append(f"{name}: a client config with its own bootstrap.servers")
            for call in text.split("faust.App(")[1:]:
                if "broker_credentials=" not in call.split("\n    )")[0]:
                    offenders.append(f"{name}: faust.App without broker_credentials")
    assert offenders == []
