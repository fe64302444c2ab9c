"""The walking skeleton: one real, signed payment_success through all three stages.

A real Chargify body (the 2016 production-style payment_success from Maxio's API docs,
read from the shared samples folder) is POSTed to the gateway with its reference set to
a customer created with ``chargify-stream customers add``; the row must appear in
``transactions`` with the body's values.
"""

from __future__ import annotations

import time
from datetime import UTC, datetime
from typing import Any

import httpx
import psycopg
import pytest

from chargify_stream.base.settings import Settings
from chargify_stream.ingest.signature import sign
from tests.conftest import TEST_SHARED_KEY
from tests.kafka_tools import consume, headers_of
from tests.samples import require_samples
from tests.stages import run_cli as cli

pytestmark = pytest.mark.integration

SAMPLE = "payment_success__maxio-com-stoplight-platform-api-docs__1.txt"
EMPTY_REFERENCE = b"&payload[subscription][customer][reference]=&"


def wait_for_row(dsn: str, query: str, params: tuple[Any, ...], timeout: float = 60.0) -> Any:
    deadline = time.monotonic() + timeout
    with psycopg.connect(dsn, autocommit=True) as conn:
        while time.monotonic() < deadline:
            row = conn.execute(query.encode(), params).fetchone()
            if row is not None:
                return row
            time.sleep(0.2)
    raise AssertionError(f"no row for {query} {params} within {timeout}s")


def test_signed_payment_lands_in_postgres(settings: Settings, stages: Any) -> None:
    real = (require_samples() / SAMPLE).read_bytes().rstrip(b"\r\n")
    assert EMPTY_REFERENCE in real, "the sample's empty customer reference moved"
    body = real.replace(EMPTY_REFERENCE, b"&payload[subscription][customer][reference]=cust-42&")

    assert cli(settings, "partners", "add", "partner-7", "--name", "Seven").returncode == 0
    added = cli(settings, "customers", "add", "cust-42", "--partner", "partner-7")
    assert added.returncode == 0, added.stderr

    gateway = stages("gateway", settings)
    stages("processor", settings)
    stages("sink", settings)
    base = f"http://127.0.0.1:{settings.gateway_port}"
    gateway.wait_http_ready(f"{base}/readyz")

    response = httpx.post(
        f"{base}/webhooks/chargify",
        content=body,
        headers={
            "Content-Type": "application/x-www-form-urlencoded",
            "X-Chargify-Webhook-Signature-Hmac-Sha-256": sign(TEST_SHARED_KEY.encode(), body),
        },
        timeout=20,
    )
    assert response.status_code == 200, response.text

    [raw] = consume(settings.kafka_bootstrap_servers, settings.topic("raw"), count=1)
    assert raw.value() == body
    assert raw.key() == b"15100141"
    assert headers_of(raw)["chargify-webhook-id"] == b"141765008"
    assert headers_of(raw)["chargify-event"] == b"payment_success"

    row = wait_for_row(
        settings.database_dsn(),
        "select transaction_id, customer_key, partner_key, subscription_id, kind,"
        " amount_cents, occurred_at, webhook_id from transactions where transaction_id = %s",
        (161537369,),
    )
    assert row == (
        161537369,
        "cust-42",
        "partner-7",
        15100141,
        "payment",
        6400,
        datetime(2016, 11, 8, 21, 22, 20, tzinfo=UTC),
        141765008,
    )
    assert row[6].utcoffset().total_seconds() == 0

    [out] = consume(settings.kafka_bootstrap_servers, settings.topic("transactions"), count=1)
    assert out.key() == b"cust-42"
    assert out.value()[:2] == b"\xc3\x01"
    assert headers_of(out)["chargify-webhook-id"] == b"141765008"


def test_unsigned_webhook_is_refused_and_not_published(settings: Settings, stages: Any) -> None:
    gateway = stages("gateway", settings)
    base = f"http://127.0.0.1:{settings.gateway_port}"
    gateway.wait_http_ready(f"{base}/readyz")
    body = b"id=1&event=test&payload[chargify]=testing"
    response = httpx.post(
        f"{base}/webhooks/chargify",
        content=body,
        headers={
            "Content-Type": "application/x-www-form-urlencoded",
            "X-Chargify-Webhook-Signature-Hmac-Sha-256": sign(b"wrong-key", body),
        },
    )
    assert response.status_code == 401
    assert (
        consume(settings.kafka_bootstrap_servers, settings.topic("raw"), count=1, timeout=2) == []
    )
