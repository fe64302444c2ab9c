"""How ``chargify-stream tail`` lays records out as a table, and how it parses its options."""

from __future__ import annotations

import argparse
import io
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from chargify_stream import analytics, tail
from chargify_stream.cli import build_parser

PAYMENT: dict[str, Any] = {
    "transaction_id": 70001,
    "kind": "payment",
    "amount_cents": 4900,
    "currency": "USD",
    "customer": "cust-1",
    "subscription_id": 501,
    "occurred_at": "2026-11-27T15:00:00.000000Z",
    "webhook_id": 9001,
}
REFUND = {**PAYMENT, "transaction_id": 70002, "kind": "refund", "amount_cents": -1500,
          "currency": None, "customer": "a-customer-with-a-long-reference"}  # fmt: skip


def test_a_table_aligns_its_columns_and_counts_the_rows() -> None:
    text = tail._table("transactions", [tail._cells("transactions", r) for r in (PAYMENT, REFUND)])
    head, first, second, count = text.splitlines()
    assert head.split() == [
        "OCCURRED_AT", "CUSTOMER", "KIND", "AMOUNT_CENTS", "CURRENCY", "TRANSACTION_ID",
        "SUBSCRIPTION_ID", "WEBHOOK_ID",
    ]  # fmt: skip
    # Numbers are right-aligned under their heading; a missing value is "-".
    assert first.index("4900") + 4 == head.index("AMOUNT_CENTS") + len("AMOUNT_CENTS")
    assert second.index("-1500") + 5 == first.index("4900") + 4
    assert second.split()[4] == "-"
    assert "a-customer-with-a-long-reference" in second  # widths follow the widest cell
    assert count == "(2 records)"
    assert tail._table("transactions", []).splitlines()[-1] == "(0 records)"


def test_a_followed_table_has_fixed_widths_and_cuts_long_cells() -> None:
    out = io.StringIO()
    tail._stream_table("transactions", iter([PAYMENT, REFUND]), out)
    head, first, second = out.getvalue().splitlines()
    assert head.startswith("OCCURRED_AT")
    assert first.index("payment") == second.index("refund")
    assert "a-customer-with…" in second


def test_deleted_customers_and_components_read_plainly() -> None:
    gone = {"customer_key": "cust-9", "deleted": True, "updated_at": None, "partner_key": None}
    assert tail._cells("customers", gone) == ["-", "cust-9", "(deleted)", "-", "-"]
    change = {"components": [{"component_id": 1}, {"component_id": 2}], "customer": "c"}
    cells = tail._cells("subscriptions", change)
    assert cells[6] == "2"


def test_every_topic_has_columns() -> None:
    assert set(tail._COLUMNS) == set(analytics.TOPICS)


def _args(*argv: str) -> argparse.Namespace:
    return build_parser().parse_args(["tail", *argv])


def test_options() -> None:
    args = _args("transactions", "--since", "2h", "--customer", "cust-1", "--json", "-f")
    assert args.topic == "transactions" and args.customer == "cust-1"
    assert args.json and args.follow and not args.from_beginning
    assert datetime.now(UTC) - args.since == pytest.approx(
        timedelta(hours=2), abs=timedelta(seconds=60)
    )
    assert _args("raw", "-n", "3").last == 3
    assert _args("raw").last is None and _args("raw").timeout == 30.0


@pytest.mark.parametrize(
    "argv",
    [
        ["ledger"],
        ["raw", "--since", "soon"],
        ["raw", "-n", "0"],
        ["raw", "--timeout", "-1"],
        ["raw", "--from-beginning", "--since", "1h"],  # one starting point at most
    ],
)
def test_bad_options_are_usage_errors(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        _args(*argv)
    assert exited.value.code == 2
    assert "error:" in capsys.readouterr().err
