"""``chargify-stream dlq``: usage errors exit 2 before touching Kafka; an absent broker says so."""

from __future__ import annotations

import pytest

from chargify_stream.cli import main
from chargify_stream.local.ports import free_port


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["dlq", "list", "--reason", "customer_missing"], "unknown reason code customer_missing"),
        (["dlq", "stats", "--reason", "customer_not_found,nope"], "unknown reason code nope"),
        (["dlq", "replay", "--since", "yesterday"], "is not a time"),
        (["dlq", "list", "--until", "2026-02-30"], "is not a time"),
        (["dlq", "replay", "--max-attempts", "0"], "at least 1"),
        (["dlq", "replay", "--rate", "fast"], "above 0"),
    ],
)
def test_usage_errors_exit_2_with_a_clear_message(
    args: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exit_:
        main(args)
    assert exit_.value.code == 2
    assert message in capsys.readouterr().err


def test_since_after_until_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["dlq", "list", "--since", "2026-11-28", "--until", "2026-11-27"])
    assert code == 2
    assert "--since (2026-11-28T00:00:00.000Z) must be before --until" in capsys.readouterr().err


@pytest.mark.parametrize("action", ["list", "stats", "replay"])
def test_unreachable_broker_is_a_clear_error_and_nothing_is_done(
    action: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("KAFKA_BOOTSTRAP_SERVERS", f"127.0.0.1:{free_port()}")
    code = main(["dlq", action, "--timeout", "1"])
    out = capsys.readouterr()
    assert code == 1
    assert out.out == ""
    assert "is unreachable" in out.err
    assert "nothing was read or changed" in out.err
