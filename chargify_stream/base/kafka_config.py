"""How every Kafka client of the project connects: one place for the connection settings.

Each client library spells them its own way; these functions turn the ``KAFKA_*``
settings (bootstrap servers, security protocol, SASL mechanism and credentials, the CA
file) into each one's configuration:

- :func:`librdkafka_config` for confluent-kafka producers, consumers and admin clients
  (the gateway, the sink, the re-driver, ``dlq``, topic creation, the processor's outputs);
- :func:`aiokafka_config` for an aiokafka client;
- :func:`faust_credentials` for the processor's Faust app (its aiokafka consumer and
  producer).

A client is built from one of these plus only its own behaviour (acks, group id, ...),
so a cluster that needs TLS or SASL is reached by every stage and command alike. The
password is handed to the client library and nowhere else: these dicts are never logged.
"""

from __future__ import annotations

import ssl
import time
from typing import Any

from confluent_kafka import KafkaError, KafkaException
from confluent_kafka.admin import AdminClient

from chargify_stream.base.errors import ConfigError
from chargify_stream.base.settings import Settings

__all__ = [
    "aiokafka_config",
    "check_credentials",
    "describe",
    "faust_credentials",
    "librdkafka_config",
    "ssl_context",
]

# What librdkafka reports, without giving up, when the cluster refuses the client: it
# retries them for ever, so a stage would otherwise wait without saying why.
_REFUSALS = {
    KafkaError._AUTHENTICATION: "KAFKA_SASL_USERNAME, KAFKA_SASL_PASSWORD and KAFKA_SASL_MECHANISM",
    KafkaError.SASL_AUTHENTICATION_FAILED: (
        "KAFKA_SASL_USERNAME, KAFKA_SASL_PASSWORD and KAFKA_SASL_MECHANISM"
    ),
    KafkaError._SSL: "KAFKA_SSL_CA_LOCATION and KAFKA_SECURITY_PROTOCOL",
}


def librdkafka_config(settings: Settings, **extra: Any) -> dict[str, Any]:
    """The connection part of a confluent-kafka client's configuration, plus ``extra``.

    ``extra`` uses librdkafka's dotted names; pass them as a dict, e.g.
    ``librdkafka_config(settings, **{"group.id": "g", "enable.auto.commit": False})``.
    """
    protocol = settings.kafka_security_protocol
    conf: dict[str, Any] = {
        "bootstrap.servers": settings.kafka_bootstrap_servers,
        "security.protocol": protocol.lower(),
    }
    if protocol.startswith("SASL_"):
        conf["sasl.mechanism"] = settings.kafka_sasl_mechanism
        conf["sasl.username"] = settings.kafka_sasl_username
        conf["sasl.password"] = settings.kafka_sasl_password.get_secret_value()
    if protocol.endswith("SSL") and settings.kafka_ssl_ca_location:
        conf["ssl.ca.location"] = settings.kafka_ssl_ca_location
    conf.update(extra)
    return conf


def ssl_context(settings: Settings) -> ssl.SSLContext | None:
    """The TLS context of a Python client, with hostname checks; None without TLS."""
    if not settings.kafka_security_protocol.endswith("SSL"):
        return None
    return ssl.create_default_context(cafile=settings.kafka_ssl_ca_location or None)


def aiokafka_config(settings: Settings, **extra: Any) -> dict[str, Any]:
    """The connection keyword arguments of an aiokafka client, plus ``extra``."""
    protocol = settings.kafka_security_protocol
    conf: dict[str, Any] = {
        "bootstrap_servers": settings.kafka_bootstrap_servers.split(","),
        "security_protocol": protocol,
    }
    context = ssl_context(settings)
    if context is not None:
        conf["ssl_context"] = context
    if protocol.startswith("SASL_"):
        conf["sasl_mechanism"] = settings.kafka_sasl_mechanism
        conf["sasl_plain_username"] = settings.kafka_sasl_username
        conf["sasl_plain_password"] = settings.kafka_sasl_password.get_secret_value()
    conf.update(extra)
    return conf


def faust_credentials(settings: Settings) -> Any:
    """The ``broker_credentials`` of a Faust app (None for PLAINTEXT).

    Faust hands them to every aiokafka client it makes (consumer, producers, and the
    client that creates its changelog topics).
    """
    import faust

    protocol = settings.kafka_security_protocol
    if protocol == "PLAINTEXT":
        return None
    context = ssl_context(settings)
    if protocol == "SSL":
        assert context is not None
        return faust.SSLCredentials(context)
    return faust.SASLCredentials(
        username=settings.kafka_sasl_username,
        password=settings.kafka_sasl_password.get_secret_value(),
        ssl_context=context,  # None: SASL_PLAINTEXT
        mechanism=settings.kafka_sasl_mechanism,
    )


def describe(settings: Settings) -> str:
    """Where and how the clients connect, for messages: never the password."""
    how: str = settings.kafka_security_protocol
    if how.startswith("SASL_"):
        how += f" {settings.kafka_sasl_mechanism} as {settings.kafka_sasl_username!r}"
    return f"Kafka at {settings.kafka_bootstrap_servers} ({how})"


def check_credentials(settings: Settings, timeout: float = 10.0) -> None:
    """Raise :class:`ConfigError` if the cluster refuses this client's TLS or SASL login.

    Called by every command that talks to Kafka before it starts: a wrong password or an
    untrusted certificate is then a clear failure at start, naming the variables to
    check, where librdkafka alone would retry it for ever. A cluster that does not answer
    within ``timeout`` seconds is left to the command (each retries an absent broker in
    its own way). Nothing to check for PLAINTEXT.
    """
    if settings.kafka_security_protocol == "PLAINTEXT":
        return
    errors: list[KafkaError] = []
    admin = AdminClient(librdkafka_config(settings, log_level=0, error_cb=errors.append))
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            admin.list_topics(timeout=0.5)
            return
        except KafkaException:
            admin.poll(0)  # serves error_cb
        for err in errors:
            if err.code() in _REFUSALS:
                raise ConfigError(
                    f"{describe(settings)} refused the connection: {err.str()} "
                    f"(check {_REFUSALS[err.code()]})"
                )
