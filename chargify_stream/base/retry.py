"""Retry with backoff: the one schedule of pauses, and a loop that uses it.

Transient faults (the broker or the database away, a throttled API) are retried, never
turned into dead letters (``chargify_stream.base.errors``). The pause starts at ``first``,
doubles after every failure and stays at ``most``; with ``jitter`` each pause is drawn
from its upper half, so that several processes do not reconnect in step.
"""

from __future__ import annotations

import math
import random
import threading
import time
from collections.abc import Callable, Iterator
from typing import TypeVar

from chargify_stream.base.errors import ChargifyStreamError

__all__ = ["RetryStopped", "backoff", "retry"]

_T = TypeVar("_T")


class RetryStopped(ChargifyStreamError):
    """A stop was asked for while waiting to retry; the last failure is its cause."""


def backoff(first: float, most: float = math.inf, *, jitter: bool = False) -> Iterator[float]:
    """Pauses of ``first``, twice that, ... up to ``most`` (for ever)."""
    pause = first
    while True:
        yield pause * random.uniform(0.5, 1.0) if jitter else pause
        pause = min(pause * 2, most)


def retry(
    step: Callable[[], _T],
    *,
    retry_on: type[BaseException] | tuple[type[BaseException], ...],
    first: float = 0.2,
    most: float = 5.0,
    jitter: bool = False,
    stop: threading.Event | None = None,
    on_retry: Callable[[BaseException, float, int], None] | None = None,
    give_up: Callable[[BaseException, int], bool] | None = None,
) -> _T:
    """Run ``step`` until it returns without raising ``retry_on``.

    After a failed attempt (counted from 1), ``give_up(error, attempt)`` may end it: when
    it says so, the error is raised as it is (an error that retrying cannot mend, or the
    last of a number of attempts). Otherwise ``on_retry(error, pause, attempt)`` is called
    (to log, count, reconnect) before the pause. With ``stop``, the pause ends early when
    the event is set, raising :class:`RetryStopped` from the last error.
    """
    pauses = backoff(first, most, jitter=jitter)
    attempt = 0
    while True:
        attempt += 1
        try:
            return step()
        except retry_on as exc:
            if give_up is not None and give_up(exc, attempt):
                raise
            pause = next(pauses)
            if on_retry is not None:
                on_retry(exc, pause, attempt)
            if stop is None:
                time.sleep(pause)
            elif stop.wait(pause):
                raise RetryStopped(f"stopped while retrying after: {exc}") from exc
