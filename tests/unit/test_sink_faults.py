"""Transient versus poison, by SQLSTATE class, and what the sink loop does with each.

The loop is driven here with stand-ins for the Kafka clients, the database connection and
``write_batch``, handed to ``Sink`` as its collaborators, so the
decisions (retry, halve, dead-letter, stop without committing) are checked one by one;
the integration tests run the same code against the real services.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any, cast

import psycopg
import pytest
from psycopg import errors

from chargify_stream.base.settings import load_settings
from chargify_stream.schemas.codec import encode
from chargify_stream.schemas.records import Transaction
from chargify_stream.sink.consumer import Sink, SinkMetrics, Stopping
from chargify_stream.sink.upsert import (
    BatchResult,
    DatabaseUnavailable,
    Record,
    RejectedRecord,
    classify,
)


@pytest.mark.parametrize(
    "exc",
    [
        errors.SerializationFailure("could not serialize access"),
        errors.DeadlockDetected("deadlock detected"),
        errors.AdminShutdown("terminating connection due to administrator command"),
        errors.CannotConnectNow("the database system is starting up"),
        errors.lookup("08006")("connection failure"),
        errors.TooManyConnections("sorry, too many clients already"),
        errors.DiskFull("could not extend file"),
        psycopg.OperationalError("connection refused"),  # no SQLSTATE: never reached the server
        psycopg.InterfaceError("the connection is closed"),
    ],
)
def test_transient_faults_are_retried(exc: psycopg.Error) -> None:
    assert isinstance(classify(exc), DatabaseUnavailable)


@pytest.mark.parametrize(
    "exc",
    [
        errors.CharacterNotInRepertoire('invalid byte sequence for encoding "UTF8": 0x00'),
        errors.InvalidTextRepresentation("invalid input syntax for type json"),
        errors.NumericValueOutOfRange("bigint out of range"),
        errors.UniqueViolation("duplicate key value"),
        errors.ForeignKeyViolation("violates foreign key constraint"),
        errors.CheckViolation("violates check constraint"),
        psycopg.DataError("PostgreSQL text fields cannot contain NUL (0x00) bytes"),
    ],
)
def test_poison_records_are_dead_lettered_with_their_sqlstate(exc: psycopg.Error) -> None:
    found = classify(exc)
    assert isinstance(found, RejectedRecord)
    assert found.reason == "malformed_payload"
    assert found.sqlstate == exc.sqlstate
    if exc.sqlstate is not None:
        assert f"SQLSTATE {exc.sqlstate}" in str(found)


@pytest.mark.parametrize(
    "exc",
    [
        errors.UndefinedTable('relation "transactions" does not exist'),
        errors.UndefinedColumn("column does not exist"),
        errors.InternalError_("unexpected"),
        psycopg.ProgrammingError("wrong number of parameters"),
    ],
)
def test_bugs_and_schema_problems_are_neither(exc: psycopg.Error) -> None:
    assert classify(exc) is None


def test_the_class_decides_not_the_message() -> None:
    # The same words under a transient SQLSTATE: still transient.
    assert isinstance(
        classify(errors.SerializationFailure("violates check constraint")), DatabaseUnavailable
    )


# -- the loop, with stand-ins ---------------------------------------------------------------


class FakeMessage:
    def __init__(self, offset: int, value: bytes, topic: str = "t.chargify.transactions"):
        self._offset, self._value, self._topic = offset, value, topic

    def topic(self) -> str:
        return self._topic

    def partition(self) -> int:
        return 0

    def offset(self) -> int:
        return self._offset

    def value(self) -> bytes:
        return self._value

    def key(self) -> bytes:
        return b"c1"

    def headers(self) -> list[tuple[str, bytes]]:
        return [("chargify-webhook-id", str(self._offset).encode())]

    def error(self) -> None:
        return None


class FakeConsumer:
    def __init__(self) -> None:
        self.commits: list[Any] = []

    def commit(self, *, offsets: Any, asynchronous: bool) -> None:
        self.commits.append([(tp.topic, tp.partition, tp.offset) for tp in offsets])

    def get_watermark_offsets(self, tp: Any, cached: bool = False) -> tuple[int, int]:
        return (0, 100)


class FakeProducer:
    def __init__(self) -> None:
        self.sent: list[dict[str, Any]] = []

    def produce(self, topic: str, *, value: bytes, key: bytes, headers: Any, on_delivery: Any):
        self.sent.append({"topic": topic, "value": value, "headers": dict(headers)})
        on_delivery(None, None)

    def flush(self, timeout: float = 0) -> int:
        return 0


def payment(i: int) -> Transaction:
    return Transaction(
        transaction_id=i,
        kind="payment",
        amount_cents=100,
        customer_reference="c1",
        occurred_at=datetime(2024, 1, 1, tzinfo=UTC),
        webhook_id=i,
        event="payment_success",
    )


class FakeConnection:
    """Stands for a database connection: the fake writes never use it."""

    closed = False

    def rollback(self) -> None:
        pass

    def close(self) -> None:
        self.closed = True


def make_sink(write: Any, *, backoff_first: float = 0.2) -> tuple[Sink, FakeConsumer, FakeProducer]:
    fake_consumer, fake_producer = FakeConsumer(), FakeProducer()
    sink = Sink(
        # These fakes of write_batch take no sources: the outcome log is tested on a
        # real database (tests/integration/test_outcomes.py).
        load_settings(kafka_topic_prefix="t.", outcome_log=False),
        consumer=cast(Any, fake_consumer),
        producer=cast(Any, fake_producer),
        connect=lambda: cast(Any, FakeConnection()),
        metrics=SinkMetrics(),
        write=write,
        pending=lambda conn: [],  # no database here: nothing to migrate
        prepare_topics=lambda settings, topics: None,  # no broker here
        backoff_first=backoff_first,
    )
    return sink, fake_consumer, fake_producer


def test_a_poison_record_is_halved_out_and_the_rest_is_written() -> None:
    poison = {13, 57}
    written: list[int] = []
    calls = 0

    def fake_write(conn: Any, records: list[Record]) -> BatchResult:
        nonlocal calls
        calls += 1
        ids = [cast(Transaction, r).transaction_id for r in records]
        if poison & set(ids):
            raise RejectedRecord("SQLSTATE 22021 CharacterNotInRepertoire: bad", "22021")
        written.extend(ids)
        return BatchResult(transactions_written=len(ids))

    sink, fake_consumer, fake_producer = make_sink(fake_write)
    msgs = [FakeMessage(i, encode(payment(i))) for i in range(100)]

    sink.process(cast(Any, msgs))

    assert sorted(written) == [i for i in range(100) if i not in poison]
    assert calls <= 2 * len(poison) * 8  # halving, not one transaction per record
    dead = {int(s["headers"]["dlq-source-offset"]) for s in fake_producer.sent}
    assert dead == poison
    assert all(s["headers"]["dlq-reason"] == b"malformed_payload" for s in fake_producer.sent)
    assert all(b"SQLSTATE 22021" in s["headers"]["dlq-error"] for s in fake_producer.sent)
    assert fake_consumer.commits == [[("t.chargify.transactions", 0, 100)]]


def test_a_transient_fault_is_retried_and_never_dead_lettered() -> None:
    attempts = 0

    def flaky_write(conn: Any, records: list[Record]) -> BatchResult:
        nonlocal attempts
        attempts += 1
        if attempts < 3:
            raise DatabaseUnavailable("SQLSTATE 40001 SerializationFailure: retry", "40001")
        return BatchResult(transactions_written=len(records))

    sink, fake_consumer, fake_producer = make_sink(flaky_write, backoff_first=0.01)

    sink.process(cast(Any, [FakeMessage(0, encode(payment(1)))]))

    assert attempts == 3
    assert fake_producer.sent == []
    assert fake_consumer.commits == [[("t.chargify.transactions", 0, 1)]]


def test_a_stop_during_a_retry_leaves_the_batch_uncommitted() -> None:
    failing = threading.Event()

    def down(conn: Any, records: list[Record]) -> BatchResult:
        failing.set()
        raise DatabaseUnavailable("OperationalError: connection refused", None)

    sink, fake_consumer, fake_producer = make_sink(down)
    threading.Timer(0.3, sink.stop).start()

    with pytest.raises(Stopping):
        sink.process(cast(Any, [FakeMessage(0, encode(payment(1)))]))

    assert failing.is_set()
    assert fake_consumer.commits == []
    assert fake_producer.sent == []


def test_an_undecodable_value_is_dead_lettered_as_unsupported_schema() -> None:
    sink, fake_consumer, fake_producer = make_sink(
        lambda conn, records: BatchResult(transactions_written=1)
    )

    sink.process(cast(Any, [FakeMessage(0, b"not avro"), FakeMessage(1, encode(payment(1)))]))

    [letter] = fake_producer.sent
    assert letter["value"] == b"not avro"
    assert letter["headers"]["dlq-reason"] == b"unsupported_schema"
    assert letter["headers"]["dlq-stage"] == b"sink"
    assert letter["headers"]["chargify-webhook-id"] == b"0"
    assert fake_consumer.commits == [[("t.chargify.transactions", 0, 2)]]


# -- the run loop: decoding the next batch while the writer thread writes this one ---------


class ScriptedConsumer(FakeConsumer):
    """Hands out ``batches`` one per ``consume`` call, then nothing."""

    def __init__(self, batches: list[list[FakeMessage]]) -> None:
        super().__init__()
        self.batches = list(batches)
        self.consumed = 0
        self.closed = False

    def subscribe(self, topics: list[str], on_revoke: Any = None) -> None:
        self.on_revoke = on_revoke

    def consume(self, num_messages: int, timeout: float) -> list[FakeMessage]:
        self.consumed += 1
        if self.batches:
            return self.batches.pop(0)
        threading.Event().wait(timeout)
        return []

    def close(self) -> None:
        self.closed = True


def run_sink(
    batches: list[list[FakeMessage]] | ScriptedConsumer,
    write: Any,
    *,
    backoff_first: float = 0.2,
) -> tuple[Sink, ScriptedConsumer, threading.Thread, list[BaseException]]:
    """Start ``Sink.run`` in a thread on scripted batches, with ``write`` as write_batch."""
    sink, _, _ = make_sink(write, backoff_first=backoff_first)
    scripted = batches if isinstance(batches, ScriptedConsumer) else ScriptedConsumer(batches)
    sink.consumer = cast(Any, scripted)
    raised: list[BaseException] = []

    def target() -> None:
        try:
            sink.run()
        except BaseException as exc:
            raised.append(exc)

    thread = threading.Thread(target=target)
    thread.start()
    return sink, scripted, thread, raised


def batch_of(*ids: int) -> list[FakeMessage]:
    return [FakeMessage(i, encode(payment(i))) for i in ids]


def wait_until(condition: Callable[[], bool], timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


def committed(scripted: ScriptedConsumer) -> list[int]:
    """The offset each commit named (one partition in these tests)."""
    return [c[0][2] for c in scripted.commits]


def test_the_next_batch_is_consumed_while_one_is_written_and_commits_follow_writes() -> None:
    written: list[int] = []
    lock = threading.Lock()
    scripted = ScriptedConsumer([batch_of(0, 1), batch_of(2, 3), batch_of(4)])
    written_at_commit: list[list[int]] = []
    commit = scripted.commit

    def recording_commit(*, offsets: Any, asynchronous: bool) -> None:
        with lock:
            written_at_commit.append(sorted(written))
        commit(offsets=offsets, asynchronous=asynchronous)

    scripted.commit = recording_commit  # type: ignore[method-assign]
    second_consumed = threading.Event()

    def write(conn: Any, records: list[Record]) -> BatchResult:
        ids = [cast(Transaction, r).transaction_id for r in records]
        # The first batch: the loop must consume the next one meanwhile.
        if ids == [0, 1] and wait_until(lambda: scripted.consumed >= 2):
            second_consumed.set()
        with lock:
            written.extend(ids)
        return BatchResult(transactions_written=len(ids))

    sink, _, thread, raised = run_sink(scripted, write)
    assert wait_until(lambda: len(scripted.commits) == 3)
    sink.stop()
    thread.join(10)

    assert not thread.is_alive() and raised == []
    assert second_consumed.is_set()
    assert sorted(written) == [0, 1, 2, 3, 4]
    # In order, and each commit only once its batch and every batch before it is written.
    assert committed(scripted) == [2, 4, 5]
    needed = ([0, 1], [0, 1, 2, 3], [0, 1, 2, 3, 4])
    for at_commit, before in zip(written_at_commit, needed, strict=True):
        assert set(before) <= set(at_commit)
    assert scripted.closed


def test_a_batch_written_before_the_one_ahead_of_it_commits_after_it() -> None:
    release_first = threading.Event()
    second_written = threading.Event()

    def write(conn: Any, records: list[Record]) -> BatchResult:
        ids = [cast(Transaction, r).transaction_id for r in records]
        if ids == [0]:
            release_first.wait(5)
        else:
            second_written.set()
        return BatchResult(transactions_written=len(ids))

    sink, scripted, thread, raised = run_sink([batch_of(0), batch_of(1)], write)
    assert second_written.wait(5)  # the second writer finished first...
    time.sleep(0.2)
    assert scripted.commits == []  # ...and its offsets wait for the first batch's
    release_first.set()
    assert wait_until(lambda: len(scripted.commits) == 2)
    sink.stop()
    thread.join(10)

    assert raised == []
    assert committed(scripted) == [1, 2]


def test_a_failed_write_ends_the_run_and_nothing_after_it_is_committed() -> None:
    written: list[int] = []
    failed = threading.Event()

    def write(conn: Any, records: list[Record]) -> BatchResult:
        ids = [cast(Transaction, r).transaction_id for r in records]
        if 2 in ids:
            failed.set()
            raise RuntimeError("a bug, not a record")
        if ids == [4]:
            failed.wait(5)  # written (by the other writer) after the failure
        written.extend(ids)
        return BatchResult(transactions_written=len(ids))

    batches = [batch_of(0, 1), batch_of(2, 3), batch_of(4), batch_of(5)]
    _, scripted, thread, raised = run_sink(batches, write)
    thread.join(10)

    assert not thread.is_alive()
    assert [type(e) for e in raised] == [RuntimeError]
    assert 5 not in written  # no batch is handed out after the failure is seen
    assert committed(scripted) == [2]  # the batch after the failed one is not committed
    assert scripted.closed


def test_a_stop_while_the_writer_retries_ends_the_run_without_committing() -> None:
    failing = threading.Event()

    def down(conn: Any, records: list[Record]) -> BatchResult:
        failing.set()
        raise DatabaseUnavailable("OperationalError: connection refused", None)

    sink, scripted, thread, raised = run_sink([batch_of(0), batch_of(1)], down)
    assert failing.wait(5)
    sink.stop()
    thread.join(10)

    assert not thread.is_alive() and raised == []  # Stopping is how run() ends here
    assert scripted.commits == []
    assert scripted.closed


def test_a_revocation_waits_for_the_batch_being_written() -> None:
    release = threading.Event()
    writing = threading.Event()

    def slow(conn: Any, records: list[Record]) -> BatchResult:
        writing.set()
        release.wait(5)
        return BatchResult(transactions_written=len(records))

    sink, scripted, thread, raised = run_sink([batch_of(0)], slow)
    assert writing.wait(5)
    # librdkafka calls on_revoke from consume(), in the thread that hands out the writes;
    # from this other thread, wait until the handing out is done.
    assert wait_until(lambda: len(sink._in_flight) > 0)
    revoked = threading.Thread(target=scripted.on_revoke, args=(scripted, []))
    revoked.start()
    revoked.join(0.3)
    assert revoked.is_alive()  # still waiting for the write
    release.set()
    revoked.join(5)
    assert not revoked.is_alive()
    assert [c[0][2] for c in scripted.commits] == [1]
    sink.stop()
    thread.join(10)
    assert raised == []


def test_a_failed_write_stops_the_sink_while_another_writer_waits_on_a_fault() -> None:
    retrying = threading.Event()

    def write(conn: Any, records: list[Record]) -> BatchResult:
        ids = [cast(Transaction, r).transaction_id for r in records]
        if ids == [0]:
            retrying.set()
            raise DatabaseUnavailable("OperationalError: connection refused", None)
        retrying.wait(5)
        raise RuntimeError("a bug, not a record")

    _, scripted, thread, raised = run_sink([batch_of(0), batch_of(1)], write, backoff_first=0.05)
    thread.join(10)

    assert not thread.is_alive(), "the sink went on waiting for the database"
    assert [type(e) for e in raised] == [RuntimeError]
    assert scripted.commits == []
    assert scripted.closed


def test_an_error_in_the_consuming_thread_stops_a_writer_waiting_on_a_fault() -> None:
    retrying = threading.Event()

    def down(conn: Any, records: list[Record]) -> BatchResult:
        retrying.set()
        raise DatabaseUnavailable("OperationalError: connection refused", None)

    scripted = ScriptedConsumer([batch_of(0)])
    consume = scripted.consume

    def failing_consume(num_messages: int, timeout: float) -> list[FakeMessage]:
        if scripted.consumed >= 1 and retrying.wait(5):
            raise RuntimeError("a bug in the consuming thread")
        return consume(num_messages, timeout)

    scripted.consume = failing_consume  # type: ignore[method-assign]
    _, _, thread, raised = run_sink(scripted, down, backoff_first=0.05)
    thread.join(10)

    assert not thread.is_alive(), "the sink went on waiting for the database"
    assert [type(e) for e in raised] == [RuntimeError]
    assert scripted.commits == []
