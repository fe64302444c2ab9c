"""The reader API and ``chargify-stream tail`` against the real broker.

Records are written the way the pipeline writes them (single-object Avro values, carried-over
headers, transactional producers for the typed topics, including an aborted transaction a
read_committed reader must never show), then read back through
:mod:`chargify_stream.analytics` and through the command as an operator runs it.
"""

from __future__ import annotations

import json
import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from confluent_kafka import Producer

from chargify_stream import analytics
from chargify_stream.base.settings import Settings
from chargify_stream.local.ports import free_port
from chargify_stream.schemas import headers as h
from chargify_stream.schemas.codec import encode
from chargify_stream.schemas.deadletter import dead_letter_headers, pointer
from chargify_stream.schemas.records import (
    ComponentAllocation,
    Customer,
    SubscriptionChange,
    Transaction,
)
from tests.builders import build_body
from tests.kafka_tools import topics_only_settings
from tests.pipeline import Pipeline
from tests.services import KafkaService
from tests.stages import Stage

pytestmark = pytest.mark.integration

T0 = datetime(2026, 11, 27, 15, 0, tzinfo=UTC)
PAYMENT = Transaction(
    transaction_id=70001,
    kind="payment",
    amount_cents=4900,
    currency="USD",
    customer_reference="cust-1",
    subscription_id=501,
    occurred_at=T0,
    webhook_id=9001,
    event_id=123,
    event="payment_success",
    site_id=1,
    site_subdomain="acme",
)
REFUND = Transaction(
    transaction_id=70002,
    kind="refund",
    amount_cents=-1500,
    customer_reference="cust-2",
    refunded_payment_id=69000,
    occurred_at=T0 + timedelta(hours=1, microseconds=250),
    webhook_id=9002,
    event="refund_success",
)
ABORTED = Transaction(
    transaction_id=70003,
    kind="payment",
    amount_cents=100,
    customer_reference="cust-1",
    occurred_at=T0,
    webhook_id=9003,
    event="payment_success",
)
CHANGE = SubscriptionChange(
    subscription_id=501,
    customer_reference="cust-1",
    state="active",
    product_id=77,
    components=(ComponentAllocation(component_id=5, new_allocation=3.0),),
    occurred_at=T0,
    webhook_id=9004,
    event="component_allocation_change",
)
Record = tuple[bytes | None, bytes | None, list[tuple[str, bytes]]]


@pytest.fixture
def settings(kafka_service: KafkaService) -> Settings:
    """Settings with this test's own topics (two partitions each), and no database."""
    return topics_only_settings(kafka_service.bootstrap_servers)


def carried(webhook_id: int, event: str) -> list[tuple[str, bytes]]:
    return [
        (h.WEBHOOK_ID, str(webhook_id).encode()),
        (h.EVENT, event.encode()),
        (h.RECEIVED_AT, b"2026-11-27T15:00:01.000Z"),
    ]


def write(
    settings: Settings,
    topic: str,
    records: list[Record],
    *,
    abort: Sequence[Record] = (),
    timestamp: datetime | None = None,
) -> None:
    """Write ``records`` in one committed Kafka transaction (and ``abort`` in an aborted one)."""
    producer = Producer(
        {
            "bootstrap.servers": settings.kafka_bootstrap_servers,
            "transactional.id": f"test-{uuid.uuid4().hex}",
        }
    )
    producer.init_transactions(30)
    name = settings.topic(topic)
    millis = int(timestamp.timestamp() * 1000) if timestamp else 0
    for batch, commit in ((abort, False), (records, True)):
        if not batch:
            continue
        producer.begin_transaction()
        for key, value, headers in batch:
            producer.produce(name, value=value, key=key, headers=headers, timestamp=millis)
        producer.flush(30)
        if commit:
            producer.commit_transaction(30)
        else:
            producer.abort_transaction(30)


def keyed(record: Transaction | SubscriptionChange) -> Record:
    return (
        record.customer_reference.encode(),
        encode(record),
        carried(record.webhook_id, record.event),
    )


def cli(settings: Settings, *args: str, env: dict[str, str] | None = None) -> Any:
    return subprocess.run(
        [sys.executable, "-m", "chargify_stream", "tail", *args],
        env={**os.environ, **settings.as_env(), **(env or {})},
        capture_output=True,
        text=True,
        timeout=120,
    )


def json_lines(stdout: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in stdout.splitlines()]


# -- the reader API --------------------------------------------------------------------


def test_transactions_are_plain_dicts_read_committed(settings: Settings) -> None:
    write(settings, "transactions", [keyed(PAYMENT), keyed(REFUND)], abort=[keyed(ABORTED)])

    found = list(analytics.read_transactions(settings, from_beginning=True))

    by_id = {t["transaction_id"]: t for t in found}
    assert sorted(by_id) == [70001, 70002]  # never the aborted 70003
    payment = by_id[70001]
    assert {k: v for k, v in payment.items() if k not in ("partition", "offset")} == {
        "transaction_id": 70001,
        "kind": "payment",
        "amount_cents": 4900,
        "currency": "USD",
        "customer": "cust-1",
        "subscription_id": 501,
        "refunded_payment_id": None,
        "memo": None,
        "occurred_at": "2026-11-27T15:00:00.000000Z",
        "webhook_id": 9001,
        "event_id": 123,
        "event": "payment_success",
        "site_id": 1,
        "site_subdomain": "acme",
        "received_at": "2026-11-27T15:00:01.000Z",
    }
    assert by_id[70002]["amount_cents"] == -1500
    assert by_id[70002]["occurred_at"] == "2026-11-27T16:00:00.000250Z"
    assert isinstance(payment["partition"], int) and isinstance(payment["offset"], int)
    json.dumps(found)  # plain values only


def test_customer_since_and_last_choose_the_records(settings: Settings) -> None:
    old, new = datetime.now(UTC) - timedelta(days=2), datetime.now(UTC)
    write(settings, "transactions", [keyed(PAYMENT)], timestamp=old)
    write(settings, "transactions", [keyed(REFUND)], timestamp=new)

    def ids(**options: Any) -> list[int]:
        return sorted(t["transaction_id"] for t in analytics.read_transactions(settings, **options))

    assert ids(from_beginning=True, customer="cust-2") == [70002]
    assert ids(from_beginning=True, customer="nobody") == []
    assert ids(since=new - timedelta(hours=1)) == [70002]
    assert ids(since="1d") == [70002]
    assert ids(since=old - timedelta(hours=1)) == [70001, 70002]
    assert ids(since=new + timedelta(hours=1)) == []
    assert ids(last=5) == [70001, 70002]
    assert ids() == []  # the end: only records that arrive from now on


def test_subscriptions_customers_and_tombstones(settings: Settings) -> None:
    write(settings, "subscriptions", [keyed(CHANGE)])
    ada = Customer(customer_key="cust-1", partner_key="acme", email="ada@example.com",
                   name="Ada", updated_at=T0)  # fmt: skip
    gone = Customer(customer_key="cust-9", updated_at=T0)
    write(
        settings,
        "customers",
        [(b"cust-1", encode(ada), []), (b"cust-9", encode(gone), []), (b"cust-9", None, [])],
    )

    (change,) = analytics.read_subscriptions(settings, from_beginning=True)
    assert change["customer"] == "cust-1" and change["state"] == "active"
    assert change["components"] == [
        {"component_id": 5, "component_name": None, "previous_allocation": None,
         "new_allocation": 3.0},
    ]  # fmt: skip

    customers = list(analytics.read_customers(settings, from_beginning=True))
    assert {(c["customer_key"], c["deleted"]) for c in customers} == {
        ("cust-1", False), ("cust-9", False), ("cust-9", True),
    }  # fmt: skip
    (current,) = analytics.read_customers(settings, from_beginning=True, customer="cust-1")
    assert (
        current["partner_key"] == "acme" and current["updated_at"] == "2026-11-27T15:00:00.000000Z"
    )


def test_deadletters_and_raw_webhooks(settings: Settings) -> None:
    body = build_body("payment_success", webhook_id=9101, subscription_id=601, reference="cust-7")
    raw_headers = carried(9101, "payment_success")
    write(settings, "raw", [(b"601", body, [*raw_headers, (h.SOURCE_IP, b"192.0.2.1")])])
    parked = dead_letter_headers(
        reason=h.CUSTOMER_NOT_FOUND, stage=h.STAGE_SINK, error="no customer cust-2",
        source_topic=settings.topic("transactions"), source_partition=1, source_offset=4,
        original_headers=carried(9002, "refund_success"),
    )  # fmt: skip
    malformed = dead_letter_headers(
        reason=h.MALFORMED_PAYLOAD, stage=h.STAGE_PROCESSOR, error="bad amount",
        source_topic=settings.topic("raw"), source_partition=0, source_offset=0,
        original_headers=raw_headers,
    )  # fmt: skip
    big_key, big = pointer(b"cust-3", 5_000_000, parked, refusal="Message size too large")
    write(
        settings,
        "deadletter",
        [(b"cust-2", encode(REFUND), parked), (b"601", body, malformed), (big_key, None, big)],
    )

    (webhook,) = analytics.read_raw(settings, from_beginning=True, customer="cust-7")
    assert webhook["webhook_id"] == 9101 and webhook["event"] == "payment_success"
    assert webhook["key"] == "601" and webhook["source_ip"] == "192.0.2.1"
    assert webhook["body"] == body.decode()

    letters = {
        (d["stage"], d["pointer"]): d
        for d in analytics.read_deadletters(settings, from_beginning=True)
    }
    sink, processor = letters[("sink", False)], letters[("processor", False)]
    too_big = letters[("sink", True)]
    assert too_big["record"] is None and too_big["body"] is None
    assert too_big["original_size"] == 5_000_000 and too_big["customer"] == "cust-3"
    assert too_big["webhook_id"] == 9002 and "pointer" in too_big["error"]
    assert sink["reason"] == "customer_not_found" and sink["customer"] == "cust-2"
    assert sink["record"]["transaction_id"] == 70002 and sink["body"] is None
    assert sink["source_partition"] == 1 and sink["replay_count"] == 0
    assert processor["reason"] == "malformed_payload" and processor["customer"] == "cust-7"
    assert processor["record"] is None and processor["body"] == body.decode()
    assert processor["webhook_id"] == 9101


# -- the command -----------------------------------------------------------------------


def test_tail_prints_json_lines_and_a_table(settings: Settings) -> None:
    write(settings, "transactions", [keyed(PAYMENT), keyed(REFUND)], abort=[keyed(ABORTED)])

    done = cli(settings, "transactions", "--from-beginning", "--json")
    assert done.returncode == 0, done.stderr
    assert sorted(t["transaction_id"] for t in json_lines(done.stdout)) == [70001, 70002]

    done = cli(settings, "transactions", "--customer", "cust-1", "--json")  # the last 10
    assert [t["transaction_id"] for t in json_lines(done.stdout)] == [70001]

    done = cli(settings, "transactions", "--from-beginning")
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0].split()[:4] == ["OCCURRED_AT", "CUSTOMER", "KIND", "AMOUNT_CENTS"]
    assert any("cust-2" in line and "refund" in line and "-1500" in line for line in lines)
    assert lines[-1] == "(2 records)"


def test_tail_customers_table_shows_deletions(settings: Settings) -> None:
    ada = Customer(customer_key="cust-1", partner_key="acme", updated_at=T0)
    write(settings, "customers", [(b"cust-1", encode(ada), []), (b"cust-1", None, [])])
    done = cli(settings, "customers", "--from-beginning")
    assert done.returncode == 0, done.stderr
    rows = done.stdout.splitlines()[1:-1]
    assert "acme" in rows[0] and "(deleted)" in rows[1]


def test_tail_follow_prints_records_as_they_arrive(settings: Settings) -> None:
    write(settings, "transactions", [keyed(PAYMENT)])
    with subprocess.Popen(
        [sys.executable, "-m", "chargify_stream", "tail", "transactions", "--json",
         "--follow", "--from-beginning"],
        env={**os.environ, **settings.as_env()},
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    ) as proc:  # fmt: skip
        assert proc.stdout is not None
        stdout = proc.stdout
        lines: queue.Queue[str] = queue.Queue()
        reader = threading.Thread(target=lambda: [lines.put(line) for line in stdout])
        reader.start()
        try:
            assert json.loads(lines.get(timeout=60))["transaction_id"] == 70001
            write(settings, "transactions", [keyed(REFUND)])
            assert json.loads(lines.get(timeout=60))["transaction_id"] == 70002
            time.sleep(1)
            assert proc.poll() is None  # still following
            proc.send_signal(signal.SIGINT)
            assert proc.wait(30) == 130
        finally:
            if proc.poll() is None:
                proc.kill()
            reader.join(30)


def test_tail_says_why_it_fails(settings: Settings) -> None:
    missing = cli(settings, "transactions", env={"KAFKA_TOPIC_PREFIX": "nowhere."})
    assert missing.returncode == 1
    assert "topic nowhere.chargify.transactions does not exist" in missing.stderr

    down = cli(
        settings, "raw", "--timeout", "2",
        env={"KAFKA_BOOTSTRAP_SERVERS": f"127.0.0.1:{free_port()}"},
    )  # fmt: skip
    assert down.returncode == 1 and "unreachable" in down.stderr

    usage = cli(settings, "transactions", "--since", "yesterday-ish")
    assert usage.returncode == 2 and "is not a time" in usage.stderr
    usage = cli(settings, "ledger")
    assert usage.returncode == 2 and "invalid choice" in usage.stderr

    write(settings, "transactions", [(b"cust-1", b"not avro", [])])
    bad = cli(settings, "transactions", "--from-beginning")
    assert bad.returncode == 1
    assert f"{settings.topic('transactions')}[" in bad.stderr and "does not decode" in bad.stderr


def _iterate(records: Iterator[dict[str, Any]]) -> list[dict[str, Any]]:
    return list(records)


def test_reader_arguments_are_checked(settings: Settings) -> None:
    with pytest.raises(ValueError, match="unknown topic"):
        _iterate(analytics.read("ledger", settings))
    with pytest.raises(ValueError, match="timezone-aware"):
        _iterate(analytics.read_transactions(settings, since=datetime(2026, 1, 1)))


# -- the README's quick start, through the whole pipeline --------------------------------

README = Path(__file__).resolve().parents[2] / "README.md"


def quick_start_body() -> bytes:
    """The body the README's quick start signs and POSTs (its printf, unescaped)."""
    found = re.search(r"printf '([^']*)' > /tmp/body\.txt", README.read_text())
    assert found, "the README's quick start has no printf of the webhook body"
    return found.group(1).replace("%%", "%").encode()


def admin(settings: Settings, *args: str) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "chargify_stream", *args],
        env={**os.environ, **settings.as_env()},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr


def test_tail_shows_the_quick_start_payment(
    make_settings: Callable[..., Settings], stages: Callable[..., Stage]
) -> None:
    pipeline_settings = make_settings()
    admin(pipeline_settings, "partners", "add", "acme", "--name", "Acme Partners")
    admin(pipeline_settings, "customers", "add", "cust-1", "--partner", "acme",
          "--email", "ada@example.com")  # fmt: skip
    pipeline = Pipeline(pipeline_settings, stages)
    try:
        assert pipeline.post(quick_start_body()) == 200
        pipeline.wait_for(
            "select transaction_id, customer_key, partner_key, amount_cents from transactions",
            [(70001, "cust-1", "acme", 4900)],
        )
    finally:
        pipeline.close()

    done = cli(pipeline_settings, "transactions", "--from-beginning", "--json")

    assert done.returncode == 0, done.stderr
    (payment,) = json_lines(done.stdout)
    assert {k: payment[k] for k in (
        "transaction_id", "kind", "amount_cents", "currency", "customer", "subscription_id",
        "occurred_at", "webhook_id", "event_id", "event", "site_id", "site_subdomain",
    )} == {
        "transaction_id": 70001, "kind": "payment", "amount_cents": 4900, "currency": None,
        "customer": "cust-1", "subscription_id": 501,
        "occurred_at": "2026-11-27T15:00:00.000000Z",  # 10:00 -0500
        "webhook_id": 9001, "event_id": 123, "event": "payment_success",
        "site_id": 1, "site_subdomain": "acme",
    }  # fmt: skip
    assert payment["received_at"].endswith("Z")
