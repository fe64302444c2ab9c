"""The one settings object of every process, read once from the environment.

Nothing else in the project reads ``os.environ``: a process calls :func:`load_settings`
at start, and hands the frozen result down. A bad value fails there, with a message that
names the variable. Secrets are :class:`~pydantic.SecretStr` and masked when printed.

libpq's own ``PG*`` variables are left to libpq: ``DATABASE_URL`` may be as short as
``postgresql:///chargify`` and psycopg fills in the rest.
"""

from __future__ import annotations

import os
import re
from typing import Any, Literal
from urllib.parse import urlsplit, urlunsplit

from pydantic import Field, SecretStr, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from chargify_stream.base.errors import ConfigError

# Local defaults: the addresses `chargify-stream up` starts Kafka and Postgres on.
DEFAULT_KAFKA = "127.0.0.1:9092"
DEFAULT_DATABASE_URL = "postgresql://postgres@127.0.0.1:5433/chargify"
_LOOPBACK = frozenset({"localhost", "127.0.0.1", "::1"})
_SUBDOMAIN = re.compile(r"[a-z0-9](?:[a-z0-9-]*[a-z0-9])?")

# The pipeline's topics, by the short name :meth:`Settings.topic` takes.
TOPICS = (
    "raw",
    "transactions",
    "subscriptions",
    "deadletter",
    "sink_retry",
    "decisions",
    "customers",
)


class Settings(BaseSettings):
    """Effective configuration. Field names map to upper-case environment variables."""

    model_config = SettingsConfigDict(frozen=True, extra="ignore", case_sensitive=False)

    kafka_bootstrap_servers: str = DEFAULT_KAFKA
    # How every Kafka client connects (chargify_stream.base.kafka_config turns these into
    # each client library's settings). PLAINTEXT is a local broker; managed clusters
    # take SASL_SSL with a SCRAM or PLAIN mechanism.
    kafka_security_protocol: Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"] = "PLAINTEXT"
    kafka_sasl_mechanism: Literal["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"] | None = None
    kafka_sasl_username: str = ""
    kafka_sasl_password: SecretStr = SecretStr("")
    # A PEM file of the CA(s) that signed the brokers' certificates; empty: the system's.
    kafka_ssl_ca_location: str = ""
    database_url: SecretStr = SecretStr(DEFAULT_DATABASE_URL)
    chargify_shared_keys: SecretStr = SecretStr("")
    gateway_host: str = "127.0.0.1"
    gateway_port: int = Field(default=8080, ge=1, le=65535)

    # Gateway behaviour.
    gateway_max_body_bytes: int = Field(default=1024 * 1024, ge=1024)
    gateway_publish_timeout_s: float = Field(default=5.0, gt=0, le=14)
    gateway_allow_unsigned: bool = False
    # Request bodies held at once across all requests (bodies are read before their
    # signature can be checked): above it, 503 with Retry-After.
    gateway_max_inflight_bytes: int = Field(default=32 * 1024 * 1024, ge=1024)
    # Deadlines per connection, each under Chargify's 15 s wait for an answer: request
    # headers from the connection (or the request's first byte), the whole body from the
    # headers, and an idle keep-alive connection's next request.
    gateway_header_timeout_s: float = Field(default=5.0, gt=0, le=14)
    gateway_body_timeout_s: float = Field(default=5.0, gt=0, le=14)
    gateway_keep_alive_s: float = Field(default=5.0, gt=0, le=300)

    # Kafka names. Each can be set alone; KAFKA_TOPIC_PREFIX is put before every one.
    kafka_topic_prefix: str = ""
    topic_raw: str = "chargify.webhooks.raw"
    topic_transactions: str = "chargify.transactions"
    topic_subscriptions: str = "chargify.subscriptions"
    topic_deadletter: str = "chargify.deadletter"
    topic_sink_retry: str = "chargify.sink.retry"
    # The processor's decisions that leave no other record (ignored, duplicate): read by
    # the sink's outcome recorder into webhook_outcomes.
    topic_decisions: str = "chargify.processor.decisions"
    # Compacted mirror of the customers table, for in-stream attribution joins.
    topic_customers: str = "chargify.customers"
    topic_partitions: int = Field(default=3, ge=1)
    topic_replication_factor: int = Field(default=1, ge=1)
    # -1: dead letters are kept until dealt with (replayed or purged by an operator).
    deadletter_retention_ms: int = Field(default=-1, ge=-1)
    processor_app_id: str = "chargify-processor"
    sink_group_id: str = "chargify-sink"

    # Processor behaviour.
    processor_web_port: int = Field(default=6066, ge=1, le=65535)
    processor_dedup_window_s: int = Field(default=7 * 24 * 3600, ge=60)
    processor_data_dir: str = ".local/processor"

    # Sink behaviour.
    sink_batch_size: int = Field(default=1000, ge=1)
    sink_batch_timeout_ms: int = Field(default=50, ge=1)
    sink_metrics_port: int = Field(default=9108, ge=0, le=65535)
    # Whether the sink keeps webhook_outcomes (what happened to every webhook); off only
    # to measure what it costs.
    outcome_log: bool = True

    # Where the processor's and the sink's metrics and health endpoints listen (0.0.0.0
    # for Prometheus in another container); the gateway's are on GATEWAY_HOST.
    metrics_host: str = "127.0.0.1"

    # The operators' web page (`chargify-stream console`).
    console_host: str = "127.0.0.1"
    console_port: int = Field(default=8090, ge=1, le=65535)

    # Chargify's management API, for `reconcile` and `connect`. The base URL is
    # https://<CHARGIFY_SUBDOMAIN>.chargify.com unless CHARGIFY_API_URL says otherwise
    # (the EU host https://<subdomain>.ebilling.maxio.com, or a local stand-in).
    chargify_subdomain: str = ""
    chargify_api_key: SecretStr = SecretStr("")
    chargify_api_url: str = ""
    reconcile_metrics_port: int = Field(default=9110, ge=0, le=65535)

    log_level: str = "INFO"
    log_format: Literal["text", "json"] = "text"

    @model_validator(mode="after")
    def _inflight_holds_a_body(self) -> Settings:
        if self.gateway_max_inflight_bytes < self.gateway_max_body_bytes:
            raise ValueError(
                "GATEWAY_MAX_INFLIGHT_BYTES must be at least GATEWAY_MAX_BODY_BYTES "
                f"({self.gateway_max_body_bytes}), or no body of the limit could be taken"
            )
        return self

    @field_validator("kafka_bootstrap_servers")
    @classmethod
    def _bootstrap_not_empty(cls, value: str) -> str:
        servers = [s.strip() for s in value.split(",") if s.strip()]
        if not servers or any(":" not in s for s in servers):
            raise ValueError("expected host:port[,host:port...]")
        return ",".join(servers)

    @field_validator("kafka_security_protocol", "kafka_sasl_mechanism", mode="before")
    @classmethod
    def _upper(cls, value: Any) -> Any:
        if isinstance(value, str):
            value = value.strip().upper()
            return value or None
        return value

    @model_validator(mode="after")
    def _kafka_security(self) -> Settings:
        sasl = self.kafka_security_protocol.startswith("SASL_")
        if sasl and self.kafka_sasl_mechanism is None:
            raise ValueError(
                f"KAFKA_SECURITY_PROTOCOL={self.kafka_security_protocol} needs "
                "KAFKA_SASL_MECHANISM (PLAIN, SCRAM-SHA-256 or SCRAM-SHA-512)"
            )
        if sasl and not (self.kafka_sasl_username and self.kafka_sasl_password.get_secret_value()):
            raise ValueError(
                f"KAFKA_SECURITY_PROTOCOL={self.kafka_security_protocol} needs "
                "KAFKA_SASL_USERNAME and KAFKA_SASL_PASSWORD"
            )
        if not sasl and self.kafka_sasl_mechanism is not None:
            raise ValueError(
                f"KAFKA_SASL_MECHANISM is set but KAFKA_SECURITY_PROTOCOL is "
                f"{self.kafka_security_protocol}: use SASL_SSL (or SASL_PLAINTEXT)"
            )
        if self.kafka_ssl_ca_location and not self.kafka_security_protocol.endswith("SSL"):
            raise ValueError(
                f"KAFKA_SSL_CA_LOCATION is set but KAFKA_SECURITY_PROTOCOL is "
                f"{self.kafka_security_protocol}: use SSL or SASL_SSL"
            )
        if self.kafka_ssl_ca_location and not os.path.isfile(self.kafka_ssl_ca_location):
            raise ValueError(f"KAFKA_SSL_CA_LOCATION: no such file {self.kafka_ssl_ca_location!r}")
        return self

    @field_validator("database_url")
    @classmethod
    def _database_url_scheme(cls, value: SecretStr) -> SecretStr:
        scheme = urlsplit(value.get_secret_value()).scheme
        if scheme not in {"postgresql", "postgres"}:
            raise ValueError("expected a postgresql:// URL")
        return value

    @field_validator("chargify_subdomain")
    @classmethod
    def _subdomain(cls, value: str) -> str:
        value = value.strip().lower()
        if value and not _SUBDOMAIN.fullmatch(value):
            raise ValueError("expected the site's subdomain alone, e.g. acme (not a URL)")
        return value

    @field_validator("chargify_api_url")
    @classmethod
    def _api_url(cls, value: str) -> str:
        value = value.strip().rstrip("/")
        if value:
            parts = urlsplit(value)
            if parts.scheme not in {"http", "https"} or not parts.hostname:
                raise ValueError("expected an http(s):// base URL, e.g. https://acme.chargify.com")
            if parts.username or parts.password or parts.query:
                raise ValueError("expected a base URL without credentials or query")
            if parts.scheme == "http" and parts.hostname not in _LOOPBACK:
                # The API key travels in every request: only over TLS, but for a local
                # stand-in. Chargify itself drops connections without TLS 1.2.
                raise ValueError("expected https:// (http:// only for a local stand-in)")
        return value

    @field_validator("log_level")
    @classmethod
    def _log_level(cls, value: str) -> str:
        level = value.upper()
        if level not in {"DEBUG", "INFO", "WARNING", "ERROR"}:
            raise ValueError("expected DEBUG, INFO, WARNING or ERROR")
        return level

    @property
    def shared_keys(self) -> tuple[bytes, ...]:
        """The Chargify site shared keys, as bytes; several during a key rotation."""
        raw = self.chargify_shared_keys.get_secret_value()
        return tuple(k.strip().encode() for k in raw.split(",") if k.strip())

    def topic(self, name: str) -> str:
        """The full name of topic ``raw``, ``transactions``, ``subscriptions``, ``deadletter``,
        ``sink_retry``, ``decisions`` or ``customers``."""
        return self.kafka_topic_prefix + str(getattr(self, f"topic_{name}"))

    @property
    def all_topics(self) -> tuple[str, ...]:
        return tuple(self.topic(n) for n in TOPICS)

    def chargify_base_url(self) -> str:
        """The base URL of Chargify's API for this site; :class:`ConfigError` if unknown."""
        if self.chargify_api_url:
            return self.chargify_api_url
        if self.chargify_subdomain:
            return f"https://{self.chargify_subdomain}.chargify.com"
        raise ConfigError(
            "CHARGIFY_SUBDOMAIN is not set (nor CHARGIFY_API_URL): which Chargify site?"
        )

    def chargify_key(self) -> str:
        """The Chargify API key; :class:`ConfigError` naming the variable if it is empty."""
        key = self.chargify_api_key.get_secret_value().strip()
        if not key:
            raise ConfigError(
                "CHARGIFY_API_KEY is not set: create an API key in Chargify "
                "(Config > Integrations) and set it"
            )
        return key

    def database_dsn(self) -> str:
        return self.database_url.get_secret_value()

    def as_env(self) -> dict[str, str]:
        """These settings as environment variables, to hand to a child process."""
        out = {}
        for name, value in self.model_dump().items():
            if isinstance(value, SecretStr):
                value = value.get_secret_value()
            elif value is None:
                value = ""
            out[name.upper()] = str(value).lower() if isinstance(value, bool) else str(value)
        return out

    def masked(self) -> dict[str, Any]:
        """The settings as plain values, with every secret masked."""
        out: dict[str, Any] = {}
        for name, value in self.model_dump().items():
            if name == "database_url":
                out[name] = _mask_url(value.get_secret_value())
            elif isinstance(value, SecretStr):
                count = len(self.shared_keys) if name == "chargify_shared_keys" else None
                out[name] = f"****** ({count} keys)" if count is not None else "******"
            else:
                out[name] = value
        return out


def _mask_url(url: str) -> str:
    parts = urlsplit(url)
    if parts.password is None:
        return url
    host = parts.hostname or ""
    if parts.port:
        host = f"{host}:{parts.port}"
    netloc = f"{parts.username}:******@{host}" if parts.username else f":******@{host}"
    return urlunsplit(parts._replace(netloc=netloc))


def load_settings(**overrides: Any) -> Settings:
    """Read the environment once; raise :class:`ConfigError` naming any bad variable."""
    try:
        return Settings(**overrides)
    except ValidationError as exc:
        problems = []
        for err in exc.errors():
            field = ".".join(str(p) for p in err["loc"])
            if field:
                problems.append(f"{field.upper()}: {err['msg']}")
            else:  # a check across variables; its message names them
                problems.append(str(err["msg"]).removeprefix("Value error, "))
        raise ConfigError("invalid configuration: " + "; ".join(problems)) from None
