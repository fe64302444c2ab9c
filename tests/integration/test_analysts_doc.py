"""docs/analysts.md (and the README's "Analysts" section) is true: every example runs
against a real broker with records on it.

The ``python`` and ``sh`` code blocks are taken from the page and run as they are, from a
folder holding the repository's ``schemas/`` (the page says "from a checkout"), with the
defaults the page assumes pointed at this test's broker and topics: ``127.0.0.1:9092`` and
the unprefixed topic names in the code are replaced, and ``KAFKA_BOOTSTRAP_SERVERS`` /
``KAFKA_TOPIC_PREFIX`` are set for the blocks that use the project's settings. Python runs
with warnings as errors. The page's tables of fingerprints and dict keys are checked too.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from confluent_kafka import Producer

from chargify_stream import analytics
from chargify_stream.base.settings import Settings
from chargify_stream.schemas import codec
from chargify_stream.schemas import headers as h
from chargify_stream.schemas.deadletter import dead_letter_headers
from chargify_stream.schemas.records import Customer, SubscriptionChange, Transaction
from tests.builders import build_body
from tests.kafka_tools import topics_only_settings
from tests.services import KafkaService

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
DOC = ROOT / "docs" / "analysts.md"
BLOCK = re.compile(r"^```(python|sh)\n(.*?)^```", re.MULTILINE | re.DOTALL)
T0 = datetime(2026, 11, 27, 15, 0, tzinfo=UTC)
ABORTED_AMOUNT = 777  # written in an aborted transaction: must never show


def blocks(text: str) -> list[tuple[str, str]]:
    return [(m.group(1), m.group(2)) for m in BLOCK.finditer(text)]


def readme_section() -> str:
    text = (ROOT / "README.md").read_text()
    start = text.index("\n## Analysts\n")
    return text[start : text.index("\n## ", start + 1)]


def _transaction(tid: int, customer: str, cents: int, currency: str | None) -> Transaction:
    return Transaction(
        transaction_id=tid,
        kind="payment" if cents > 0 else "refund",
        amount_cents=cents,
        currency=currency,
        customer_reference=customer,
        occurred_at=T0,
        webhook_id=tid + 1000,
        event="payment_success" if cents > 0 else "refund_success",
    )


def _write(settings: Settings, topic: str, records: list[Any], *, commit: bool = True) -> None:
    producer = Producer(
        {
            "bootstrap.servers": settings.kafka_bootstrap_servers,
            "transactional.id": f"doc-{uuid.uuid4().hex}",
        }
    )
    producer.init_transactions(30)
    producer.begin_transaction()
    for key, value, headers in records:
        producer.produce(settings.topic(topic), key=key, value=value, headers=headers)
    producer.flush(30)
    if commit:
        producer.commit_transaction(30)
    else:
        producer.abort_transaction(30)


def _carried(webhook_id: int, event: str) -> list[tuple[str, bytes]]:
    return [
        (h.WEBHOOK_ID, str(webhook_id).encode()),
        (h.EVENT, event.encode()),
        (h.RECEIVED_AT, b"2026-11-27T15:00:01.000Z"),
    ]


@pytest.fixture
def settings(kafka_service: KafkaService) -> Settings:
    """This test's topics, with records of every kind on them."""
    s = topics_only_settings(kafka_service.bootstrap_servers)

    def typed(record: Transaction | SubscriptionChange) -> tuple[bytes, bytes, list[Any]]:
        headers = _carried(record.webhook_id, record.event)
        return record.customer_reference.encode(), codec.encode(record), headers

    payment = _transaction(70001, "cust-1", 4900, "USD")
    second = _transaction(70004, "cust-1", 2500, "USD")
    refund = _transaction(70002, "cust-2", -1500, None)
    _write(s, "transactions", [typed(payment), typed(refund), typed(second)])
    _write(s, "transactions", [typed(_transaction(70003, "cust-1", ABORTED_AMOUNT, "USD"))],
           commit=False)  # fmt: skip
    change = SubscriptionChange(
        subscription_id=501, customer_reference="cust-1", state="active", occurred_at=T0,
        webhook_id=9004, event="signup_success",
    )  # fmt: skip
    _write(s, "subscriptions", [typed(change)])

    def customer(key: str, partner: str | None) -> tuple[bytes, bytes, list[Any]]:
        record = Customer(customer_key=key, partner_key=partner, updated_at=T0)
        return key.encode(), codec.encode(record), []

    _write(s, "customers", [
        customer("cust-1", "acme"), customer("cust-2", "beta"), customer("cust-2", "gamma"),
        customer("cust-3", "acme"), (b"cust-3", None, []),
    ])  # fmt: skip
    body = build_body("payment_success", webhook_id=9101, subscription_id=601, reference="c-7")
    _write(s, "raw", [(b"601", body, _carried(9101, "payment_success"))])
    letter = dead_letter_headers(
        reason=h.MALFORMED_PAYLOAD, stage=h.STAGE_PROCESSOR, error="bad amount",
        source_topic=s.topic("raw"), source_partition=0, source_offset=0,
        original_headers=_carried(9101, "payment_success"),
    )  # fmt: skip
    _write(s, "deadletter", [(b"601", body, letter)])
    return s


def _run(kind: str, code: str, settings: Settings, cwd: Path) -> subprocess.CompletedProcess[str]:
    if kind == "python":
        code = code.replace("127.0.0.1:9092", settings.kafka_bootstrap_servers)
        code = re.sub(r'"chargify\.([a-z.]+)"', lambda m: f'"{_full(settings, m[1])}"', code)
        command = [sys.executable, "-W", "error", "-c", code]
    else:
        command = ["bash", "-euo", "pipefail", "-c", code]
    env = {
        **os.environ,
        **settings.as_env(),
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
        "PYTHONWARNINGS": "error",
    }
    return subprocess.run(
        command, cwd=cwd, env=env, capture_output=True, text=True, timeout=180, check=False
    )


def _full(settings: Settings, name: str) -> str:
    short = {"webhooks.raw": "raw"}.get(name, name)
    return settings.topic(short)


def test_every_example_runs(settings: Settings, tmp_path: Path) -> None:
    (tmp_path / "schemas").symlink_to(ROOT / "schemas")
    found = blocks(DOC.read_text())
    assert len(found) >= 7, "docs/analysts.md lost its examples"
    outputs = []
    for kind, code in found:
        done = _run(kind, code, settings, tmp_path)
        assert done.returncode == 0, f"{kind} block failed:\n{code}\n{done.stderr[-3000:]}"
        assert done.stdout.strip(), f"{kind} block printed nothing:\n{code}"
        outputs.append(done.stdout)
    everything = "\n".join(outputs)
    assert str(ABORTED_AMOUNT) not in everything  # read_committed everywhere
    # Each way of reading the transactions shows the payment, or cust-1's total.
    readers = [out for (_, code), out in zip(found, outputs, strict=True) if "transactions" in code]
    assert all(re.search(r"\b(4900|7400|74\.0)\b", out) for out in readers), readers
    # The attribution: cust-1's 7,400 cents to acme, cust-2's refund to gamma (its current
    # partner), nothing to beta (an older version) or the deleted cust-3.
    pandas_out = next(out for (_, code), out in zip(found, outputs, strict=True)
                      if "drop_duplicates" in code)  # fmt: skip
    assert re.search(r"acme\s+USD\s+7400", pandas_out), pandas_out
    assert re.search(r"gamma\s+NaN\s+-1500", pandas_out), pandas_out
    assert "beta" not in pandas_out
    duckdb_out = outputs[-1]
    assert re.search(r"acme\s*│\s*7400", duckdb_out), duckdb_out
    assert re.search(r"gamma\s*│\s*-1500", duckdb_out), duckdb_out
    assert "beta" not in duckdb_out


def test_the_readme_examples_run(settings: Settings, tmp_path: Path) -> None:
    found = blocks(readme_section())
    assert [kind for kind, _ in found] == ["sh", "python"]
    for kind, code in found:
        done = _run(kind, code, settings, tmp_path)
        assert done.returncode == 0, f"{kind} block failed:\n{code}\n{done.stderr[-3000:]}"
        assert "4900" in done.stdout and str(ABORTED_AMOUNT) not in done.stdout


def test_the_fingerprint_table_is_current() -> None:
    table = dict(re.findall(r"^\| `io\.chargifystream\.(\w+)` \| `([0-9a-f]{16})` \|$",
                            DOC.read_text(), re.MULTILINE))  # fmt: skip
    assert set(table) == {"Transaction", "SubscriptionChange", "Customer"}
    for name, hexed in table.items():
        assert codec.fingerprint(name).hex() == hexed, name


def test_the_keys_table_matches_the_readers(settings: Settings) -> None:
    rows = re.findall(r"^\| `(read_\w+)` \| (.*) \|$", DOC.read_text(), re.MULTILINE)
    assert {name for name, _ in rows} == {
        "read_transactions", "read_subscriptions", "read_customers", "read_deadletters",
        "read_raw",
    }  # fmt: skip
    for name, cell in rows:
        # Top-level keys only: what is in parentheses describes a key.
        documented = re.findall(r"`(\w+)`", re.sub(r"\([^)]*\)", "", cell))
        first = next(getattr(analytics, name)(settings, from_beginning=True))
        assert set(first) - {"partition", "offset"} == set(documented), name
