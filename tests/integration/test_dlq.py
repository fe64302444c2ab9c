"""``chargify-stream dlq list|stats|replay`` against a real broker, and a real sink for replays.

Dead letters are either written by hand onto the dead-letter topic (to control every
header), or made by a running sink from transactions for customers that do not exist.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import psycopg
import pytest
from confluent_kafka import Consumer, KafkaError, TopicPartition

from chargify_stream.base.settings import Settings
from chargify_stream.schemas.codec import encode
from chargify_stream.schemas.deadletter import dead_letter_headers, format_timestamp
from chargify_stream.schemas.records import SubscriptionChange, Transaction
from tests.kafka_tools import consume, end_offsets, headers_of, produce
from tests.stages import run_cli as cli

pytestmark = pytest.mark.integration

NOW = datetime.now(UTC)
_ids = iter(range(4_100_000_001, 4_200_000_000))


# -- helpers shared with test_redrive.py --------------------------------------------------


def cli_json(settings: Settings, *args: str, code: int = 0) -> Any:
    """``chargify-stream ARGS --json``, which must exit with ``code``; its output."""
    done = cli(settings, *args, "--json")
    assert done.returncode == code, done.stderr
    return json.loads(done.stdout)


def wait_for(check: Callable[[], Any], what: str, timeout: float = 30.0) -> Any:
    """Poll ``check`` until it returns something truthy; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        result = check()
        if result:
            return result
        time.sleep(0.1)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def query(settings: Settings, sql: str, *params: Any) -> list[tuple[Any, ...]]:
    with psycopg.connect(settings.database_dsn(), autocommit=True) as conn:
        return conn.execute(sql.encode(), params).fetchall()


def carried(webhook_id: int, event: str) -> list[tuple[str, bytes]]:
    """The headers the processor carries onto the output topics."""
    return [
        ("chargify-webhook-id", str(webhook_id).encode()),
        ("chargify-event", event.encode()),
        ("received-at", format_timestamp(NOW).encode()),
    ]


def payment(customer: str, *, amount_cents: int = 4900) -> tuple[bytes, bytes, list[Any]]:
    """A transactions-topic record, as the processor writes it."""
    webhook_id = next(_ids)
    record = Transaction(
        transaction_id=next(_ids),
        kind="payment",
        amount_cents=amount_cents,
        currency="USD",
        customer_reference=customer,
        subscription_id=15100141,
        occurred_at=datetime(2026, 11, 27, 15, tzinfo=UTC),
        webhook_id=webhook_id,
        event="payment_success",
    )
    return customer.encode(), encode(record), carried(webhook_id, "payment_success")


def signup(customer: str, subscription_id: int) -> tuple[bytes, bytes, list[Any]]:
    """A subscriptions-topic record, as the processor writes it."""
    webhook_id = next(_ids)
    record = SubscriptionChange(
        subscription_id=subscription_id,
        customer_reference=customer,
        state="active",
        product_id=3792003,
        product_handle="basic",
        occurred_at=datetime(2026, 11, 27, 15, tzinfo=UTC),
        webhook_id=webhook_id,
        event="signup_success",
    )
    return customer.encode(), encode(record), carried(webhook_id, "signup_success")


def ends(settings: Settings) -> dict[str, int]:
    """How many records each topic of the pipeline holds."""
    return {
        name: end_offsets(settings.kafka_bootstrap_servers, settings.topic(name))
        for name in ("raw", "transactions", "subscriptions", "deadletter", "sink_retry")
    }


def sink_caught_up(settings: Settings) -> bool:
    """True once the sink group has committed every record of its input topics.

    The typed topics are written in Kafka transactions, so the high watermark also counts
    commit markers: past the committed offset there must be no record a read_committed
    reader can see, which is asked by reading from there to the end."""
    consumer = Consumer(
        {
            "bootstrap.servers": settings.kafka_bootstrap_servers,
            "group.id": settings.sink_group_id,
            "isolation.level": "read_committed",
            "enable.partition.eof": True,
            "enable.auto.commit": False,
        }
    )
    try:
        behind = []
        for name in ("transactions", "subscriptions", "sink_retry"):
            topic = settings.topic(name)
            parts = consumer.list_topics(topic, timeout=10).topics[topic].partitions
            committed = consumer.committed([TopicPartition(topic, p) for p in parts], timeout=10)
            for tp in committed:
                _, high = consumer.get_watermark_offsets(tp, timeout=10)
                if high > 0 and tp.offset < high:
                    behind.append(TopicPartition(tp.topic, tp.partition, max(tp.offset, 0)))
        if not behind:
            return True
        consumer.assign(behind)
        waiting = len(behind)
        deadline = time.monotonic() + 10
        while waiting and time.monotonic() < deadline:
            msg = consumer.poll(0.5)
            if msg is None:
                continue
            if msg.error() is None:
                return False  # a committed record the sink has not committed past
            if msg.error().code() == KafkaError._PARTITION_EOF:
                waiting -= 1
        return waiting == 0
    finally:
        consumer.close()


# -- hand-written dead letters: reading, filters, refusals ------------------------------


def dead_letter(
    *,
    webhook_id: int,
    key: bytes,
    source: str,
    failed: timedelta,
    value: bytes = b"\xc3\x01value",
    event: str = "payment_success",
    reason: str = "customer_not_found",
    stage: str = "sink",
    source_offset: int = 0,
    replay_count: int = 0,
) -> tuple[bytes, bytes, list[tuple[str, bytes]]]:
    """A dead-letter record as a stage writes it, with every header under the test's control."""
    headers = dead_letter_headers(
        reason=reason,
        stage=stage,
        error=f"{reason} (written by the test)",
        source_topic=source,
        source_partition=0,
        source_offset=source_offset,
        original_headers=carried(webhook_id, event),
        replay_count=replay_count,
        failed_at=NOW - failed,
    )
    return key, value, headers


def test_list_stats_and_replay_show_each_event_once_and_refuse_what_they_must(
    settings: Settings,
) -> None:
    txns, raw, dlq = (settings.topic(n) for n in ("transactions", "raw", "deadletter"))
    retry = settings.topic("sink_retry")
    a_value = payment("cust-a")[1]
    records = [
        # Event 101 failed at the sink, was replayed (new source offset), failed again.
        dead_letter(webhook_id=101, key=b"cust-a", value=a_value, source=txns,
                    failed=timedelta(hours=3)),
        dead_letter(webhook_id=101, key=b"cust-a", value=a_value, source=txns, source_offset=7,
                    failed=timedelta(hours=1), replay_count=1),
        dead_letter(webhook_id=102, key=b"15100141", value=b"id=102&event=payment_success",
                    reason="missing_customer_reference", stage="processor", source=raw,
                    source_offset=3, failed=timedelta(hours=2)),
        # Failed five times already: the default --max-attempts refuses it.
        dead_letter(webhook_id=103, key=b"cust-c", event="signup_success",
                    source=settings.topic("subscriptions"), failed=timedelta(minutes=30),
                    replay_count=4),
        # Claims to come from the dead-letter topic itself: replaying it would loop.
        dead_letter(webhook_id=105, key=b"cust-e", reason="malformed_payload", source=dlq,
                    failed=timedelta(hours=4)),
    ]  # fmt: skip
    # Written by hand, without dlq-* headers.
    records.append((b"cust-d", b"hand-written", carried(104, "payment_success")))
    produce(settings.kafka_bootstrap_servers, dlq, records)

    listed = cli_json(settings, "dlq", "list")
    by_webhook = {e["webhook_id"]: e for e in listed}
    assert sorted(by_webhook) == ["101", "102", "103", "104", "105"]
    a = by_webhook["101"]
    assert (a["reason"], a["stage"], a["attempts"], a["records"], a["customer"]) == (
        "customer_not_found",
        "sink",
        2,
        2,
        "cust-a",
    )
    assert (a["source_offset"], a["event"]) == (7, "payment_success")
    assert a["first_failed_at"] == format_timestamp(NOW - timedelta(hours=3))
    # NOW is taken when the module is imported, possibly minutes before this test runs.
    since_now = (datetime.now(UTC) - NOW).total_seconds()
    assert 3 * 3600 <= a["age_seconds"] < 3 * 3600 + since_now + 60
    assert by_webhook["102"]["customer"] is None  # a processor dead letter: key = subscription
    assert by_webhook["104"]["reason"] is None

    def webhooks(*filters: str) -> list[str]:
        return sorted(e["webhook_id"] for e in cli_json(settings, "dlq", "list", *filters))

    assert webhooks("--reason", "customer_not_found") == ["101", "103"]
    assert webhooks("--reason", "malformed_payload", "--reason", "missing_customer_reference") == [
        "102",
        "105",
    ]
    assert webhooks("--event", "signup_success") == ["103"]
    assert webhooks("--customer", "cust-a") == ["101"]
    assert webhooks("--since", "90m") == ["101", "103", "104"]  # 104: its Kafka timestamp
    assert webhooks("--until", "90m") == ["102", "105"]
    since = format_timestamp(NOW - timedelta(minutes=100))
    assert webhooks("--since", since, "--until", "45m") == ["101"]

    table = cli(settings, "dlq", "list")
    assert table.returncode == 0, table.stderr
    assert table.stdout.splitlines()[0].split()[:4] == ["AGE", "LAST", "FAILED", "REASON"]
    assert f"(5 dead-lettered events; 6 records read from {dlq}; 1 without dlq-* headers" in (
        table.stdout
    )

    stats = cli_json(settings, "dlq", "stats")
    assert (stats["events"], stats["records"], stats["without_dlq_headers"]) == (5, 6, 1)
    assert stats["by_reason"]["customer_not_found"] == {"events": 2, "records": 3}
    assert stats["by_reason"]["missing_customer_reference"] == {"events": 1, "records": 1}
    assert stats["by_stage"] == {
        "(no dlq headers)": {"events": 1, "records": 1},
        "processor": {"events": 1, "records": 1},
        "sink": {"events": 3, "records": 4},
    }
    assert stats["oldest_failed_at"] == format_timestamp(NOW - timedelta(hours=4))
    human = cli(settings, "dlq", "stats", "--reason", "customer_not_found")
    assert human.returncode == 0, human.stderr
    assert "2 of 5 dead-lettered events, 3 records" in human.stdout
    assert "REASON" in human.stdout and "STAGE" in human.stdout

    before = ends(settings)
    dry = cli_json(settings, "dlq", "replay", "--dry-run", code=3)  # 3: some refused
    assert (dry["selected"], dry["would_replay"], dry["refused"], dry["replayed"]) == (5, 2, 3, 0)
    # The counts by reason agree with the totals (nothing is "replayed" in a dry run).
    by_reason = dry["by_reason"].values()
    assert sum(r["would_replay"] for r in by_reason) == 2
    assert sum(r["replayed"] for r in by_reason) == 0
    refused = {r["webhook_id"]: r["why"] for r in dry["records"] if r["action"] == "refused"}
    assert refused == {
        "103": "failed 5 times (--max-attempts 5)",
        "104": "no dlq-* headers (not written by this pipeline): never replayed blindly",
        "105": f"source topic {dlq} is not an input of this pipeline",
    }
    dry_text = cli(settings, "dlq", "replay", "--dry-run")
    assert "would replay  webhook:101" in dry_text.stdout
    # A sink dead letter goes to the sink's retry topic (by key), a processor one to raw.
    assert f"-> {retry} key 'cust-a' dlq-replay-count 2" in dry_text.stdout
    assert f"-> {raw}[0] key '15100141' dlq-replay-count 1" in dry_text.stdout
    assert "selected 5, would replay 2, refused 3 (dry run: nothing was published)" in (
        dry_text.stdout
    )
    assert ends(settings) == before

    done = cli_json(settings, "dlq", "replay", "--reason", "customer_not_found", code=3)
    assert (done["selected"], done["replayed"], done["refused"], done["failed"]) == (2, 1, 1, 0)
    assert done["by_reason"] == {
        "customer_not_found": {
            "selected": 2, "replayed": 1, "would_replay": 0, "refused": 1, "failed": 0,
        }
    }  # fmt: skip
    assert ends(settings) == {**before, "sink_retry": before["sink_retry"] + 1}
    [replayed] = consume(settings.kafka_bootstrap_servers, retry, count=1)
    assert (replayed.key(), replayed.value()) == (b"cust-a", a_value)
    assert replayed.headers() == [*carried(101, "payment_success"), ("dlq-replay-count", b"2")]
    assert headers_of(replayed)["chargify-webhook-id"] == b"101"


# -- replays through a running sink -----------------------------------------------------


def test_manual_replay_selects_dry_runs_and_stops_a_poison_record(
    settings: Settings, stages: Any
) -> None:
    bootstrap, txns = settings.kafka_bootstrap_servers, settings.topic("transactions")
    stages("sink", settings)
    produce(bootstrap, txns, [payment("cust-a"), payment("cust-b")])
    wait_for(lambda: ends(settings)["deadletter"] == 2, "two dead letters")
    listed = cli_json(settings, "dlq", "list")
    assert sorted((e["customer"], e["reason"], e["stage"]) for e in listed) == [
        ("cust-a", "customer_not_found", "sink"),
        ("cust-b", "customer_not_found", "sink"),
    ]

    before = ends(settings)
    dry = cli(settings, "dlq", "replay", "--customer", "cust-a", "--dry-run")
    assert dry.returncode == 0, dry.stderr
    assert "selected 1, would replay 1, refused 0 (dry run: nothing was published)" in dry.stdout
    assert "customer cust-a" in dry.stdout and "cust-b" not in dry.stdout
    assert ends(settings) == before

    # The customer still does not exist: the replay fails again, once.
    first = cli_json(settings, "dlq", "replay", "--customer", "cust-a", "--max-attempts", "2")
    assert (first["replayed"], first["refused"]) == (1, 0)
    assert ends(settings)["sink_retry"] == before["sink_retry"] + 1
    wait_for(lambda: ends(settings)["deadletter"] == 3, "the replay dead-lettered again")
    [a] = cli_json(settings, "dlq", "list", "--customer", "cust-a")
    assert (a["attempts"], a["records"], a["reason"]) == (2, 2, "customer_not_found")

    second = cli(settings, "dlq", "replay", "--customer", "cust-a", "--max-attempts", "2")
    assert second.returncode == 3, second.stderr  # refused
    assert "REFUSED" in second.stdout and "failed 2 times (--max-attempts 2)" in second.stdout
    assert "selected 1, replayed 0, refused 1" in second.stdout
    time.sleep(0.5)  # a wrongly sent record would be on the topic by now
    assert ends(settings)["sink_retry"] == before["sink_retry"] + 1
    assert ends(settings)["transactions"] == before["transactions"]
    [b] = cli_json(settings, "dlq", "list", "--customer", "cust-b")
    assert b["attempts"] == 1


def test_replaying_the_same_selection_twice_changes_nothing_in_postgres(
    settings: Settings, stages: Any
) -> None:
    bootstrap = settings.kafka_bootstrap_servers
    stages("sink", settings)
    produce(bootstrap, settings.topic("transactions"), [payment("cust-d", amount_cents=4900)])
    produce(bootstrap, settings.topic("subscriptions"), [signup("cust-d", 5_000_000_001)])
    wait_for(lambda: ends(settings)["deadletter"] == 2, "two dead letters")

    assert cli(settings, "partners", "add", "p-d").returncode == 0
    assert cli(settings, "customers", "add", "cust-d", "--partner", "p-d").returncode == 0
    # The re-driver applies them; then the operator replays the same selection twice.
    wait_for(
        lambda: (
            query(settings, "select 1 from subscriptions")
            and query(settings, "select 1 from transactions")
        ),
        "the re-driven rows",
    )
    wait_for(lambda: sink_caught_up(settings), "the sink to catch up")
    tables = (
        "select * from transactions order by transaction_id",
        "select * from subscriptions order by subscription_id",
    )
    snapshot = [query(settings, q) for q in tables]

    # Both were re-driven and recorded: resolved, so not replayed unless asked.
    [(count,)] = query(settings, "select count(*) from webhook_outcomes where outcome = 'recorded'")
    assert count == 2
    listed = cli_json(settings, "dlq", "list", "--customer", "cust-d")
    assert [e["resolved"]["outcome"] for e in listed] == ["recorded", "recorded"]
    skipped = cli_json(settings, "dlq", "replay", "--customer", "cust-d", code=3)
    # Nothing matched: 3 as well, as --help says.
    assert cli(settings, "dlq", "replay", "--customer", "nobody").returncode == 3
    assert "Exit status: 0 every selected event was replayed" in " ".join(
        cli(settings, "dlq", "replay", "--help").stdout.split()
    )
    assert (skipped["selected"], skipped["replayed"], skipped["refused"]) == (2, 0, 2)
    assert all(r["why"].startswith("resolved: recorded at") for r in skipped["records"])
    for _ in range(2):
        before = ends(settings)
        done = cli_json(settings, "dlq", "replay", "--customer", "cust-d", "--include-resolved")
        assert (done["selected"], done["replayed"]) == (2, 2)
        after = ends(settings)
        assert after == {**before, "sink_retry": before["sink_retry"] + 2}
        wait_for(lambda: sink_caught_up(settings), "the sink to consume the replays")

    assert [query(settings, q) for q in tables] == snapshot
    assert query(settings, "select count(*), sum(amount_cents) from transactions") == [(1, 4900)]
    assert query(settings, "select customer_key, partner_key from transactions") == [
        ("cust-d", "p-d")
    ]
    assert ends(settings)["deadletter"] == 2  # nothing failed again


def test_a_missing_dead_letter_topic_is_a_clear_error(settings: Settings) -> None:
    elsewhere = settings.model_copy(update={"kafka_topic_prefix": f"no-{uuid.uuid4().hex}."})
    done = cli(elsewhere, "dlq", "stats")
    assert done.returncode == 1
    assert "does not exist" in done.stderr and done.stdout == ""
