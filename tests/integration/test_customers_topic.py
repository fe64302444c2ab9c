"""``chargify.customers`` mirrors the ``customers`` table, whatever changes it.

Real sink (and processor) processes, a real broker and Postgres. Customers are changed with
plain SQL (and the CLI), never through the relay's own code; what reaches the compacted
topic is read back as an analyst would, and joined with ``chargify.transactions``.
"""

from __future__ import annotations

import time
import uuid
from datetime import UTC, datetime
from typing import Any

import psycopg
import pytest
from confluent_kafka import Consumer, Message, TopicPartition
from confluent_kafka.admin import AdminClient, ConfigResource

from chargify_stream.base.settings import Settings
from chargify_stream.schemas.codec import decode, decode_record
from chargify_stream.schemas.records import Customer, Transaction
from chargify_stream.sink.customer_relay import CustomerRelay
from tests.integration.test_dlq import cli, query, wait_for
from tests.integration.test_sink_retry import webhook
from tests.kafka_tools import consume, end_offsets, headers_of, produce

pytestmark = pytest.mark.integration


def customer_records(settings: Settings, count: int, settle: float = 0.5) -> list[Message]:
    return consume(
        settings.kafka_bootstrap_servers, settings.topic("customers"), count=count, settle=settle
    )


def state(msg: Message) -> Customer | None:
    """A customers-topic record's value: the customer, or ``None`` for a tombstone."""
    value = msg.value()
    if value is None:
        return None
    record = decode_record(value)
    assert isinstance(record, Customer)
    return record


def test_insert_update_and_delete_by_plain_sql_reach_the_topic(
    settings: Settings, stages: Any
) -> None:
    query(settings, "insert into partners (partner_key) values ('p-1'), ('p-2') returning 1")
    stages("sink", settings)
    before = datetime.now(UTC)
    query(
        settings,
        "insert into customers (customer_key, partner_key, email, name)"
        " values ('c-1', 'p-1', 'ada@example.com', 'Ada') returning 1",
    )
    topic = settings.topic("customers")
    wait_for(lambda: end_offsets(settings.kafka_bootstrap_servers, topic) == 1, "the insert")
    changed = time.monotonic()
    query(
        settings, "update customers set partner_key = 'p-2' where customer_key = 'c-1' returning 1"
    )
    wait_for(lambda: end_offsets(settings.kafka_bootstrap_servers, topic) == 2, "the update")
    print(f"an update reached the topic {time.monotonic() - changed:.2f}s after its commit")
    # Rolled back: never happened, never published.
    with psycopg.connect(settings.database_dsn()) as conn:
        conn.execute("insert into customers (customer_key) values ('c-ghost')")
        conn.rollback()
    # An update that changes nothing publishes nothing.
    query(settings, "update customers set name = name where customer_key = 'c-1' returning 1")
    query(settings, "delete from customers where customer_key = 'c-1' returning 1")

    records = customer_records(settings, count=3, settle=2.0)
    assert [m.key() for m in records] == [b"c-1"] * 3
    created, moved, deleted = (state(m) for m in records)
    assert created is not None and moved is not None
    assert (created.customer_key, created.partner_key, created.email, created.name) == (
        "c-1",
        "p-1",
        "ada@example.com",
        "Ada",
    )
    assert (moved.partner_key, moved.email, moved.name) == ("p-2", "ada@example.com", "Ada")
    assert before <= created.updated_at < moved.updated_at <= datetime.now(UTC)
    assert deleted is None  # a tombstone
    assert query(settings, "select count(*) from customer_changes") == [(0,)]

    # A Customer record is no input of the sink: one that strays onto its topics is
    # dead-lettered, not written.
    produce(
        settings.kafka_bootstrap_servers,
        settings.topic("sink_retry"),
        [(b"c-1", records[0].value() or b"", [])],
    )
    [letter] = consume(settings.kafka_bootstrap_servers, settings.topic("deadletter"), count=1)
    assert headers_of(letter)["dlq-reason"] == b"unsupported_schema"

    # Compacted: the latest record of each key is kept for good.
    admin = AdminClient({"bootstrap.servers": settings.kafka_bootstrap_servers})
    resource = ConfigResource(ConfigResource.Type.TOPIC, settings.topic("customers"))
    config = admin.describe_configs([resource])[resource].result(timeout=10)
    assert config["cleanup.policy"].value == "compact"


def test_a_relay_killed_mid_way_loses_nothing(settings: Settings, stages: Any) -> None:
    total = 20_000
    query(settings, "insert into partners (partner_key) values ('p-1'), ('p-2') returning 1")
    # Queued while no relay runs: inserts, then every second customer moves partner, then
    # every tenth is deleted (with its history).
    query(
        settings,
        "insert into customers (customer_key, partner_key, email)"
        " select 'c-' || i, 'p-1', 'c' || i || '@example.com'"
        " from generate_series(1, %s) i returning 1",
        total,
    )
    query(
        settings,
        "update customers set partner_key = 'p-2'"
        " where split_part(customer_key, '-', 2)::int %% 2 = 0 returning 1",
    )
    query(
        settings,
        "delete from customers where split_part(customer_key, '-', 2)::int %% 10 = 0 returning 1",
    )
    changes = query(settings, "select count(*) from customer_changes")[0][0]
    assert changes == total + total // 2 + total // 10

    topic = settings.topic("customers")
    watcher = Consumer({"bootstrap.servers": settings.kafka_bootstrap_servers, "group.id": "w"})
    partitions = [TopicPartition(topic, 0)]

    def published() -> int:
        return sum(watcher.get_watermark_offsets(tp, timeout=5)[1] for tp in partitions)

    try:
        sink = stages("sink", settings)
        sink.wait_until(lambda: published() >= 2_000, 60, "the first customer records")
        sink.kill()
        at_kill = published()
    finally:
        watcher.close()
    waiting = query(settings, "select count(*) from customer_changes")[0][0]
    print(f"killed with {at_kill} records published and {waiting} changes waiting")
    assert at_kill > 0 and waiting > 0, "the relay was not killed mid-way"

    restarted = time.monotonic()
    stages("sink", settings)
    wait_for(
        lambda: query(settings, "select count(*) from customer_changes") == [(0,)],
        "the outbox drained after the restart",
        timeout=120,
    )
    print(f"{waiting} changes drained {time.monotonic() - restarted:.1f}s after the restart")
    records = customer_records(settings, count=changes, settle=1.0)
    assert len(records) >= changes  # at least once: a batch may be published twice

    # Each customer's history, repeats of a republished batch folded: nothing missing,
    # nothing out of order, and the last state is the table's.
    history: dict[str, list[str | None]] = {}
    for msg in records:
        customer = state(msg)
        partner = None if customer is None else customer.partner_key
        seen = history.setdefault((msg.key() or b"").decode(), [])
        if not seen or seen[-1] != partner:
            seen.append(partner)
    expected: dict[str, list[str | None]] = {}
    for i in range(1, total + 1):
        steps: list[str | None] = ["p-1"]
        if i % 2 == 0:
            steps.append("p-2")
        if i % 10 == 0:
            steps.append(None)
        expected[f"c-{i}"] = steps
    assert history == expected
    table = dict(query(settings, "select customer_key, partner_key from customers"))
    assert {k: v[-1] for k, v in history.items() if v[-1] is not None} == table


def _read_all(bootstrap: str, topic: str) -> list[Message]:
    """Every record of ``topic`` (read_committed), up to its current end."""
    count = end_offsets(bootstrap, topic)
    return consume(bootstrap, topic, count=count, settle=0.5) if count else []


def attribute_from_topics(settings: Settings) -> dict[int, str | None]:
    """transaction id -> partner, from the two topics alone: a stream-table join.

    Records are taken in the order they were written (Kafka timestamp); each transaction
    takes its customer's partner as the customers topic stood then, as the sink did.
    """
    bootstrap = settings.kafka_bootstrap_servers
    customers = _read_all(bootstrap, settings.topic("customers"))
    transactions = _read_all(bootstrap, settings.topic("transactions"))
    timeline = sorted(
        [(m.timestamp()[1], 0, m) for m in customers]
        + [(m.timestamp()[1], 1, m) for m in transactions],
        key=lambda item: (item[0], item[1]),
    )
    partners: dict[str, str | None] = {}
    attributed: dict[int, str | None] = {}
    for _, is_transaction, msg in timeline:
        if not is_transaction:
            key = (msg.key() or b"").decode()
            customer = state(msg)
            if customer is None:
                partners.pop(key, None)
            else:
                partners[key] = customer.partner_key
            continue
        record = decode(msg.value() or b"")
        assert isinstance(record, Transaction)
        if record.customer_reference in partners:  # else: parked, not in Postgres either
            attributed[record.transaction_id] = partners[record.customer_reference]
    return attributed


def test_joining_the_topics_gives_the_attribution_postgres_has(
    settings: Settings, stages: Any
) -> None:
    query(settings, "insert into partners (partner_key) values ('p-a'), ('p-b') returning 1")
    assert cli(settings, "customers", "add", "c-a", "--partner", "p-a").returncode == 0
    query(
        settings,
        "insert into customers (customer_key, partner_key) values ('c-b', 'p-b'),"
        " ('c-none', null), ('c-gone', 'p-a') returning 1",
    )
    query(settings, "delete from customers where customer_key = 'c-gone' returning 1")
    stages("processor", settings)
    stages("sink", settings)
    ids = iter(range(4_500_000_001, 4_600_000_000))

    def pay(customer: str) -> tuple[bytes, bytes, list[Any]]:
        return webhook(
            "payment_success",
            next(ids),
            reference=customer,
            subscription_id=next(ids),
            transaction_id=next(ids),
            amount_cents=1_000,
        )

    first = [pay("c-a"), pay("c-b"), pay("c-none"), pay("c-gone")]
    produce(settings.kafka_bootstrap_servers, settings.topic("raw"), first)
    wait_for(
        lambda: query(settings, "select count(*) from transactions") == [(3,)],
        "the first payments recorded",
        timeout=60,
    )

    # The partner changes: payments recorded before keep the old one, later ones get the new.
    query(
        settings, "update customers set partner_key = 'p-b' where customer_key = 'c-a' returning 1"
    )

    def c_a_partner() -> str | None:
        latest = [state(m) for m in customer_records(settings, count=6) if m.key() == b"c-a"]
        return latest[-1].partner_key if latest and latest[-1] else None

    wait_for(lambda: c_a_partner() == "p-b", "the partner change on the customers topic")
    time.sleep(0.01)  # later Kafka timestamps than the change, even at millisecond precision
    produce(settings.kafka_bootstrap_servers, settings.topic("raw"), [pay("c-a")])
    wait_for(
        lambda: query(settings, "select count(*) from transactions") == [(4,)],
        "the second payment recorded",
        timeout=60,
    )

    rows = query(
        settings,
        "select transaction_id, customer_key, partner_key from transactions"
        " order by transaction_id",
    )
    # c-a's payment before the change is p-a's, the one after p-b's.
    assert [(c, p) for _, c, p in rows] == [
        ("c-a", "p-a"),
        ("c-b", "p-b"),
        ("c-none", None),
        ("c-a", "p-b"),
    ]
    in_postgres = {t: p for t, _, p in rows}
    assert attribute_from_topics(settings) == in_postgres


def test_the_outbox_records_every_kind_of_change_and_the_customers_already_there(
    postgres_service: Any,
) -> None:
    from chargify_stream.sink.migrate import available, migrate

    dsn = postgres_service.create_database(f"t_outbox_{uuid.uuid4().hex[:12]}")
    # A database from before the customers topic: its customers must reach the topic too.
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(
            "create table schema_migrations (version integer primary key, name text not null,"
            " applied_at timestamptz not null default now())"
        )
        for m in available():
            if m.version < 4:
                conn.execute(m.sql.encode())
                conn.execute(
                    "insert into schema_migrations (version, name) values (%s, %s)",
                    (m.version, m.name),
                )
        conn.execute("insert into partners (partner_key) values ('p-1')")
        conn.execute(
            "insert into customers (customer_key, partner_key, email) values"
            " ('old-1', 'p-1', 'a@example.com'), ('old-2', null, null)"
        )
    assert "0004_customer_changes.sql" in migrate(dsn)

    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("update customers set customer_key = 'new-2' where customer_key = 'old-2'")
        conn.execute("truncate customers cascade")
        rows = conn.execute(
            "select customer_key, deleted, partner_key, email from customer_changes"
            " order by change_id"
        ).fetchall()
    assert rows == [
        ("old-1", False, "p-1", "a@example.com"),  # already there: copied by the migration
        ("old-2", False, None, None),
        ("old-2", True, None, None),  # re-keyed: the old key is deleted ...
        ("new-2", False, None, None),  # ... and the new one written
        ("new-2", True, None, None),  # truncated: every customer deleted
        ("old-1", True, None, None),
    ]


def test_two_relays_at_once_keep_each_customers_changes_in_order(settings: Settings) -> None:
    relays = [CustomerRelay(settings, poll_interval=0.2, batch_limit=50).start() for _ in range(2)]
    try:
        query(settings, "insert into partners (partner_key) values ('p-1'), ('p-2') returning 1")
        # Changes keep coming while both relays drain: 200 customers, 10 moves each.
        query(
            settings,
            "insert into customers (customer_key, partner_key)"
            " select 'c-' || i, 'p-1' from generate_series(1, 200) i returning 1",
        )
        for step in range(10):
            partner = "p-2" if step % 2 == 0 else "p-1"
            query(settings, "update customers set partner_key = %s returning 1", partner)
        wait_for(
            lambda: query(settings, "select count(*) from customer_changes") == [(0,)],
            "the outbox drained",
            timeout=60,
        )
    finally:
        for relay in relays:
            relay.stop()
    records = customer_records(settings, count=200 * 11, settle=1.0)
    history: dict[str, list[str | None]] = {}
    for msg in records:
        customer = state(msg)
        seen = history.setdefault((msg.key() or b"").decode(), [])
        partner = customer.partner_key if customer else None
        if not seen or seen[-1] != partner:
            seen.append(partner)
    assert history == {f"c-{i}": ["p-1", "p-2"] * 5 + ["p-1"] for i in range(1, 201)}
    # At least once, and here each change exactly once: the lock keeps the relays apart.
    assert len(records) == 200 * 11
