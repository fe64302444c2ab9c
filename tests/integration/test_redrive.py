"""Parked ``customer_not_found`` events re-drive themselves once the customer exists.

Real processor and sink processes, a real broker and Postgres: a payment for an unknown
customer is dead-lettered; creating the customer (any way) makes the transaction appear,
attributed to the customer's partner, without anyone running a replay.
"""

from __future__ import annotations

import re
import time
from datetime import UTC, datetime
from typing import Any

import httpx
import pytest

from chargify_stream.base.settings import Settings
from chargify_stream.local.ports import free_port
from chargify_stream.schemas.deadletter import format_timestamp
from tests.builders import build_body
from tests.integration.test_dlq import cli, cli_json, ends, payment, query, wait_for
from tests.kafka_tools import consume, headers_of, produce

pytestmark = pytest.mark.integration


def metric(settings: Settings, name: str, labels: str) -> float:
    """One sample from a sink's /metrics; 0 when absent or the sink is not serving yet."""
    try:
        text = httpx.get(f"http://127.0.0.1:{settings.sink_metrics_port}/metrics").text
    except httpx.HTTPError:
        return 0.0
    found = re.search(rf"^{re.escape(name)}\{{{re.escape(labels)}\}} (\S+)$", text, re.M)
    return float(found.group(1)) if found else 0.0


def test_customers_add_redrives_a_parked_payment_within_seconds(
    settings: Settings, stages: Any
) -> None:
    # Two sinks, as in production: both run a re-driver, only one may re-publish.
    sinks = [settings, settings.model_copy(update={"sink_metrics_port": free_port()})]
    stages("processor", settings)
    for instance in sinks:
        stages("sink", instance)
    body = build_body(
        "payment_success",
        webhook_id=4_300_000_001,
        reference="cust-r",
        subscription_id=4_300_000_002,
        transaction_id=4_300_000_003,
        amount_cents=12_300,
    )
    produce(
        settings.kafka_bootstrap_servers,
        settings.topic("raw"),
        [
            (
                b"4300000002",
                body,
                [
                    ("chargify-webhook-id", b"4300000001"),
                    ("chargify-event", b"payment_success"),
                    ("received-at", format_timestamp(datetime.now(UTC)).encode()),
                    ("content-type", b"application/x-www-form-urlencoded"),
                    ("source-ip", b"127.0.0.1"),
                ],
            )
        ],
    )

    [letter] = consume(settings.kafka_bootstrap_servers, settings.topic("deadletter"), count=1)
    assert headers_of(letter)["dlq-reason"] == b"customer_not_found"
    [listed] = cli_json(settings, "dlq", "list")
    assert (listed["reason"], listed["stage"], listed["customer"], listed["webhook_id"]) == (
        "customer_not_found",
        "sink",
        "cust-r",
        "4300000001",
    )
    wait_for(
        lambda: query(settings, "select 1 from parked_events where customer_key = 'cust-r'"),
        "the dead letter to be parked",
    )
    wait_for(
        lambda: sum(metric(s, "sink_parked_events_waiting", 'age="0-1m"') for s in sinks) >= 1,
        "the parked-events gauge",
        timeout=15,
    )
    assert (
        sum(
            metric(s, "sink_deadletter_records_total", 'reason="customer_not_found",stage="sink"')
            for s in sinks
        )
        == 1
    )
    assert query(settings, "select count(*) from transactions") == [(0,)]

    assert cli(settings, "partners", "add", "partner-r").returncode == 0
    started = time.monotonic()
    added = cli(settings, "customers", "add", "cust-r", "--partner", "partner-r")
    committed = time.monotonic()
    assert added.returncode == 0, added.stderr
    row = wait_for(
        lambda: query(
            settings,
            "select transaction_id, customer_key, partner_key, amount_cents from transactions",
        ),
        "the re-driven transaction",
        timeout=15,
    )
    landed = time.monotonic()
    assert row == [(4_300_000_003, "cust-r", "partner-r", 12_300)]
    print(
        f"re-drive latency: {landed - started:.2f}s from `customers add` started, "
        f"{landed - committed:.2f}s from its exit"
    )
    assert landed - committed < 10

    # Exactly one re-publication, although two re-drivers were listening; to the sink's
    # retry topic, not the transactions topic, which holds the payment once.
    out = consume(
        settings.kafka_bootstrap_servers, settings.topic("sink_retry"), count=1, settle=2.0
    )
    assert [headers_of(m).get("dlq-replay-count") for m in out] == [b"1"]
    # Read as an analyst does (the end offset also counts the transaction's commit marker).
    typed = consume(
        settings.kafka_bootstrap_servers, settings.topic("transactions"), count=2, timeout=5
    )
    assert len(typed) == 1
    assert query(settings, "select count(*) from parked_events where redriven_at is null") == [(0,)]
    assert ends(settings)["deadletter"] == 1


def test_redrive_survives_a_sink_restart_and_any_path_creating_the_customer(
    settings: Settings, stages: Any
) -> None:
    sink = stages("sink", settings)
    produce(
        settings.kafka_bootstrap_servers,
        settings.topic("transactions"),
        [payment("cust-s", amount_cents=700)],
    )
    wait_for(
        lambda: query(settings, "select 1 from parked_events where customer_key = 'cust-s'"),
        "the dead letter to be parked",
    )
    # A graceful stop, so the restarted sink gets the partitions at once (after a SIGKILL
    # the group waits out the dead member's session timeout, 45 s, before reassigning).
    assert sink.stop() == 0
    # Created by hand while no sink runs: no notification reaches anyone.
    query(settings, "insert into customers (customer_key) values ('cust-s') returning 1")
    stages("sink", settings)
    row = wait_for(
        lambda: query(settings, "select customer_key, amount_cents from transactions"),
        "the transaction after the restart",
    )
    assert row == [("cust-s", 700)]
    assert query(settings, "select count(*) from parked_events where redriven_at is not null") == [
        (1,)
    ]
