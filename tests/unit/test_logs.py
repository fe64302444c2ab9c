"""Log lines: ISO-8601 UTC, stable keys in JSON, no terminal escape sequences."""

from __future__ import annotations

import json
import logging

import pytest

from chargify_stream.base.logs import JsonFormatter, TextFormatter, fields


def record(message: str, *args: object, **extra: object) -> logging.LogRecord:
    rec = logging.LogRecord("sink.consumer", logging.WARNING, __file__, 1, message, args, None)
    rec.created = 1796454855.25  # 2026-12-05T07:14:15.250Z
    rec.msecs = 250.0
    for key, value in extra.items():
        setattr(rec, key, value)
    return rec


def test_json_lines_have_stable_keys_and_utc_time() -> None:
    line = JsonFormatter().format(
        record("dead-lettering %s", "x", **fields(812345678, "payment_success", "parked", "r"))
    )
    assert json.loads(line) == {
        "time": "2026-12-05T07:14:15.250Z",
        "level": "WARNING",
        "logger": "sink.consumer",
        "message": "dead-lettering x",
        "webhook_id": "812345678",
        "event": "payment_success",
        "outcome": "parked",
        "reason": "r",
    }


@pytest.mark.parametrize("formatter", [TextFormatter(), JsonFormatter()])
def test_no_terminal_escape_sequences(formatter: logging.Formatter) -> None:
    line = formatter.format(record("\x1b[?25hstarted \x1b[31mred\x1b[0m\x07"))
    assert "\x1b" not in line and "\x07" not in line
    assert "started red" in line


def test_text_lines_start_with_utc_time_and_end_with_the_keys() -> None:
    line = TextFormatter().format(record("ignored webhook", **fields(9, "test", "ignored")))
    assert line == (
        "2026-12-05T07:14:15.250Z WARNING sink.consumer ignored webhook"
        " [webhook_id=9 event=test outcome=ignored]"
    )


def test_dlq_progress_reaches_a_pipe_throttled() -> None:
    import io

    from chargify_stream.dlq import Progress

    piped = io.StringIO()
    progress = Progress("reading dlq", piped, delay=0.0, every=3600.0)
    for done in range(0, 100_000, 1000):
        progress.update(done, 100_000)
    progress.finish()
    assert piped.getvalue() == "reading dlq: 0 of 100,000 records (0%)\n"
