"""The sink against a real broker and a real Postgres.

Records are written to the sink's two input topics the way the processor writes them
(Avro single-object values keyed by customer reference, with the carried-over headers);
``chargify-stream sink`` runs as a real process, except where a test needs one exact
batch, which it hands to the same ``Sink`` in this process. Every assertion reads
Postgres or a topic.
"""

from __future__ import annotations

import itertools
import random
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import psycopg
import pytest
from confluent_kafka import Consumer, KafkaException, TopicPartition

from chargify_stream.base.settings import Settings
from chargify_stream.local.ports import free_port
from chargify_stream.schemas import headers as h
from chargify_stream.schemas.codec import encode
from chargify_stream.schemas.records import ComponentAllocation, SubscriptionChange, Transaction
from chargify_stream.sink.admin import add_customer, add_partner, add_plan, connect
from chargify_stream.sink.consumer import build_sink
from chargify_stream.sink.upsert import Record, write_batch
from tests.kafka_tools import consume, end_offsets, headers_of, produce
from tests.services import PostgresService
from tests.stages import Stage
from tests.unit.test_sink_fold import reference

pytestmark = pytest.mark.integration

T0 = datetime(2024, 10, 11, 19, 28, 31, tzinfo=UTC)
_ids = itertools.count(5_000_000_001)  # above 2**31, like real Chargify ids


def at(minutes: float) -> datetime:
    return T0 + timedelta(minutes=minutes)


def payment(customer: str, *, tid: int | None = None, amount: int = 4900, **kw: Any) -> Transaction:
    return Transaction(
        transaction_id=next(_ids) if tid is None else tid,
        kind="payment",
        amount_cents=amount,
        currency=kw.pop("currency", "USD"),
        customer_reference=customer,
        occurred_at=kw.pop("occurred_at", T0),
        webhook_id=next(_ids),
        event="payment_success",
        **kw,
    )


def change(
    event: str, customer: str, subscription_id: int, minutes: float, **kw: Any
) -> SubscriptionChange:
    allocations = kw.pop("components", {})
    return SubscriptionChange(
        subscription_id=subscription_id,
        customer_reference=customer,
        components=tuple(
            ComponentAllocation(component_id=c, new_allocation=q) for c, q in allocations.items()
        ),
        occurred_at=at(minutes),
        webhook_id=kw.pop("webhook_id", None) or next(_ids),
        event=event,
        **kw,
    )


def carried_headers(record: Record) -> list[tuple[str, bytes]]:
    return [
        (h.WEBHOOK_ID, str(record.webhook_id).encode()),
        (h.EVENT, record.event.encode()),
        (h.RECEIVED_AT, b"2024-10-11T19:28:32.000Z"),
    ]


def publish(
    settings: Settings, records: Sequence[Record], extra: Sequence[tuple[str, bytes]] = ()
) -> None:
    """Write records to their topic as the processor does, in order, and wait for the acks."""
    for name, kind in (("transactions", Transaction), ("subscriptions", SubscriptionChange)):
        batch = [
            (r.customer_reference.encode(), encode(r), [*carried_headers(r), *extra])
            for r in records
            if isinstance(r, kind)
        ]
        if batch:
            produce(settings.kafka_bootstrap_servers, settings.topic(name), batch)


def committed(settings: Settings) -> int:
    """How many records the sink's group has committed, over both input topics."""
    reader = Consumer(
        {"bootstrap.servers": settings.kafka_bootstrap_servers, "group.id": settings.sink_group_id}
    )
    try:
        parts = [
            TopicPartition(settings.topic(name), p)
            for name in ("transactions", "subscriptions")
            for p in range(settings.topic_partitions)
        ]
        return sum(max(tp.offset, 0) for tp in reader.committed(parts, timeout=10))
    except KafkaException:
        return -1  # the group's coordinator is still being chosen: not known yet
    finally:
        reader.close()


def wait_caught_up(sink: Stage, settings: Settings, timeout: float = 30.0) -> None:
    """Until the sink has committed everything on its input topics (so it is all written)."""
    total = sum(
        end_offsets(settings.kafka_bootstrap_servers, settings.topic(name))
        for name in ("transactions", "subscriptions")
    )
    sink.wait_until(lambda: committed(settings) >= total, timeout, f"{total} records committed")


def query(settings: Settings, sql: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
    with psycopg.connect(settings.database_dsn(), autocommit=True) as conn:
        return conn.execute(sql.encode(), params).fetchall()


def snapshot(settings: Settings) -> dict[str, list[tuple[Any, ...]]]:
    """Every row and column of the two tables the sink writes."""
    return {
        "transactions": query(settings, "select * from transactions order by transaction_id"),
        "subscriptions": query(settings, "select * from subscriptions order by subscription_id"),
    }


def metric(settings: Settings, line_start: str) -> float:
    text = httpx.get(f"http://127.0.0.1:{settings.sink_metrics_port}/metrics", timeout=5).text
    for line in text.splitlines():
        if line.startswith(line_start + " "):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"no metric {line_start} in:\n{text}")


def seed(settings: Settings, customers: Iterable[str] = ("c1",), plans: Iterable[str] = ()) -> None:
    with connect(settings) as conn:
        add_partner(conn, "p1", "Partner One")
        for key in customers:
            add_customer(conn, key, partner="p1")
        for plan in plans:
            add_plan(conn, plan, f"Plan {plan}")


def dead_letters(settings: Settings, count: int, settle: float = 0.0) -> list[Any]:
    return consume(
        settings.kafka_bootstrap_servers,
        settings.topic("deadletter"),
        count=count,
        timeout=5 if count == 0 else 30,
        settle=settle,
    )


# -- each event kind ------------------------------------------------------------------------


def test_each_event_kind_lands_as_its_row(settings: Settings, stages: Any) -> None:
    seed(settings, customers=("c1",), plans=("3792003",))
    with connect(settings) as conn:
        add_customer(conn, "c2")  # no partner
    sub = 15100141
    paid = payment("c1", tid=161537369, amount=6400, subscription_id=sub, occurred_at=at(1))
    refunded = Transaction(
        transaction_id=7001,
        kind="refund",
        amount_cents=-6400,
        currency="USD",
        customer_reference="c1",
        subscription_id=sub,
        refunded_payment_id=161537369,
        occurred_at=at(2),
        webhook_id=next(_ids),
        event="refund_success",
    )
    unattributed = payment("c2", tid=7002, amount=100)
    events = [
        change("signup_success", "c1", sub, 0, state="active", product_id=3792002,
               product_handle="starter"),
        change("subscription_state_change", "c1", sub, 10, state="past_due",
               previous_state="active", product_id=3792002, product_handle="starter"),
        change("subscription_product_change", "c1", sub, 20, state="past_due",
               product_id=3792003, product_handle="basic", previous_product_id=3792002),
        change("component_allocation_change", "c1", sub, 30, state="past_due",
               product_id=3792003, components={277221: 5.0}),
    ]  # fmt: skip
    publish(settings, [paid, refunded, unattributed, *events])
    sink = stages("sink", settings)
    wait_caught_up(sink, settings)

    assert query(
        settings,
        "select transaction_id, customer_key, partner_key, subscription_id, kind, amount_cents,"
        " currency, refunded_payment_id, occurred_at, webhook_id from transactions"
        " order by transaction_id",
    ) == [
        (7001, "c1", "p1", sub, "refund", -6400, "USD", 161537369, at(2), refunded.webhook_id),
        (7002, "c2", None, None, "payment", 100, "USD", None, T0, unattributed.webhook_id),
        (161537369, "c1", "p1", sub, "payment", 6400, "USD", None, at(1), paid.webhook_id),
    ]
    assert query(
        settings,
        "select subscription_id, customer_key, product_id, product_handle, plan_key, state,"
        " components, last_webhook_id from subscriptions",
    ) == [(sub, "c1", 3792003, "basic", "3792003", "past_due", {"277221": 5}, events[3].webhook_id)]
    assert dead_letters(settings, 0) == []
    assert metric(settings, 'sink_rows_written_total{table="transactions"}') == 3


def test_duplicates_and_replays_leave_the_database_unchanged(
    settings: Settings, stages: Any
) -> None:
    seed(settings, customers=("c1", "c2"))
    records: list[Record] = [
        payment("c1"),
        payment("c2", amount=-10),
        change("signup_success", "c1", 42, 0, state="active", product_id=1, components={9: 1}),
        change("component_allocation_change", "c1", 42, 5, product_id=1, components={9: 3}),
        change("subscription_state_change", "c2", 43, 0, state="trialing", product_id=2),
    ]
    publish(settings, records)
    sink = stages("sink", settings)
    wait_caught_up(sink, settings)
    before = snapshot(settings)
    assert len(before["transactions"]) == 2 and len(before["subscriptions"]) == 2

    publish(settings, records)  # duplicates: the same events again
    publish(settings, records[::-1], extra=[(h.DLQ_REPLAY_COUNT, b"1")])  # a replay, reversed
    wait_caught_up(sink, settings)

    assert snapshot(settings) == before  # not even updated_at moved
    assert metric(settings, 'sink_rows_unchanged_total{table="transactions"}') == 4


def test_an_out_of_order_state_change_does_not_regress_state(
    settings: Settings, stages: Any
) -> None:
    seed(settings)
    sub = 77
    newer = change(
        "subscription_state_change", "c1", sub, 20, state="canceled", product_id=5,
        product_handle="pro", components={1: 8},
    )  # fmt: skip
    publish(settings, [newer])
    sink = stages("sink", settings)
    wait_caught_up(sink, settings)

    # Arriving after the newer one, in a later batch: the row guard is the database's.
    older = [
        change("subscription_state_change", "c1", sub, 10, state="active", product_id=4,
               product_handle="basic"),
        # Same event time as the newer one, lower webhook id: older too.
        change("subscription_state_change", "c1", sub, 20, state="active",
               webhook_id=newer.webhook_id - 1),
        # An older allocation: regresses nothing, but component 2 is news.
        change("component_allocation_change", "c1", sub, 15, components={1: 2, 2: 4}),
    ]  # fmt: skip
    publish(settings, older)
    wait_caught_up(sink, settings)

    assert query(
        settings,
        "select state, product_id, product_handle, components, last_webhook_id, last_event_at"
        " from subscriptions where subscription_id = %s",
        (sub,),
    ) == [("canceled", 5, "pro", {"1": 8, "2": 4}, newer.webhook_id, at(20))]


def test_any_arrival_order_and_batching_gives_the_same_subscriptions(
    settings: Settings,
) -> None:
    """Random event histories, shuffled and cut into random batches, written straight
    through ``write_batch``: the stored rows equal applying the events in time order."""
    rnd = random.Random(5)
    seed(settings, customers=("c1", "c2"))
    histories: list[SubscriptionChange] = []
    for sub in range(1, 41):
        for webhook in rnd.sample(range(1, 10_000), rnd.randint(1, 8)):
            histories.append(
                change(
                    "subscription_state_change",
                    rnd.choice(["c1", "c2"]),
                    sub,
                    rnd.randint(0, 4),  # ties in time: webhook id decides
                    webhook_id=webhook,
                    state=rnd.choice([None, "active", "past_due", "canceled"]),
                    product_id=rnd.choice([None, 10, 20]),
                    product_handle=rnd.choice([None, "basic", "pro"]),
                    components={c: rnd.choice([0, 1.5, 7]) for c in rnd.sample([1, 2, 3], 2)},
                )
            )
    arrival = list(histories)
    rnd.shuffle(arrival)
    with psycopg.connect(settings.database_dsn()) as conn:
        while arrival:
            cut = rnd.randint(1, 12)
            write_batch(conn, arrival[:cut])
            arrival = arrival[cut:]

    stored = {
        row[0]: {
            k: v
            for k, v in zip(
                ("customer_key", "webhook_id", "state", "product_id", "product_handle",
                 "components"),
                row[1:],
                strict=True,
            )
            if v is not None
        }
        for row in query(
            settings,
            "select subscription_id, customer_key, last_webhook_id, state, product_id,"
            " product_handle, components from subscriptions",
        )
    }  # fmt: skip
    assert stored == reference(histories)


# -- dead letters ---------------------------------------------------------------------------


def test_unknown_customer_is_dead_lettered_and_the_rest_of_the_batch_lands(
    settings: Settings, stages: Any
) -> None:
    seed(settings)
    known = [payment("c1") for _ in range(3)]
    ghost = payment("ghost-7")
    ghost_signup = change("signup_success", "ghost-7", 501, 0, state="active")
    known_signup = change("signup_success", "c1", 502, 0, state="active")
    # All on the topics before the sink starts, so they come in one batch.
    publish(settings, [known[0], ghost, *known[1:], ghost_signup, known_signup])
    sink = stages("sink", settings)
    wait_caught_up(sink, settings)

    assert [r[0] for r in query(settings, "select transaction_id from transactions")] == sorted(
        t.transaction_id for t in known
    )
    assert query(settings, "select subscription_id from subscriptions") == [(502,)]
    letters = dead_letters(settings, 2, settle=1.0)
    assert len(letters) == 2
    by_value = {m.value(): m for m in letters}
    for original, topic, offset in (
        (ghost, settings.topic("transactions"), 1),
        (ghost_signup, settings.topic("subscriptions"), 0),
    ):
        msg = by_value[encode(original)]  # the original bytes, unchanged
        got = headers_of(msg)
        assert msg.key() == b"ghost-7"
        assert got[h.DLQ_REASON] == b"customer_not_found"
        assert got[h.DLQ_STAGE] == b"sink"
        assert got[h.DLQ_SOURCE_TOPIC] == topic.encode()
        assert got[h.DLQ_SOURCE_PARTITION] == b"0"
        assert got[h.DLQ_SOURCE_OFFSET] == str(offset).encode()
        assert got[h.DLQ_REPLAY_COUNT] == b"0"
        assert b"ghost-7" in got[h.DLQ_ERROR]
        for name, value in carried_headers(original):  # the original headers are kept
            assert got[name] == value
    assert metric(settings, 'sink_dead_letters_total{reason="customer_not_found"}') == 2


def test_poison_records_are_dead_lettered_with_their_sqlstate_and_the_rest_lands(
    settings: Settings,
) -> None:
    """One exact batch, handed to the sink in this process against the real services."""
    seed(settings)
    good = [payment("c1") for _ in range(6)]
    nul_text = payment("c1", currency="US\x00D")  # Postgres text cannot hold NUL: 22021
    nan_allocation = change("component_allocation_change", "c1", 9, 0, components={1: float("nan")})
    fine_change = change("signup_success", "c1", 10, 0, state="active")
    publish(settings, [good[0], nul_text, *good[1:], nan_allocation, fine_change])
    produce(
        settings.kafka_bootstrap_servers,
        settings.topic("transactions"),
        [(b"c1", b"\xc3\x01not-a-known-schema", [])],
    )
    msgs = consume(settings.kafka_bootstrap_servers, settings.topic("transactions"), count=8)
    msgs += consume(settings.kafka_bootstrap_servers, settings.topic("subscriptions"), count=2)
    assert len(msgs) == 10

    sink = build_sink(settings)
    try:
        sink.process(msgs)
    finally:
        sink.close()

    assert [r[0] for r in query(settings, "select transaction_id from transactions")] == sorted(
        t.transaction_id for t in good
    )
    assert query(settings, "select subscription_id from subscriptions") == [(10,)]
    letters = {
        headers_of(m)[h.DLQ_SOURCE_OFFSET] + b"@" + headers_of(m)[h.DLQ_SOURCE_TOPIC]: headers_of(m)
        for m in dead_letters(settings, 3, settle=1.0)
    }
    transactions, subscriptions = (
        settings.topic(n).encode() for n in ("transactions", "subscriptions")
    )
    assert set(letters) == {b"1@" + transactions, b"7@" + transactions, b"0@" + subscriptions}
    assert letters[b"1@" + transactions][h.DLQ_REASON] == b"malformed_payload"
    assert b"SQLSTATE 22021" in letters[b"1@" + transactions][h.DLQ_ERROR]
    assert letters[b"0@" + subscriptions][h.DLQ_REASON] == b"malformed_payload"
    assert b"SQLSTATE 22P02" in letters[b"0@" + subscriptions][h.DLQ_ERROR]
    assert letters[b"7@" + transactions][h.DLQ_REASON] == b"unsupported_schema"
    assert committed(settings) == 10


# -- faults ---------------------------------------------------------------------------------


def transactions_count(settings: Settings) -> tuple[int, int, int]:
    """(rows, distinct ids, sum of amounts): a double insert would show in the first."""
    try:
        [row] = query(
            settings,
            "select count(*), count(distinct transaction_id), coalesce(sum(amount_cents), 0)"
            " from transactions",
        )
    except psycopg.OperationalError:
        return (-1, -1, -1)  # the database is restarting
    return (row[0], row[1], row[2])


def test_postgres_restarted_mid_stream_loses_nothing_and_duplicates_nothing(
    make_settings: Callable[..., Settings], stages: Any, postgres_service: PostgresService
) -> None:
    if not postgres_service.can_restart:
        pytest.skip("needs CHARGIFY_TEST_BACKEND=local to stop and start Postgres")
    settings = make_settings(partitions=2, sink_batch_size=20)
    seed(settings, customers=[f"c{i}" for i in range(4)])
    stream = [payment(f"c{i % 4}", amount=i + 1) for i in range(600)]
    expected = (600, 600, sum(range(1, 601)))
    sink = stages("sink", settings)

    def publish_steadily() -> None:  # before, during and after the outage
        for i in range(0, len(stream), 20):
            publish(settings, stream[i : i + 20])
            time.sleep(0.1)

    publisher = threading.Thread(target=publish_steadily)
    publisher.start()
    try:
        sink.wait_until(lambda: transactions_count(settings)[0] > 0, 30, "the first rows")
        try:
            postgres_service.stop()
            sink.wait_for_log("database unavailable", timeout=30)
            time.sleep(1.0)  # records pile up on the topics meanwhile
        finally:
            postgres_service.start()
    finally:
        publisher.join()

    sink.wait_until(lambda: transactions_count(settings) == expected, 60, f"rows {expected}")
    wait_caught_up(sink, settings)
    assert transactions_count(settings) == expected
    assert sink.running, "the sink must ride out a Postgres restart"
    assert dead_letters(settings, 0) == []
    assert metric(settings, 'sink_transient_retries_total{target="database"}') >= 1


def test_sink_killed_and_restarted_writes_every_transaction_exactly_once(
    make_settings: Callable[..., Settings], stages: Any
) -> None:
    settings = make_settings(partitions=2, sink_batch_size=10)
    seed(settings, customers=[f"c{i}" for i in range(4)])
    records: list[Record] = [payment(f"c{i % 4}", amount=i + 1) for i in range(3000)]
    changes = [
        change("component_allocation_change", f"c{i % 4}", 900 + i % 4, i, components={1: i})
        for i in range(40)
    ]
    publish(settings, [*records, *changes])
    expected = (3000, 3000, sum(range(1, 3001)))

    sink = stages("sink", settings)
    sink.wait_until(lambda: transactions_count(settings)[0] > 0, 30, "the first rows")
    sink.kill()  # SIGKILL: no goodbye, offsets as last committed
    partial = transactions_count(settings)[0]
    assert 0 < partial < 3000, "the kill must land mid-stream"

    sink = stages("sink", settings)
    sink.wait_until(lambda: transactions_count(settings) == expected, 60, f"rows {expected}")
    wait_caught_up(sink, settings)
    assert transactions_count(settings) == expected
    assert query(settings, "select subscription_id, components from subscriptions order by 1") == [
        (900 + k, {"1": 36 + k}) for k in range(4)
    ]


def test_two_sinks_through_a_rebalance_write_every_record_exactly_once(
    make_settings: Callable[..., Settings], stages: Any
) -> None:
    """A second sink joins while records arrive and the group rebalances (the first one's
    batches in flight are committed or consumed again); then the first stops. Nothing is
    lost or written twice, and every subscription ends in its newest state."""
    settings = make_settings(partitions=4, sink_batch_size=20)
    seed(settings, customers=[f"c{i}" for i in range(4)])
    records: list[Record] = [payment(f"c{i % 4}", amount=i + 1) for i in range(6000)]
    changes = [
        change("component_allocation_change", f"c{i % 4}", 700 + i % 8, i, components={1: i})
        for i in range(400)
    ]
    pairs = itertools.zip_longest(records, changes)
    stream: list[Record] = [r for pair in pairs for r in pair if r is not None]
    expected = (6000, 6000, sum(range(1, 6001)))

    published = threading.Event()

    def publish_steadily() -> None:  # before, during and after the join
        for i in range(0, len(stream), 50):
            publish(settings, stream[i : i + 50])
            time.sleep(0.03)
        published.set()

    first = stages("sink", settings)
    publisher = threading.Thread(target=publish_steadily)
    publisher.start()
    try:
        first.wait_until(lambda: transactions_count(settings)[0] > 0, 30, "the first rows")
        second = stages("sink", settings.model_copy(update={"sink_metrics_port": free_port()}))
        second.wait_until(lambda: "sink consuming" in second.log(), 30, "the second sink")
        assert not published.is_set(), "the join must land mid-stream"
    finally:
        publisher.join()
    # The group rebalanced while the first sink was writing.
    first.wait_until(lambda: "partitions revoked" in first.log(), 30, "the rebalance")
    time.sleep(1)  # both sinks share the partitions for a while
    assert first.stop() == 0  # SIGTERM: the second sink takes every partition
    second.wait_until(lambda: transactions_count(settings) == expected, 60, f"rows {expected}")
    wait_caught_up(second, settings)

    assert transactions_count(settings) == expected
    assert query(settings, "select subscription_id, components from subscriptions order by 1") == [
        (700 + k, {"1": 392 + k}) for k in range(8)
    ]


def test_sigterm_while_the_database_is_away_exits_without_committing(
    settings: Settings, stages: Any, postgres_service: PostgresService
) -> None:
    if not postgres_service.can_restart:
        pytest.skip("needs CHARGIFY_TEST_BACKEND=local to stop and start Postgres")
    seed(settings)
    publish(settings, [payment("c1", amount=1) for _ in range(50)])
    sink = stages("sink", settings)
    wait_caught_up(sink, settings)

    try:
        postgres_service.stop()
        publish(settings, [payment("c1", amount=1) for _ in range(30)])
        sink.wait_for_log("database unavailable", timeout=30)
        started = time.monotonic()
        assert sink.stop() == 0  # SIGTERM, mid-retry
        assert time.monotonic() - started < 10
    finally:
        postgres_service.start()
    assert committed(settings) == 50  # the unwritten batch was not committed
    assert transactions_count(settings) == (50, 50, 50)

    sink = stages("sink", settings)
    wait_caught_up(sink, settings)
    assert transactions_count(settings) == (80, 80, 80)


# -- plans ----------------------------------------------------------------------------------


def test_a_plan_created_after_the_subscription_gets_linked(settings: Settings, stages: Any) -> None:
    seed(settings)
    publish(settings, [change("signup_success", "c1", 31, 0, state="active", product_id=555)])
    sink = stages("sink", settings)
    wait_caught_up(sink, settings)
    assert query(settings, "select plan_key from subscriptions") == [(None,)]

    with connect(settings) as conn:
        created = add_plan(conn, "555", "Gold")
    assert created["linked_subscriptions"] == 1
    assert query(settings, "select plan_key from subscriptions") == [("555",)]

    # Later events keep it linked; a new subscription on the product links at once.
    publish(
        settings,
        [
            change("subscription_state_change", "c1", 31, 5, state="canceled", product_id=555),
            change("signup_success", "c1", 32, 6, state="active", product_id=555),
        ],
    )
    wait_caught_up(sink, settings)
    assert query(
        settings, "select subscription_id, plan_key, state from subscriptions order by 1"
    ) == [
        (31, "555", "canceled"),
        (32, "555", "active"),
    ]


def test_the_sink_refuses_to_start_on_a_database_that_is_not_migrated(
    make_settings: Callable[..., Settings], database_factory: Callable[..., str], stages: Any
) -> None:
    settings = make_settings(database_url=database_factory(migrated=False))
    sink = stages("sink", settings)
    assert sink.proc is not None
    assert sink.proc.wait(30) == 1
    assert "run `chargify-stream migrate` first" in sink.log()


def test_a_plan_created_while_a_batch_writes_its_subscription_still_gets_linked(
    settings: Settings, stages: Any
) -> None:
    """``plans add`` and a sink batch on the same product, interleaved the worst way: the
    plan is inserted (not yet committed) before the subscription is written."""
    seed(settings)
    sink = stages("sink", settings)
    with connect(settings) as conn, conn.transaction():
        add_plan(conn, "888", "Platinum")  # uncommitted until the block ends
        publish(settings, [change("signup_success", "c1", 41, 0, state="active", product_id=888)])

        def sink_waits_for_the_plan() -> bool:
            waiting = query(
                settings,
                "select count(*) from pg_locks l join pg_stat_activity a using (pid)"
                " where l.locktype = 'advisory' and not l.granted"
                " and a.application_name = 'chargify-sink'",
            )
            return waiting == [(1,)]

        sink.wait_until(sink_waits_for_the_plan, 30, "the sink to wait for plans add")
    wait_caught_up(sink, settings)
    assert query(settings, "select subscription_id, plan_key from subscriptions") == [(41, "888")]
