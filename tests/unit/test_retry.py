"""The one retry-with-backoff: its schedule of pauses, and the loop that stops on request."""

from __future__ import annotations

import itertools
import threading

import pytest

from chargify_stream.base.errors import TransientError
from chargify_stream.base.retry import RetryStopped, backoff, retry


def test_pauses_double_up_to_the_most() -> None:
    assert list(itertools.islice(backoff(0.5, 3.0), 5)) == [0.5, 1.0, 2.0, 3.0, 3.0]
    assert list(itertools.islice(backoff(5.0), 4)) == [5.0, 10.0, 20.0, 40.0]


def test_jittered_pauses_stay_in_the_upper_half() -> None:
    for pause, plain in zip(
        itertools.islice(backoff(1.0, 8.0, jitter=True), 50),
        itertools.islice(backoff(1.0, 8.0), 50),
        strict=True,
    ):
        assert plain / 2 <= pause <= plain


def test_retry_returns_once_the_step_succeeds() -> None:
    attempts: list[int] = []
    seen: list[tuple[str, float]] = []

    def step() -> str:
        attempts.append(1)
        if len(attempts) < 3:
            raise TransientError(f"away {len(attempts)}")
        return "done"

    result = retry(
        step,
        retry_on=TransientError,
        first=0.001,
        most=0.002,
        on_retry=lambda exc, pause, _attempt: seen.append((str(exc), pause)),
    )
    assert result == "done"
    assert seen == [("away 1", 0.001), ("away 2", 0.002)]


def test_other_errors_are_not_retried() -> None:
    def step() -> None:
        raise ValueError("a bug")

    with pytest.raises(ValueError):
        retry(step, retry_on=TransientError, first=0.001)


def test_a_stop_ends_the_wait() -> None:
    stop = threading.Event()

    def step() -> None:
        stop.set()
        raise TransientError("away")

    with pytest.raises(RetryStopped) as raised:
        retry(step, retry_on=TransientError, first=60.0, stop=stop)
    assert isinstance(raised.value.__cause__, TransientError)


def test_give_up_ends_it_with_the_error_itself() -> None:
    attempts: list[int] = []

    def step() -> None:
        raise TransientError(f"away {len(attempts)}")

    def give_up(exc: BaseException, attempt: int) -> bool:
        attempts.append(attempt)
        return attempt >= 3

    with pytest.raises(TransientError, match="away 2"):
        retry(step, retry_on=TransientError, first=0.001, give_up=give_up)
    assert attempts == [1, 2, 3]


def test_the_attempt_is_told_before_each_pause() -> None:
    seen: list[int] = []

    def step() -> None:
        if len(seen) < 2:
            raise TransientError("away")

    retry(
        step,
        retry_on=TransientError,
        first=0.001,
        on_retry=lambda _exc, _pause, attempt: seen.append(attempt),
    )
    assert seen == [1, 2]
