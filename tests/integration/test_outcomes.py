"""The outcome log's rules, on a real Postgres: what each decision does to a webhook's row.

The pipeline-wide test (every outcome reached through the real stages) is in
``test_trace.py``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import psycopg
import pytest

from chargify_stream.schemas.records import Transaction
from chargify_stream.sink.outcomes import Delivery, Source, write_deliveries
from chargify_stream.sink.upsert import write_batch

pytestmark = pytest.mark.integration

T0 = datetime(2026, 12, 1, 9, 0, tzinfo=UTC)
WID = 8_000_000_001


@pytest.fixture
def conn(database_factory: Callable[..., str]) -> Iterator[psycopg.Connection[Any]]:
    with psycopg.connect(database_factory(), autocommit=True) as c:
        yield c


# Both statements: the folding one always (True), and the default choice (None: the
# unfolded one for batches with one delivery per webhook, as most of these are).
@pytest.fixture(params=[None, True], ids=["default", "fold"])
def fold(request: pytest.FixtureRequest) -> bool | None:
    value: bool | None = request.param
    return value


def duplicate(offset: int, *, at: datetime = T0) -> Delivery:
    """The processor dropping a delivery (raw record ``offset``) as a duplicate."""
    return Delivery(
        WID, "processor", "duplicate", None, "raw", 0, offset, 0, at,
        event="payment_success", received_at=at, attempt=True,
        source_topic="raw", source_partition=0, source_offset=offset,
    )  # fmt: skip


def decided(
    decision: str,
    minutes: int,
    *,
    reason: str | None = None,
    stage: str = "processor",
    topic: str = "chargify.deadletter",
    offset: int = 0,
    attempt: bool = True,
) -> Delivery:
    at = T0 + timedelta(minutes=minutes)
    return Delivery(
        WID, stage, decision, reason, topic, 0, offset, 0, at, attempt=attempt
    )  # fmt: skip


Record = Callable[..., None]


@pytest.fixture
def record(fold: bool | None) -> Record:
    """Write deliveries in one transaction, with the statement the test runs under."""

    def write(conn: psycopg.Connection[Any], *deliveries: Delivery) -> None:
        with conn.transaction(), conn.cursor() as cur:
            write_deliveries(cur, deliveries, fold=fold)

    return write


def outcome(conn: psycopg.Connection[Any]) -> tuple[Any, ...]:
    row = conn.execute(
        "select outcome, reason, stage, attempts, received_at from webhook_outcomes"
        " where webhook_id = %s",
        (WID,),
    ).fetchone()
    assert row is not None
    return tuple(row)


def test_a_webhook_moves_to_each_new_decision_and_counts_attempts_once(
    conn: psycopg.Connection[Any], record: Record
) -> None:
    # Seen first through a duplicate (its first delivery's decision still on its way).
    record(conn, duplicate(5))
    assert outcome(conn) == ("received", None, "processor", 1, T0)
    # The recorder reading its batch again after a crash adds nothing.
    record(conn, duplicate(5))
    assert outcome(conn)[3] == 1
    record(conn, decided("dead_lettered", 1, reason="unknown_subscription"))
    assert outcome(conn)[:4] == ("dead_lettered", "unknown_subscription", "processor", 2)
    # A replay, recorded by the sink.
    record(conn, decided("recorded", 6, stage="sink", topic="chargify.transactions"))
    assert outcome(conn) == ("recorded", None, "sink", 3, T0)


def test_recorded_never_moves_back(conn: psycopg.Connection[Any], record: Record) -> None:
    record(conn, decided("recorded", 2, stage="sink", topic="chargify.transactions"))
    # An older dead letter read late, a later retry found unchanged, a duplicate.
    record(conn, decided("dead_lettered", 1, reason="malformed_payload"))
    record(conn, duplicate(7, at=T0 + timedelta(minutes=3)))
    record(conn, decided("unchanged", 9, stage="sink", topic="chargify.transactions", offset=1))
    assert outcome(conn)[:4] == ("recorded", None, "sink", 4)
    rows = conn.execute(
        "select decision from webhook_deliveries where webhook_id = %s order by at",
        (WID,),
    ).fetchall()
    assert [r[0] for r in rows] == ["dead_lettered", "recorded", "duplicate", "unchanged"]


def test_one_batch_with_several_decisions_takes_the_newest(
    conn: psycopg.Connection[Any], record: Record
) -> None:
    # Read in any order within a batch: parked at 1, then dead-lettered again at 4.
    record(
        conn,
        decided("dead_lettered", 4, reason="malformed_payload", offset=2),
        duplicate(3),
        decided("parked", 1, reason="customer_not_found", stage="sink", offset=1, attempt=False),
    )
    assert outcome(conn)[:4] == ("dead_lettered", "malformed_payload", "processor", 2)
    # An older decision arriving later does not win.
    record(conn, decided("ignored", 2, reason="test_event", offset=0, topic="raw"))
    assert outcome(conn)[0] == "dead_lettered"


def payment(transaction_id: int, webhook_id: int, customer: str) -> Transaction:
    return Transaction(
        transaction_id=transaction_id, kind="payment", amount_cents=100,
        customer_reference=customer, occurred_at=T0, webhook_id=webhook_id,
        event="payment_success",
    )  # fmt: skip


def test_the_sink_records_each_record_outcome_in_its_transaction(
    conn: psycopg.Connection[Any],
) -> None:
    conn.execute("insert into customers (customer_key, email, name) values ('c1', '', '')")
    records = [
        payment(1, 11, "c1"),  # recorded
        payment(1, 12, "c1"),  # the same transaction under another webhook: unchanged
        payment(2, 13, "nobody"),  # parked
    ]
    sources = [Source("tx", 0, i, 0, T0, ("raw", 0, 10 + i)) for i in range(3)]
    result = write_batch(conn, records, sources)
    assert result.outcomes == ["recorded", "unchanged", "parked"]
    rows = conn.execute(
        "select webhook_id, outcome, reason, stage, transaction_id, customer_key, attempts"
        " from webhook_outcomes order by webhook_id"
    ).fetchall()
    assert rows == [
        (11, "recorded", None, "sink", 1, "c1", 1),
        (12, "unchanged", None, "sink", 1, "c1", 1),
        (13, "parked", "customer_not_found", "sink", 2, "nobody", 1),
    ]
    assert conn.execute(
        "select source_topic, source_partition, source_offset from webhook_deliveries"
        " where webhook_id = 13"
    ).fetchall() == [("raw", 0, 12)]
    # A replay of the batch (the sink crashed before committing offsets): recorded stays,
    # and nothing is added.
    again = write_batch(conn, records, sources)
    assert again.outcomes == ["unchanged", "unchanged", "parked"]
    assert conn.execute("select count(*) from webhook_deliveries").fetchone() == (3,)
    kept = conn.execute("select outcome from webhook_outcomes where webhook_id = 11").fetchone()
    assert kept == ("recorded",)
    # Without sources (the outcome log off), nothing is recorded.
    write_batch(conn, [payment(3, 14, "c1")])
    assert conn.execute("select count(*) from webhook_outcomes").fetchone() == (3,)


def test_resolved_dead_letters_are_those_with_a_later_good_outcome(
    database_factory: Callable[..., str],
) -> None:
    from chargify_stream.base.settings import load_settings
    from chargify_stream.resolved import resolutions

    dsn = database_factory()
    settings = load_settings(database_url=dsn)
    later = T0 + timedelta(minutes=5)
    with psycopg.connect(dsn, autocommit=True) as conn, conn.cursor() as cur:
        write_deliveries(
            cur,
            [
                # 1: recorded after its dead letter (re-driven); 2: dead-lettered again;
                # 3: recorded before the dead letter the caller asks about.
                Delivery(1, "sink", "recorded", None, "tx", 0, 1, 1, later),
                Delivery(
                    2, "processor", "dead_lettered", "malformed_payload", "dlq", 0, 2, 0, later
                ),
                Delivery(3, "sink", "recorded", None, "tx", 0, 3, 0, T0),
            ],
        )
    found = resolutions(
        settings, [("1", T0), ("2", T0), ("3", later), ("not-a-number", T0), ("4", None)]
    )
    assert found == {"1": ("recorded", later)}
    assert resolutions(settings, []) == {}
    away = load_settings(database_url="postgresql://nobody@127.0.0.1:1/none")
    assert resolutions(away, [("1", T0)]) is None
