"""``--max-attempts`` counts every delivery attempt of an event, whichever stage failed it.

An event that fails at the processor, is replayed, and then fails at the sink keeps its
``dlq-replay-count``: the processor copies it from the replayed raw record onto the
output record, and the sink's dead letter starts from it. Real processor and sink
processes, real broker and Postgres, ``chargify-stream dlq`` as an operator runs it.
"""

from __future__ import annotations

from typing import Any

import pytest

from chargify_stream.base.settings import Settings
from chargify_stream.schemas import headers as h
from tests.integration.test_dlq import cli_json, wait_for
from tests.integration.test_processor import webhook
from tests.kafka_tools import consume, headers_of, produce

pytestmark = pytest.mark.integration


def letters(settings: Settings) -> list[dict[str, bytes]]:
    found = consume(
        settings.kafka_bootstrap_servers, settings.topic("deadletter"), count=99, timeout=2
    )
    return [headers_of(m) for m in found]


def test_the_replay_count_carries_from_the_processor_to_the_sink(
    settings: Settings, stages: Any
) -> None:
    allocation, signup = 4_300_000_001, 4_300_000_002
    produce(
        settings.kafka_bootstrap_servers,
        settings.topic("raw"),
        [
            # No customer known for subscription 404 yet: the processor parks it.
            webhook("component_allocation_change", webhook_id=allocation, subscription_id=404),
            # Teaches the processor the reference; the sink parks it (no such customer).
            webhook("signup_success", webhook_id=signup, subscription_id=404, reference="ghost"),
        ],
    )
    stages("processor", settings)
    stages("sink", settings)
    wait_for(lambda: len(letters(settings)) == 2, "both dead letters")

    replayed = cli_json(settings, "dlq", "replay", "--reason", "unknown_subscription")
    assert replayed["replayed"] == 1

    def at_the_sink() -> dict[str, bytes] | None:
        for got in letters(settings):
            if got[h.WEBHOOK_ID] == str(allocation).encode() and got[h.DLQ_STAGE] == b"sink":
                return got
        return None

    failed_again = wait_for(at_the_sink, "the replayed event dead-lettered by the sink", 60)
    assert failed_again[h.DLQ_REASON] == b"customer_not_found"
    assert failed_again[h.DLQ_REPLAY_COUNT] == b"1"  # its second attempt, not its first
    [output] = [
        m
        for m in consume(settings.kafka_bootstrap_servers, settings.topic("subscriptions"), count=2)
        if headers_of(m)[h.WEBHOOK_ID] == str(allocation).encode()
    ]
    assert headers_of(output)[h.DLQ_REPLAY_COUNT] == b"1"

    events = {e["webhook_id"]: e for e in cli_json(settings, "dlq", "list")}
    assert events[str(allocation)]["attempts"] == 2
    assert events[str(allocation)]["stage"] == "sink"
    assert events[str(signup)]["attempts"] == 1

    # Two attempts used: --max-attempts 2 refuses it, and still replays the signup.
    plan = cli_json(settings, "dlq", "replay", "--max-attempts", "2", "--dry-run", code=3)
    actions = {r["webhook_id"]: r["action"] for r in plan["records"]}
    assert actions == {str(allocation): "refused", str(signup): "would_replay"}
