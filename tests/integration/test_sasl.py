"""The whole pipeline against a broker that only speaks SASL_SSL (SCRAM-SHA-512 over TLS).

The broker (``sasl_kafka`` in ``tests/conftest.py``) has no PLAINTEXT listener: a client
that did not take the security settings could not reach it at all. Gateway, processor,
sink (and its re-driver) run as processes with the ``KAFKA_*`` security variables in
their environment, as an operator would run them against a managed cluster; ``dlq``
reads and replays, and ``tail`` reads, over the same connection.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from confluent_kafka import Producer

from chargify_stream.base.kafka_admin import ensure_pipeline_topics
from chargify_stream.base.kafka_config import librdkafka_config
from chargify_stream.base.settings import Settings, load_settings
from chargify_stream.local.kafka import LocalKafka
from chargify_stream.sink.admin import add_customer, add_partner, connect
from tests.builders import build_body
from tests.conftest import settings_values
from tests.integration.test_dlq import cli_json, wait_for
from tests.kafka_tools import consume, end_offsets, headers_of
from tests.pipeline import Pipeline
from tests.stages import Stage, run_cli

pytestmark = pytest.mark.integration

SUB = 7_100_000_001


@pytest.fixture
def sasl_settings(
    sasl_kafka: LocalKafka, database_factory: Callable[..., str], tmp_path: Path
) -> Settings:
    settings = load_settings(
        **settings_values(tmp_path, database_url=database_factory()),
        **sasl_kafka.settings_overrides(),
    )
    ensure_pipeline_topics(settings)
    return settings


@pytest.fixture
def pipeline(sasl_settings: Settings, stages: Callable[..., Stage]) -> Iterator[Pipeline]:
    p = Pipeline(sasl_settings, stages)
    yield p
    p.close()


def test_a_signed_payment_and_a_dead_letter_go_through_a_sasl_ssl_cluster(
    sasl_settings: Settings, pipeline: Pipeline
) -> None:
    settings = sasl_settings
    assert settings.kafka_security_protocol == "SASL_SSL"
    with connect(settings) as conn:
        add_partner(conn, "p1", "Partner One")
        add_customer(conn, "c1", partner="p1")

    paid = build_body(
        "payment_success", webhook_id=301, transaction_id=9301, amount_cents=6400,
        subscription_id=SUB, reference="c1",
    )  # fmt: skip
    orphan = build_body(
        "payment_success", webhook_id=302, transaction_id=9302, amount_cents=1200,
        subscription_id=SUB + 1, reference="nobody",
    )  # fmt: skip
    assert [pipeline.post(paid), pipeline.post(orphan)] == [200, 200]
    pipeline.wait_for(
        "select transaction_id, customer_key, partner_key, amount_cents from transactions",
        [(9301, "c1", "p1", 6400)],
    )

    # The sink dead-letters the payment of a customer that does not exist yet.
    wait_for(lambda: end_offsets(settings, settings.topic("deadletter")) == 1, "a dead letter")
    [letter] = cli_json(settings, "dlq", "list")
    assert (letter["customer"], letter["reason"], letter["stage"], letter["attempts"]) == (
        "nobody",
        "customer_not_found",
        "sink",
        1,
    )

    # Replayed by hand (the customer still missing): the sink reads it again and
    # dead-letters it a second time.
    replay = cli_json(settings, "dlq", "replay", "--customer", "nobody")
    assert (replay["replayed"], replay["failed"]) == (1, 0)
    wait_for(lambda: end_offsets(settings, settings.topic("deadletter")) == 2, "the replay")
    [again] = cli_json(settings, "dlq", "list")
    assert (again["attempts"], again["records"]) == (2, 2)

    # Once the customer exists, the sink's re-driver replays it on its own.
    with connect(settings) as conn:
        add_customer(conn, "nobody", partner="p1")
    pipeline.wait_for(
        "select transaction_id, customer_key from transactions order by transaction_id",
        [(9301, "c1"), (9302, "nobody")],
    )
    [record, *_] = consume(settings, settings.topic("transactions"), count=1)
    assert headers_of(record)["chargify-webhook-id"] == b"301"

    # What analysts read, over the same connection.
    tail = run_cli(settings, "tail", "transactions", "--from-beginning", "--json")
    assert tail.returncode == 0, tail.stderr
    assert '"transaction_id": 9301' in tail.stdout


def test_a_wrong_password_is_refused_at_start_by_every_stage_and_command(
    sasl_kafka: LocalKafka, sasl_settings: Settings, stages: Callable[..., Stage]
) -> None:
    wrong = load_settings(
        **{**sasl_settings.model_dump(), "kafka_sasl_password": "not-the-password"}
    )
    started = time.monotonic()
    running = [stages(name, wrong) for name in ("gateway", "processor", "sink")]
    for stage in running:
        assert stage.proc is not None
        code = stage.proc.wait(timeout=30)  # bounded: no stage waits for ever
        output = stage.log()
        assert code == 2, output
        assert "refused the connection" in output, output
        assert "Authentication failed" in output and "KAFKA_SASL_PASSWORD" in output, output
        assert "not-the-password" not in output
    assert time.monotonic() - started < 30

    listed = run_cli(wrong, "dlq", "list")
    assert listed.returncode == 2, listed.stderr
    assert "refused the connection" in listed.stderr
    assert "not-the-password" not in listed.stderr + listed.stdout


def test_a_broker_certificate_from_an_unknown_ca_is_refused_at_start(
    sasl_settings: Settings,
) -> None:
    # Without KAFKA_SSL_CA_LOCATION the system's CAs are trusted, and they did not sign
    # the test broker's certificate.
    untrusting = sasl_settings.model_copy(update={"kafka_ssl_ca_location": ""})
    done = run_cli(untrusting, "dlq", "stats")
    assert done.returncode == 2, done.stderr
    assert "certificate verify failed" in done.stderr
    assert "KAFKA_SSL_CA_LOCATION" in done.stderr


def test_the_right_password_is_not_shown_by_config(sasl_settings: Settings) -> None:
    shown = run_cli(sasl_settings, "config")
    assert shown.returncode == 0, shown.stderr
    password = sasl_settings.kafka_sasl_password.get_secret_value()
    assert password not in shown.stdout
    assert "KAFKA_SASL_PASSWORD" in shown.stdout and "******" in shown.stdout
    assert "KAFKA_SECURITY_PROTOCOL" in shown.stdout and "SASL_SSL" in shown.stdout


def test_a_transactional_producer_commits_over_sasl_ssl(sasl_settings: Settings) -> None:
    # Transaction markers go through the broker's own SASL_SSL listener: without the
    # broker's SCRAM user only transactional produce fails (SASL_AUTHENTICATION_FAILED).
    producer = Producer(
        librdkafka_config(sasl_settings, **{"transactional.id": f"t-{uuid.uuid4().hex}"})
    )
    producer.init_transactions(30)
    producer.begin_transaction()
    producer.produce(sasl_settings.topic("transactions"), key=b"k", value=b"v")
    producer.commit_transaction(30)
    [record] = consume(sasl_settings, sasl_settings.topic("transactions"), count=1)
    assert (record.key(), record.value()) == (b"k", b"v")
