"""The dead-letter topic keeps its records until they are dealt with, or the stages say so.

The pipeline creates the topic with unlimited retention and the size budget's record
limit, but leaves an existing topic as it is; the processor and the sink check it at
start and warn about what would lose dead letters or cut them down to pointers.
"""

from __future__ import annotations

import logging
from typing import Any

import pytest

from chargify_stream.base.kafka_admin import check_deadletter_topic
from chargify_stream.base.settings import Settings
from tests.kafka_tools import alter_topic

pytestmark = pytest.mark.integration

WEEK_MS = "604800000"  # the broker's default retention


def test_a_topic_the_pipeline_created_needs_no_warning(settings: Settings) -> None:
    assert check_deadletter_topic(settings) == []


def test_a_finite_retention_or_a_small_record_limit_is_warned_about(
    settings: Settings, caplog: pytest.LogCaptureFixture
) -> None:
    alter_topic(
        settings.kafka_bootstrap_servers,
        settings.topic("deadletter"),
        {"retention.ms": WEEK_MS, "retention.bytes": "1073741824", "max.message.bytes": "1048588"},
    )
    with caplog.at_level(logging.WARNING, logger="chargify_stream.base.kafka_admin"):
        problems = check_deadletter_topic(settings)
    assert len(problems) == 3
    assert "deletes records after 7 days (retention.ms=604800000)" in problems[0]
    assert "retention.ms=-1" in problems[0]
    assert "retention.bytes=1073741824" in problems[1]
    assert "up to 1,048,588 bytes" in problems[2]
    assert [r.getMessage() for r in caplog.records] == problems
    assert all(r.levelno == logging.WARNING for r in caplog.records)


def test_the_processor_and_the_sink_warn_at_start(settings: Settings, stages: Any) -> None:
    alter_topic(
        settings.kafka_bootstrap_servers, settings.topic("deadletter"), {"retention.ms": WEEK_MS}
    )
    processor = stages("processor", settings)
    sink = stages("sink", settings)
    for stage in (processor, sink):
        stage.wait_for_log("deletes records after 7 days")
        stage.wait_for_log("consuming" if stage is sink else "reading")
        assert stage.running


def test_an_unreachable_broker_is_logged_not_raised(
    settings: Settings, caplog: pytest.LogCaptureFixture
) -> None:
    away = settings.model_copy(update={"kafka_bootstrap_servers": "127.0.0.1:1"})
    with caplog.at_level(logging.WARNING, logger="chargify_stream.base.kafka_admin"):
        assert check_deadletter_topic(away, timeout=1.0) == []
    assert "could not read the configuration of topic" in caplog.text
