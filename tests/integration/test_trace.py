"""What happened to every webhook, through the real stages: outcomes and ``trace``.

A mixed batch through gateway, processor and sink processes: recorded, a Chargify retry
(a duplicate), the same transaction under another webhook id (unchanged), the test event
(ignored), each dead-letter reason, a parked payment re-driven once its customer exists,
and a dead letter replayed by ``dlq replay``. Each webhook's ``webhook_outcomes`` row and
its ``trace --json`` are checked, then the console as headless Chromium renders it, against
Postgres and Kafka.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import pytest

from chargify_stream.base.settings import Settings
from chargify_stream.local.ports import free_port
from chargify_stream.schemas.deadletter import format_timestamp
from chargify_stream.sink.admin import add_customer, add_partner, connect
from tests.browser import dump_dom, figures, screenshot
from tests.builders import build_body
from tests.integration.test_dlq import query, wait_for
from tests.kafka_tools import end_offsets, produce
from tests.pipeline import Pipeline
from tests.stages import Stage, run_cli

pytestmark = pytest.mark.integration

SUB = 7_100_000_001
# webhook id -> (outcome, reason, attempts) once the scenario is done.
EXPECTED: dict[int, tuple[str, str | None, int]] = {
    9001: ("recorded", None, 2),  # and its retry, dropped as a duplicate
    9002: ("unchanged", None, 1),  # transaction 7001 again, under another webhook id
    9003: ("ignored", "test_event", 1),
    9004: ("recorded", None, 2),  # parked, then re-driven
    9005: ("recorded", None, 2),  # unknown_subscription, then replayed
    9006: ("recorded", None, 1),  # the signup that made 9005's subscription known
    9007: ("dead_lettered", "missing_customer_reference", 1),
    9008: ("dead_lettered", "malformed_payload", 1),
    9009: ("dead_lettered", "unsupported_schema", 0),  # never on the raw topic
    9010: ("parked", "customer_not_found", 1),  # its customer never comes
}


@pytest.fixture
def settings(make_settings: Callable[..., Settings]) -> Settings:
    """The test's settings, with JSON logs (checked at the end)."""
    return make_settings(log_format="json")


@pytest.fixture
def pipeline(settings: Settings, stages: Callable[..., Any]) -> Iterator[Pipeline]:
    with connect(settings) as conn:
        add_partner(conn, "p1", "Partner One")
        add_customer(conn, "c1", partner="p1", email="c1@example.com")
    p = Pipeline(settings, stages)
    yield p
    p.close()


def outcomes(settings: Settings) -> dict[int, tuple[str, str | None, int]]:
    rows = query(settings, "select webhook_id, outcome, reason, attempts from webhook_outcomes")
    return {r[0]: (r[1], r[2], r[3]) for r in rows}


def run_scenario(settings: Settings, pipeline: Pipeline) -> None:
    """Drive every outcome of :data:`EXPECTED` through the real pipeline."""
    c1 = {"subscription_id": SUB, "reference": "c1"}
    payment = build_body("payment_success", webhook_id=9001, transaction_id=7001, **c1)
    stream = [
        payment,
        build_body("payment_success", webhook_id=9002, transaction_id=7001, **c1),
        b"id=9003&event=test&payload[chargify]=testing",
        build_body(
            "payment_success", webhook_id=9004, transaction_id=7004, reference="late",
            subscription_id=SUB + 4,
        ),
        build_body("component_allocation_change", webhook_id=9005, subscription_id=SUB + 5),
        build_body(
            "payment_success", webhook_id=9010, transaction_id=7010, reference="ghost",
            subscription_id=SUB + 10,
        ),
        build_body("payment_success", webhook_id=9007, subscription_id=SUB + 7, reference=""),
        build_body(
            "payment_success", webhook_id=9008, subscription_id=SUB + 8, reference="c1",
            drop=["payload[transaction][amount_in_cents]"],
        ),
    ]  # fmt: skip
    assert [pipeline.post(body) for body in stream] == [200] * len(stream)
    wait_for(lambda: outcomes(settings).get(9001, ("",))[0] == "recorded", "9001 recorded")
    assert pipeline.post(payment) == 200  # Chargify's retry
    # A record the sink cannot decode: dead-lettered by the sink as unsupported_schema.
    produce(
        settings.kafka_bootstrap_servers,
        settings.topic("transactions"),
        [(b"c1", b"not avro", [("chargify-webhook-id", b"9009"),
                               ("chargify-event", b"payment_success"),
                               ("received-at", format_timestamp(datetime.now(UTC)).encode())])],
    )  # fmt: skip
    wait_for(
        lambda: (
            outcomes(settings).get(9004, ("",))[0] == "parked"
            and outcomes(settings).get(9005, ("",))[0] == "dead_lettered"
        ),
        "9004 parked and 9005 dead-lettered",
    )
    # The customer arrives: the parked payment re-drives itself.
    assert run_cli(settings, "customers", "add", "late").returncode == 0
    # The subscription becomes known; then the operator replays the dead letter.
    assert pipeline.post(build_body("signup_success", webhook_id=9006, **{
        **c1, "subscription_id": SUB + 5})) == 200  # fmt: skip
    wait_for(lambda: outcomes(settings).get(9006, ("",))[0] == "recorded", "9006 recorded")
    replay = run_cli(settings, "dlq", "replay", "--reason", "unknown_subscription")
    assert replay.returncode == 0, replay.stderr
    wait_for(lambda: outcomes(settings) == EXPECTED, "every outcome", timeout=60)


def trace(settings: Settings, webhook_id: int) -> Any:
    done = run_cli(settings, "trace", str(webhook_id), "--json")
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def test_every_webhook_outcome_in_trace_and_console(
    settings: Settings, pipeline: Pipeline, stages: Callable[..., Stage], tmp_path: Path
) -> None:
    try:
        run_scenario(settings, pipeline)
    finally:
        print(outcomes(settings))
    [(received_at, decided_at)] = query(
        settings, "select received_at, decided_at from webhook_outcomes where webhook_id = 9001"
    )
    assert received_at is not None and decided_at >= received_at
    decisions = query(
        settings,
        "select webhook_id, stage, decision, reason, replay_count from webhook_deliveries"
        " where stage <> 'gateway' order by webhook_id, at",
    )
    assert decisions == [
        (9001, "sink", "recorded", None, 0),
        (9001, "processor", "duplicate", None, 0),
        (9002, "processor", "unchanged", None, 0),  # transaction 7001 already emitted
        (9003, "processor", "ignored", "test_event", 0),
        (9004, "sink", "parked", "customer_not_found", 0),
        (9004, "sink", "parked", "customer_not_found", 0),  # the dead letter itself
        (9004, "sink", "recorded", None, 1),  # the re-drive
        (9005, "processor", "dead_lettered", "unknown_subscription", 0),
        (9005, "sink", "recorded", None, 1),  # the replay, through the processor
        (9006, "sink", "recorded", None, 0),
        (9007, "processor", "dead_lettered", "missing_customer_reference", 0),
        (9008, "processor", "dead_lettered", "malformed_payload", 0),
        (9009, "sink", "dead_lettered", "unsupported_schema", 0),
        (9010, "sink", "parked", "customer_not_found", 0),
        (9010, "sink", "parked", "customer_not_found", 0),
    ]

    # trace: the same outcome for every webhook, and the journey behind it.
    traces = {wid: trace(settings, wid) for wid in EXPECTED}
    assert {
        wid: (t["outcome"]["outcome"], t["outcome"]["reason"], t["outcome"]["attempts"])
        for wid, t in traces.items()
    } == EXPECTED
    first = traces[9001]
    assert [r["topic"] for r in first["received"]] == [settings.topic("raw")] * 2
    assert [d["decision"] for d in first["decisions"]] == ["recorded", "duplicate"]
    recorded = first["decisions"][0]
    assert recorded["topic"] == settings.topic("transactions")
    assert recorded["record"]["value"]["transaction_id"] == 7001
    assert recorded["record"]["headers"]["chargify-webhook-id"] == "9001"
    [row] = first["postgres"]["transactions"]
    assert (row["transaction_id"], row["partner_key"], row["webhook_id"]) == (7001, "p1", 9001)
    # The other webhook for the same transaction: dropped by the processor, which says so.
    assert [d["decision"] for d in traces[9002]["decisions"]] == ["unchanged"]

    parked = traces[9004]
    [letter] = parked["dead_letters"]
    assert letter["record"]["dead_letter"]["reason"] == "customer_not_found"
    [redrive] = parked["redrives"]
    assert redrive["redriven_at"] is not None
    assert [d["decision"] for d in parked["replays"]] == ["recorded"]

    replayed = traces[9005]
    assert [r["replay_count"] for r in replayed["received"]] == [0, 1]
    assert replayed["dead_letters"][0]["record"]["dead_letter"]["stage"] == "processor"
    assert replayed["postgres"]["subscriptions"][0]["subscription_id"] == SUB + 5

    for wid in (9007, 9008):
        [letter] = traces[wid]["dead_letters"]
        assert letter["record"]["dead_letter"]["reason"] == EXPECTED[wid][1]
    assert traces[9009]["received"] == []
    assert traces[9003]["postgres"] == {"transactions": [], "subscriptions": []}

    text = run_cli(settings, "trace", "9004")
    assert text.returncode == 0, text.stderr
    assert "outcome   recorded by sink" in text.stdout
    assert "parked (customer_not_found)" in text.stdout and "re-driven" in text.stdout

    unknown = run_cli(settings, "trace", "123")
    assert unknown.returncode == 1
    assert "webhook 123 is unknown" in unknown.stderr and unknown.stdout == ""

    check_console(settings, pipeline, stages, tmp_path)
    check_json_logs([pipeline.gateway, *pipeline.processors, *pipeline.sinks])


def check_json_logs(stages: list[Stage]) -> None:
    """Every stage logged JSON lines, in UTC, without terminal escape sequences."""
    for stage in stages:
        text = stage.log()
        assert "\x1b" not in text, stage.name
        lines = [json.loads(line) for line in text.splitlines() if line.strip()]
        assert lines and all(line["time"].endswith("Z") for line in lines), stage.name
    # The keys an operator filters on, on a processor decision and a sink dead letter.
    processor = [json.loads(line) for line in stages[1].log().splitlines() if line.strip()]
    assert {"webhook_id": "9003", "event": "test", "outcome": "ignored"}.items() <= next(
        line for line in processor if line.get("webhook_id") == "9003"
    ).items()
    sink = [json.loads(line) for line in stages[2].log().splitlines() if line.strip()]
    parked = next(line for line in sink if line.get("webhook_id") == "9010")
    assert (parked["outcome"], parked["reason"]) == ("parked", "customer_not_found")


def check_console(
    settings: Settings, pipeline: Pipeline, stages: Callable[..., Stage], tmp_path: Path
) -> None:
    port = free_port()
    # Where this pipeline's processor and sink serve their endpoints, as an operator would
    # configure the console.
    ports = {
        "console_port": port,
        "processor_web_port": pipeline.processors[0].settings.processor_web_port,
        "sink_metrics_port": pipeline.sinks[0].settings.sink_metrics_port,
    }
    console = stages("console", settings.model_copy(update=ports))
    base = f"http://127.0.0.1:{port}"
    console.wait_http_ready(f"{base}/healthz")

    counts = dict(query(settings, "select outcome, count(*) from webhook_outcomes group by 1"))
    transactions_end = end_offsets(settings.kafka_bootstrap_servers, settings.topic("transactions"))
    lag = f"{settings.sink_group_id}.{settings.topic('transactions')}.0"
    deadline = time.monotonic() + 30
    while True:  # the sink commits its offsets asynchronously, just after its last write
        shown = figures(dump_dom(f"{base}/"))
        if shown.get(f"committed.{lag}") == str(transactions_end) or time.monotonic() > deadline:
            break
        time.sleep(1)
    assert shown[f"committed.{lag}"] == str(transactions_end)
    assert shown[f"lag.{lag}"] == "0"
    assert f"lag.{settings.processor_app_id}.{settings.topic('raw')}.0" in shown
    assert {k: shown[f"stage.{k}"] for k in ("gateway", "processor", "sink")} == dict.fromkeys(
        ("gateway", "processor", "sink"), "up"
    )
    assert {k: int(shown[f"outcome.{k}"]) for k in counts} == counts
    assert counts == {"recorded": 4, "unchanged": 1, "ignored": 1, "dead_lettered": 3, "parked": 1}
    # Unresolved dead letters only: 9004 (re-driven) and 9005 (replayed) are not listed.
    dead = {k.split(".")[1] for k in shown if k.startswith("dead.") and k.count(".") == 1}
    assert dead == {
        "customer_not_found", "missing_customer_reference", "malformed_payload",
        "unsupported_schema",
    }  # fmt: skip
    assert all(shown[f"dead.{reason}"] == "1" for reason in dead)
    assert shown["dead.customer_not_found.0-1h"] == "1"
    [(waiting,)] = query(settings, "select count(*) from parked_events where redriven_at is null")
    assert shown["parked.waiting"] == str(waiting) == "1"
    # Payments: 9001 recorded, 9002 unchanged, 9004 recorded (matched), 9010 parked.
    assert (shown["matching.matched"], shown["matching.unmatched"]) == ("3", "1")
    assert shown["matching.rate"] == "75.0 %"
    partners = dict(
        query(settings, "select transaction_id, coalesce(partner_key, 'none') from transactions")
    )
    assert {k: shown[f"partner.{k}"] for k in partners} == partners == {7001: "p1", 7004: "none"}

    sink = f"http://127.0.0.1:{ports['sink_metrics_port']}"
    assert httpx.get(f"{sink}/healthz", timeout=5).status_code == 200
    assert httpx.get(f"{sink}/readyz", timeout=5).text == "ready\n"
    summary = httpx.get(f"{base}/api/summary", timeout=30).json()
    assert summary["outcomes"] == counts and summary["errors"] == {}
    # The search box opens a webhook's trace.
    page = dump_dom(f"{base}/")
    assert '<form action="/trace" method="get">' in page and 'name="webhook_id"' in page
    assert figures(dump_dom(f"{base}/trace?webhook_id=9004"))["trace.outcome"] == "recorded"
    assert "is unknown" in figures(dump_dom(f"{base}/trace?webhook_id=1"))["trace.error"]

    image = tmp_path / "console.png"
    screenshot(f"{base}/", image)
    if os.environ.get("UPDATE_CONSOLE_SCREENSHOT"):
        shutil.copy(image, Path(__file__).parents[2] / "docs" / "console.png")
